"""The machinery every op shares, once: dtype of accumulation, memory layout, input checks,
the kernel registry entries, and the torch.library registration (fake kernels, autograd,
vmap, the eager fast path).

Each op's own file (``attnpool/<name>.py``) uses these to declare its torch op
``attnpool::<name>`` (and ``attnpool::<name>_backward``), its kernels and its backend limits.

Every op takes the concrete backend as its last argument (resolved by
attnpool.backends before the call), so the choice survives torch.compile.
Forward ops return only small statistics for the backward (softmax weights,
norms); the backward op recomputes the rest from the saved inputs.

Eager calls skip the torch.library layers: :func:`call` runs a forward op as a plain
``torch.autograd.Function`` built from the op's own function, setup and backward (the
backward then calls the backward op's function directly). Those layers cost about 0.1 ms
per forward + backward on the CPU, more than the small ops' kernels. Anything traced or
transformed (torch.compile, torch.jit.trace, fake tensors, dispatch modes, tensor
subclasses, torch.func transforms) goes through the op, so that it appears as the op.

torch.func: every op (forward and backward) has a vmap rule that runs the op once per
vmapped element (:func:`_register_vmap`), so ``vmap``, ``grad``, ``jacrev`` and batched
gradcheck work; forward-mode AD (``jvp``, ``jacfwd``) raises.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from attnpool import backends


# ---------------------------------------------------------------- dtype and layout
def opmath(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the kernels for inputs of ``dtype`` (float64 stays float64,
    everything else accumulates in float32), and the dtype of the small statistics they return."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dense_bcn(x: Tensor) -> Tensor:
    """x [B, C, n] as the kernels read it in place: n-contiguous (NCHW) or C-contiguous
    (channels-last) and dense; anything else is copied to n-contiguous."""
    B, C, n = x.shape
    def strided_as(*want):
        return all(size <= 1 or s == w for size, s, w in zip(x.shape, x.stride(), want))
    if strided_as(C * n, n, 1) or strided_as(n * C, 1, C):
        return x
    return x.contiguous()


# ---------------------------------------------------------------- kernels
def _cpp(op: str) -> backends.Implementation:
    ext = backends.extension()
    return backends.Implementation(getattr(ext, f"{op}_forward_cpu"), getattr(ext, f"{op}_backward_cpu"))


def _cuda(op: str) -> backends.Implementation:
    ext = backends.extension()
    return backends.Implementation(getattr(ext, f"{op}_forward_cuda"), getattr(ext, f"{op}_backward_cuda"))


def _triton(module: str, op: str) -> backends.Implementation:
    mod = importlib.import_module(f"attnpool.kernels.{module}")
    return backends.Implementation(getattr(mod, f"{op}_forward"), getattr(mod, f"{op}_backward"))


def register_kernels(op: str, *, triton_module: str | None = None,
                     limits: Callable[..., str | None] | None = None) -> None:
    """Declares op ``op``'s kernels: ``<op>_forward_cpu`` / ``_backward_cpu`` (and ``_cuda``) of
    attnpool._C, ``<op>_forward`` / ``_backward`` of ``attnpool.kernels.<triton_module>``
    (default: the op's own file); and its backend limits (see :func:`backends.register_limits`)."""
    module = triton_module or op
    backends.register(op, "cpp", lambda: _cpp(op))
    backends.register(op, "cuda", lambda: _cuda(op))
    backends.register(op, "triton", lambda: _triton(module, op))
    if limits is not None:
        backends.register_limits(op, limits)


def _register_vmap(op) -> None:
    """torch.func.vmap of ``op``: the op once per vmapped element, outputs stacked on dim 0.
    Any argument may be vmapped (inputs and parameters alike), so this is always right;
    vmap is a transform for per-sample gradients and Jacobians, not a fast path."""
    def take(arg, dim, i):
        if isinstance(arg, (list, tuple)) and isinstance(dim, (list, tuple)):
            return [take(a, d, i) for a, d in zip(arg, dim)]
        return arg if dim is None else arg.select(dim, i)

    def rule(info, in_dims, *args):
        results = [op(*(take(a, d, i) for a, d in zip(args, in_dims)))
                   for i in range(info.batch_size)]
        if isinstance(results[0], Tensor):
            return torch.stack(results), 0
        outputs = [torch.stack([r[k] for r in results]) for k in range(len(results[0]))]
        return type(results[0])(outputs), type(results[0])(0 for _ in outputs)

    torch.library.register_vmap(op, rule)


# ---------------------------------------------------------------- registration, eager path, torch.func
_FUNCTIONS: dict = {}   # forward op -> its eager torch.autograd.Function
_FUNC_TRANSFORMS: dict = {}  # forward op -> its torch.autograd.Function for torch.func
_RAW: dict = {}         # op -> the Python function it was made from


def custom_op(name: str):
    """torch.library.custom_op with its vmap rule, remembering the undecorated function."""
    def wrap(fn):
        op = torch.library.custom_op(name, mutates_args=())(fn)
        _RAW[op] = fn
        _register_vmap(op)
        return op
    return wrap


def register_autograd(op, backward, setup, *, eager: bool = True) -> None:
    """op.register_autograd, plus the twins :func:`call` uses: the eager autograd.Function
    (unless ``eager`` is False) and the torch.func one."""
    op.register_autograd(backward, setup_context=setup)
    raw = _RAW[op]

    if eager:
        # forward(ctx, ...) rather than a separate setup_context: apply() would otherwise bind
        # the arguments through inspect.signature on every call (~40 us)
        def forward(ctx, *inputs):
            output = raw(*inputs)
            setup(ctx, inputs, output)
            ctx.eager = True
            return output

        _FUNCTIONS[op] = type(f"{op._name}_eager", (torch.autograd.Function,), {
            "forward": staticmethod(forward), "backward": staticmethod(backward)})

    # torch.func needs an autograd.Function with setup_context, which torch.library's own
    # autograd of the op lacks (torch.func.grad fails there, and jvp gives zero tangents
    # silently). This one calls the op (its vmap rule batches it) and has no jvp, so forward
    # mode raises. Tensor lists (pyramid levels) are flattened: a Function differentiates
    # only its direct Tensor arguments; `spec` holds each list's length (None: no list).
    def flatten(values):
        spec = tuple(len(v) if isinstance(v, (list, tuple)) else None for v in values)
        flat = [t for v in values for t in (v if isinstance(v, (list, tuple)) else [v])]
        return spec, flat

    def unflatten(spec, flat):
        values, i = [], 0
        for n in spec:
            values.append(list(flat[i:i + n]) if n is not None else flat[i])
            i += 1 if n is None else n
        return values

    def func_forward(spec, *flat):
        output = op(*unflatten(spec, flat))
        return tuple(output) if isinstance(output, list) else output

    def func_setup(ctx, inputs, output):
        ctx.spec = inputs[0]
        setup(ctx, unflatten(inputs[0], inputs[1:]), output)

    def func_backward(ctx, *grads):
        grads = backward(ctx, *grads)
        return (None, *(g for n, g in zip(ctx.spec, grads)
                        for g in ([g] if n is None else (g if g is not None else [None] * n))))

    def func_jvp(ctx, *tangents):
        raise NotImplementedError(
            f"attnpool: forward-mode AD (torch.func.jvp, jacfwd, forward_ad) through {op._name} "
            "is not supported; use reverse mode (torch.func.grad, vjp, jacrev)")

    _FUNC_TRANSFORMS[op] = (flatten, type(f"{op._name}_func", (torch.autograd.Function,), {
        "forward": staticmethod(func_forward), "setup_context": staticmethod(func_setup),
        "backward": staticmethod(func_backward), "jvp": staticmethod(func_jvp),
        "generate_vmap_rule": True}))


def register_backward_op(op, name: str) -> None:
    """A backward op's autograd: double backward raises."""
    def backward(ctx, *grads):
        raise RuntimeError(f"attnpool: double backward through {name} is not supported")

    register_autograd(op, backward, lambda ctx, inputs, output: None, eager=False)


def _transformed() -> bool:
    """Inside a torch.func transform (vmap, grad, jacrev, jvp, batched gradients)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _traced(args) -> bool:
    if (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or _get_current_dispatch_mode() is not None):
        return True
    return any(isinstance(a, Tensor) and type(a) not in (Tensor, torch.nn.Parameter) for a in args)


def call(op, *args):
    """Run forward op ``op``: as the op when traced (it must appear as itself), through its
    torch.func Function inside a torch.func transform, else eagerly as an autograd.Function."""
    if _transformed() and not torch.compiler.is_compiling():
        flatten, function = _FUNC_TRANSFORMS[op]
        spec, flat = flatten(args)
        return function.apply(spec, *flat)
    function = _FUNCTIONS.get(op)
    if function is None or _traced(args):
        return op(*args)
    return function.apply(*args)


def backward_op(ctx, op):
    """The backward op, or in an eager graph its plain function (unless create_graph: the op's
    own autograd then raises on double backward; or under a torch.func transform, whose
    batched tensors only the op's vmap rule handles)."""
    if _transformed():
        return lambda *args: call(op, *args)
    if getattr(ctx, "eager", False) and not torch.is_grad_enabled():
        return lambda *args: op(*args) if legacy_batched(args) else _RAW[op](*args)
    return op


_BATCHED = torch._C._parse_dispatch_key("Batched")


def legacy_batched(args) -> bool:
    """Batched tensors of torch's legacy vmap (autograd.grad(is_grads_batched=True), as
    gradcheck's batched-gradient test uses): they have no storage for a kernel to read."""
    return any(isinstance(a, Tensor) and torch._C._dispatch_keys(a).has(_BATCHED) for a in args)


# ---------------------------------------------------------------- input checks
# Error messages are built only when raising: under torch.compile sizes are symbolic, and
# formatting them would break the graph.
def shape_str(shape: str | tuple) -> str:
    return shape if isinstance(shape, str) else "[" + ", ".join(map(str, shape)) + "]"


def check_float(name: str, t: Tensor, shape: str | tuple) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor of shape {shape_str(shape)}, "
                        f"got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of shape {shape_str(shape)}, "
                        f"got {t.dtype}")


def check_like(name: str, t: Tensor | None, ref: Tensor, shape: tuple, ref_name: str = "x"
                ) -> None:
    """``t`` has exactly ``shape`` and the device and dtype of ``ref`` (named ``ref_name``)."""
    if t is None:
        return
    check_float(name, t, shape)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {shape_str(shape)}, got {list(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; use one "
                        "dtype (or torch.autocast)")


def autocast(*tensors: Tensor | None) -> list[Tensor | None]:
    """Under torch.autocast, run in the autocast dtype (kernels accumulate in fp32)."""
    x = tensors[0]
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        return [None if t is None else t.to(dtype) for t in tensors]
    return list(tensors)
