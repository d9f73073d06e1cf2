"""The machinery every op shares, once: dtype of accumulation, memory layout, input checks,
the kernel registry entries, and the registration of each op's two halves (fake kernels,
autograd, vmap).

Each op's own file (``attnpool/<name>.py``) uses these to declare its op ``attnpool::<name>``
(and ``attnpool::<name>_backward``): the compiled kernels are registered in C++
(``csrc/<name>.cpp``: schema, CPU and CUDA kernels), the Triton kernels here as
``attnpool::<name>_triton`` (see :class:`Op`); fake kernel, autograd and vmap rule are
registered from Python for both, so one path serves eager calls, torch.compile, torch.export
and the other tracers, and a program that only loads the compiled library (torch.export's
packages, AOTInductor) runs the cpp / cuda ops without Python.

Every op takes the concrete backend as its last argument (resolved by
attnpool.backends before the call), so the choice is recorded in traced graphs.
Forward ops return only small statistics for the backward (softmax weights,
norms); the backward op recomputes the rest from the saved inputs (one exception: the
cluster's fused fc1 CPU backward also takes the op's output, attnpool/attention_cluster.py).

torch.func: every op (forward and backward) has a vmap rule that runs the op once per
vmapped element (:func:`_register_vmap`), so ``vmap``, ``grad``, ``jacrev`` and batched
gradcheck work; forward-mode AD (``jvp``, ``jacfwd``) raises.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import Tensor

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


# ---------------------------------------------------------------- ops
class Op:
    """One op of attnpool, in its two registrations, which share its fake kernel, autograd and
    vmap rule: ``attnpool::<name>``, the compiled cpp / cuda kernels, defined and registered in
    C++ (csrc/<name>.cpp; present when attnpool._C is loaded), and ``attnpool::<name>_triton``,
    the Triton kernels, registered here from ``triton_fn`` (same arguments; None: the op has no
    Triton kernels). Calling an Op runs the registration its last argument, the resolved
    backend, names."""

    def __init__(self, name: str, triton_fn: Callable | None):
        self.name = name
        self.compiled = None
        if backends.extension() is not None:
            try:
                self.compiled = getattr(torch.ops.attnpool, name).default
            except AttributeError:  # an attnpool._C built from older sources: backends says so
                pass
        self.triton = None
        if triton_fn is not None:
            self.triton = torch.library.custom_op(f"attnpool::{name}_triton", mutates_args=())(
                triton_fn)
        for op in self.variants():
            _register_vmap(op)

    def variants(self) -> list:
        return [op for op in (self.compiled, self.triton) if op is not None]

    def for_backend(self, backend: str):
        op = self.triton if backend == "triton" else self.compiled
        if op is None:
            raise backends.BackendUnavailableError(
                f"attnpool::{self.name} has no {backend} kernels in this install "
                f"({backends.extension_error() or 'not built'})")
        return op

    def __call__(self, *args):
        return self.for_backend(args[-1])(*args)

    def register_fake(self, fn: Callable) -> Callable:
        for op in self.variants():
            torch.library.register_fake(op, fn)
        return fn


def register_kernels(op: str, *, triton_module: str | None = None,
                     limits: Callable[..., str | None] | None = None) -> None:
    """Declares where op ``op``'s kernels are, for :mod:`attnpool.backends` (which asks whether
    they load): cpp and cuda, the C++-registered ``attnpool::<op>`` (and ``<op>_backward``);
    triton, ``<op>_forward`` / ``<op>_backward`` of ``attnpool.kernels.<triton_module>``
    (default: the op's own name). And its backend limits (see :func:`backends.register_limits`)."""
    module = triton_module or op

    def compiled() -> backends.Implementation:
        if backends.extension() is None:
            raise ImportError(backends.extension_error() or "attnpool._C is not built")
        ops = torch.ops.attnpool
        return backends.Implementation(getattr(ops, op).default,
                                       getattr(ops, f"{op}_backward").default)

    def triton() -> backends.Implementation:
        mod = importlib.import_module(f"attnpool.kernels.{module}")
        return backends.Implementation(getattr(mod, f"{op}_forward"), getattr(mod, f"{op}_backward"))

    backends.register(op, "cpp", compiled)
    backends.register(op, "cuda", compiled)
    backends.register(op, "triton", triton)
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


# ---------------------------------------------------------------- autograd, torch.func
_FUNC_TRANSFORMS: dict = {}  # forward Op -> (flatten, its torch.autograd.Function for torch.func)
_EAGER: dict = {}  # forward Op -> (flatten, its torch.autograd.Function for plain eager calls)


def register_autograd(op: Op, backward, setup, *, eager: bool = True) -> None:
    """The autograd of both of ``op``'s registrations, and the twins that :func:`call` uses:
    in plain eager calls (unless ``eager`` is False: the backward ops, which are never called
    that way) and inside torch.func transforms."""
    for variant in op.variants():
        torch.library.register_autograd(variant, backward, setup_context=setup)

    # A Function differentiates only its direct Tensor arguments, so tensor lists (pyramid
    # levels) are flattened into them; `spec` holds each argument's list length (None: not a
    # list), or is None for an op without list arguments (arguments as they are).
    def is_list(t):
        return isinstance(t, torch.ListType) or (
            isinstance(t, torch.OptionalType) and isinstance(t.getElementType(), torch.ListType))

    # the schema of the op (an OpOverload) or of its Triton twin (a custom_op's definition)
    lists = any(is_list(arg.type) for variant in op.variants()[:1]
                for arg in getattr(variant, "_opoverload", variant)._schema.arguments)

    def flatten(values):
        if not lists:
            return None, values
        spec = tuple(len(v) if isinstance(v, (list, tuple)) else None for v in values)
        flat = [t for v in values for t in (v if isinstance(v, (list, tuple)) else [v])]
        return spec, flat

    def unflatten(spec, flat):
        if spec is None:
            return flat
        values, i = [], 0
        for n in spec:
            values.append(list(flat[i:i + n]) if n is not None else flat[i])
            i += 1 if n is None else n
        return values

    def flat_backward(ctx, *grads):
        grads = backward(ctx, *grads)
        spec = ctx._attnpool_spec
        if spec is None:
            return (None, *grads)
        if len(grads) != len(spec):  # a bug of the op's backward: never shift gradients
            raise RuntimeError(f"attnpool::{op.name}: {len(grads)} gradients for {len(spec)} inputs")
        flat = []
        for n, g in zip(spec, grads):
            if n is None:
                flat.append(g)
            elif g is None:
                flat.extend([None] * n)
            else:
                if len(g) != n:
                    raise RuntimeError(f"attnpool::{op.name}: {len(g)} gradients for a list of {n}")
                flat.extend(g)
        return (None, *flat)

    def tuple_of(output):
        return tuple(output) if isinstance(output, list) else output

    if eager:
        # Plain eager calls: torch.library's own autograd of the op (a Python kernel at the
        # Autograd key, which flattens the arguments as pytrees, fills defaults and
        # redispatches) costs more per forward + backward than this Function around the same
        # op, called below the Autograd key (benchmarks/NOTES.md, "One call path"; the
        # pyramid's four levels at B=1: 0.08 ms per forward, 0.13 ms per forward + backward).
        # The op is still what runs, so dispatch modes, fake tensors and subclasses see it as
        # under any other call.
        def forward(ctx, spec, *flat):
            inputs = unflatten(spec, flat)
            output = _below_autograd(op, inputs)
            ctx._attnpool_spec = spec
            setup(ctx, inputs, output)
            return tuple_of(output)

        _EAGER[op] = (flatten, type(f"{op.name}_eager", (torch.autograd.Function,), {
            "forward": staticmethod(forward), "backward": staticmethod(flat_backward)}))

    # torch.func needs an autograd.Function with setup_context, which torch.library's own
    # autograd of the op lacks (torch.func.grad fails there, and jvp gives zero tangents
    # silently). This one calls the op (its vmap rule batches it) and has no jvp, so forward
    # mode raises.
    def func_forward(spec, *flat):
        return tuple_of(op(*unflatten(spec, flat)))

    def func_setup(ctx, inputs, output):
        ctx._attnpool_spec = inputs[0]
        setup(ctx, unflatten(inputs[0], inputs[1:]), output)

    def func_jvp(ctx, *tangents):
        raise NotImplementedError(
            f"attnpool: forward-mode AD (torch.func.jvp, jacfwd, forward_ad) through "
            f"attnpool::{op.name} is not supported; use reverse mode (torch.func.grad, vjp, jacrev)")

    _FUNC_TRANSFORMS[op] = (flatten, type(f"{op.name}_func", (torch.autograd.Function,), {
        "forward": staticmethod(func_forward), "setup_context": staticmethod(func_setup),
        "backward": staticmethod(flat_backward), "jvp": staticmethod(func_jvp),
        "generate_vmap_rule": True}))


def register_backward_op(op: Op) -> None:
    """A backward op's autograd: double backward raises."""
    def backward(ctx, *grads):
        raise RuntimeError(f"attnpool: double backward through attnpool::{op.name} is not "
                           "supported")

    register_autograd(op, backward, lambda ctx, inputs, output: None, eager=False)


def _transformed() -> bool:
    """Inside a torch.func transform (vmap, grad, jacrev, jvp, batched gradients)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def call(op: Op, *args):
    """Run forward op ``op``: through its torch.func Function inside a torch.func transform
    (outside torch.compile), as the op with its registered autograd under torch.compile,
    torch.export and torch.jit.trace, else through its eager Function (which calls the op)."""
    if _transformed() and not torch.compiler.is_compiling():
        flatten, function = _FUNC_TRANSFORMS[op]
        spec, flat = flatten(args)
        return function.apply(spec, *flat)
    if op not in _EAGER or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return op(*args)
    flatten, function = _EAGER[op]
    spec, flat = flatten(args)
    return function.apply(spec, *flat)


def _below_autograd(op: Op, args):
    """The op's kernel, skipping its Autograd key (where the caller already is autograd)."""
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def backward_op(op: Op) -> Callable:
    """How a forward op's backward calls backward op ``op``: as :func:`call` does; in a plain
    eager backward without create_graph, below its Autograd key (as the eager Function)."""
    if _transformed():
        return lambda *args: call(op, *args)
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return op
    return lambda *args: _below_autograd(op, args)


_BATCHED = torch._C._parse_dispatch_key("Batched")


def legacy_batched(args) -> bool:
    """Batched tensors of torch's legacy vmap (autograd.grad(is_grads_batched=True), as
    gradcheck's batched-gradient test uses): they have no storage for a kernel to read."""
    return any(isinstance(a, Tensor) and torch._C._dispatch_keys(a).has(_BATCHED) for a in args)


# ---------------------------------------------------------------- modules
class NotScriptable:
    """Base of the modules: torch.jit.script cannot compile their forward (Python that picks
    a backend and calls the ops), so it stops with an error that says what works instead."""

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"attnpool: torch.jit.script cannot compile {type(self).__name__} (TorchScript is "
            "deprecated and cannot follow attnpool's backend dispatch). To deploy, use "
            "torch.export.export (then torch.export.save, or AOTInductor for a Python-free C++ "
            "runtime) or torch.onnx.export(..., dynamo=True); torch.jit.trace also records "
            "the ops. See README, 'Deploying'.")


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
