"""torch.library custom ops of attnpool: fake kernels, autograd, backend dispatch.

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

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from attnpool import backends, reference


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cpp(op: str) -> backends.Implementation:
    ext = backends.extension()
    return backends.Implementation(getattr(ext, f"{op}_forward_cpu"), getattr(ext, f"{op}_backward_cpu"))


def _cuda(op: str) -> backends.Implementation:
    ext = backends.extension()
    return backends.Implementation(getattr(ext, f"{op}_forward_cuda"), getattr(ext, f"{op}_backward_cuda"))


def _triton(module: str, op: str) -> backends.Implementation:
    mod = importlib.import_module(f"attnpool.kernels.{module}")
    return backends.Implementation(getattr(mod, f"{op}_forward"), getattr(mod, f"{op}_backward"))


def _register_kernels(op: str, module: str, kernel: str) -> None:
    backends.register(op, "cpp", lambda: _cpp(kernel))
    backends.register(op, "cuda", lambda: _cuda(kernel))
    backends.register(op, "triton", lambda: _triton(module, kernel))


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


# ------------------------------------------------------------ eager path, torch.func
_FUNCTIONS: dict = {}   # forward op -> its eager torch.autograd.Function
_FUNC_TRANSFORMS: dict = {}  # forward op -> its torch.autograd.Function for torch.func
_RAW: dict = {}         # op -> the Python function it was made from


def _custom_op(name: str):
    """torch.library.custom_op with its vmap rule, remembering the undecorated function."""
    def wrap(fn):
        op = torch.library.custom_op(name, mutates_args=())(fn)
        _RAW[op] = fn
        _register_vmap(op)
        return op
    return wrap


def _register_autograd(op, backward, setup, *, eager: bool = True) -> None:
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


def _register_backward_op(op, name: str) -> None:
    """A backward op's autograd: double backward raises."""
    def backward(ctx, *grads):
        raise RuntimeError(f"attnpool: double backward through {name} is not supported")

    _register_autograd(op, backward, lambda ctx, inputs, output: None, eager=False)


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


def _backward_op(ctx, op):
    """The backward op, or in an eager graph its plain function (unless create_graph: the op's
    own autograd then raises on double backward; or under a torch.func transform, whose
    batched tensors only the op's vmap rule handles)."""
    if _transformed():
        return lambda *args: call(op, *args)
    if getattr(ctx, "eager", False) and not torch.is_grad_enabled():
        return lambda *args: op(*args) if _legacy_batched(args) else _RAW[op](*args)
    return op


_BATCHED = torch._C._parse_dispatch_key("Batched")


def _legacy_batched(args) -> bool:
    """Batched tensors of torch's legacy vmap (autograd.grad(is_grads_batched=True), as
    gradcheck's batched-gradient test uses): they have no storage for a kernel to read."""
    return any(isinstance(a, Tensor) and torch._C._dispatch_keys(a).has(_BATCHED) for a in args)


# =========================================================== attention clusters
_register_kernels("attention_cluster", "attention_cluster", "cluster_pool")


def _fc1_fused(weight: Tensor | None, backend: str) -> bool:
    """Whether cluster_pool takes the C++ kernels with the fc1 scoring layer fused."""
    return (weight is not None and backend == "cpp"
            and hasattr(backends.extension(), "cluster_pool_fc1_forward_cpu"))


def check_lengths(lengths: Tensor, L: int) -> None:
    # Value checks cost no sync on the CPU; on a GPU they run as a device-side assert.
    if lengths.device.type == "cpu":
        bad = (lengths < 1) | (lengths > L)
        if bool(bad.any()):
            raise ValueError(f"lengths must lie in [1, L={L}], got {lengths.tolist()}")
    else:
        torch._assert_async(((lengths >= 1) & (lengths <= L)).all(), "lengths must lie in [1, L]")


def cluster_norm_eps(eps: float, eps_placement: str) -> tuple[float, float]:
    """The kernels' (eps, eps_sqrt) of the cluster norm max(sqrt(‖u‖² + eps_sqrt), eps):
    ``"clamp"`` is max(‖u‖, eps) (torch's clamp_min), ``"sqrt"`` is sqrt(‖u‖² + eps)
    (PaddlePaddle's l2_normalize)."""
    if eps_placement == "clamp":
        return float(eps), 0.0
    if eps_placement == "sqrt":
        return 0.0, float(eps)
    raise ValueError(f"eps_placement must be 'clamp' or 'sqrt', got {eps_placement!r}")


def _int64(lengths: Tensor | None) -> Tensor | None:
    return None if lengths is None else lengths.to(torch.int64).contiguous()


@_custom_op("attnpool::cluster_pool")
def cluster_pool(
    x: Tensor,
    scores: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    lengths: Tensor | None,
    alpha: Tensor,
    beta: Tensor,
    shift: bool,
    eps: float,
    eps_sqrt: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused softmax pooling + shift + L2 norm of attention clusters.

    x [B, L, F] and either scores [B, L, N], or the linear scoring layer weight [N, F]
    (+ bias [N]; "fc1": scores = x weight^T + bias, whose bias the softmax cancels) ->
    out [B, N*F], attn [B, N, L], norm [B, N]. Taking the scoring layer in the op lets its
    backward add grad_scores·weight into grad_x in place and skip an autograd node.
    The norm is max(sqrt(‖u‖² + eps_sqrt), eps) (see :func:`cluster_norm_eps`).
    """
    B, L, F = x.shape
    N = alpha.shape[0]
    if lengths is not None:
        check_lengths(lengths, L)
    lengths = _int64(lengths)
    if B == 0:
        stat = _opmath(x.dtype)
        return (x.new_empty(0, N * F), x.new_empty(0, N, L, dtype=stat),
                x.new_empty(0, N, dtype=stat))
    if _fc1_fused(weight, backend):  # scores computed inside the kernel, bias cancelled
        return backends.extension().cluster_pool_fc1_forward_cpu(
            x.contiguous(), weight.contiguous(), lengths, alpha.contiguous(), beta.contiguous(),
            shift, eps, eps_sqrt)
    # The kernels take the scores in opmath: rounded to half / bfloat16 they would move every
    # softmax weight by about that rounding times |score| (fp16 outputs of the GPU kernels
    # were 3x further from float64 than the fp16 reference, 50x further than the fused cpp
    # kernels, at B=4, L=300, F=2048, N=64).
    stat = _opmath(x.dtype)
    if weight is not None:  # the bias shifts every frame's score alike: the softmax cancels it
        scores = torch.nn.functional.linear(x.to(stat), weight.to(stat))
    impl = backends.implementation("attention_cluster", backend)
    return impl.forward(x.contiguous(), scores.to(stat).contiguous(), lengths, alpha.contiguous(),
                        beta.contiguous(), shift, eps, eps_sqrt)


@cluster_pool.register_fake
def _(x, scores, weight, bias, lengths, alpha, beta, shift, eps, eps_sqrt, backend):
    B, L, F = x.shape
    N = alpha.shape[0]
    stat = _opmath(x.dtype)
    return (x.new_empty(B, N * F), x.new_empty(B, N, L, dtype=stat), x.new_empty(B, N, dtype=stat))


@_custom_op("attnpool::cluster_pool_backward")
def cluster_pool_backward(
    grad_out: Tensor,
    x: Tensor,
    attn: Tensor,
    norm: Tensor,
    alpha: Tensor,
    beta: Tensor,
    lengths: Tensor | None,
    shift: bool,
    eps: float,
    eps_sqrt: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of cluster_pool w.r.t. x, scores, alpha, beta (recomputes v from attn, x).
    Frames past ``lengths`` are never read (NaN there reaches no gradient); their gradient
    is 0."""
    if x.shape[0] == 0:
        B, L, F = x.shape
        return x.new_zeros(x.shape), x.new_zeros(B, L, attn.shape[1]), alpha.new_zeros(
            alpha.shape), beta.new_zeros(beta.shape)
    impl = backends.implementation("attention_cluster", backend)
    return impl.backward(grad_out.contiguous(), x.contiguous(), attn.contiguous(),
                         norm.contiguous(), alpha.contiguous(), beta.contiguous(),
                         _int64(lengths), shift, eps, eps_sqrt)


@cluster_pool_backward.register_fake
def _(grad_out, x, attn, norm, alpha, beta, lengths, shift, eps, eps_sqrt, backend):
    B, L, _ = x.shape
    return (torch.empty_like(x), x.new_empty(B, L, attn.shape[1]), torch.empty_like(alpha),
            torch.empty_like(beta))


@_custom_op("attnpool::cluster_pool_fc1_backward")
def cluster_pool_fc1_backward(
    grad_out: Tensor,
    grad_attn: Tensor | None,
    x: Tensor,
    weight: Tensor,
    attn: Tensor,
    norm: Tensor,
    alpha: Tensor,
    beta: Tensor,
    lengths: Tensor | None,
    shift: bool,
    eps: float,
    eps_sqrt: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of cluster_pool with the fused fc1 scoring layer w.r.t. x, weight, alpha,
    beta; grad_attn (optional) is the gradient w.r.t. the returned attention."""
    if x.shape[0] == 0:
        return (x.new_zeros(x.shape), torch.zeros_like(weight), alpha.new_zeros(alpha.shape),
                beta.new_zeros(beta.shape))
    return backends.extension().cluster_pool_fc1_backward_cpu(
        grad_out.contiguous(), None if grad_attn is None else grad_attn.contiguous(),
        x.contiguous(), weight.contiguous(), attn.contiguous(), norm.contiguous(),
        alpha.contiguous(), beta.contiguous(), _int64(lengths), shift, eps, eps_sqrt)


@cluster_pool_fc1_backward.register_fake
def _(grad_out, grad_attn, x, weight, attn, norm, alpha, beta, lengths, shift, eps, eps_sqrt,
      backend):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format),
            torch.empty_like(alpha), torch.empty_like(beta))


def _cluster_setup(ctx, inputs, output):
    x, _, weight, bias, lengths, alpha, beta, shift, eps, eps_sqrt, backend = inputs
    _, attn, norm = output
    ctx.save_for_backward(x, attn, norm, alpha, beta, weight, lengths)
    ctx.shift, ctx.eps, ctx.eps_sqrt, ctx.backend = shift, eps, eps_sqrt, backend
    ctx.has_bias = bias is not None
    ctx.fc1_fused = _fc1_fused(weight, backend)
    ctx.mark_non_differentiable(norm)
    ctx.set_materialize_grads(False)  # an unused attention output costs nothing


def _cluster_backward(ctx, grad_out, grad_attn, grad_norm):
    x, attn, norm, alpha, beta, weight, lengths = ctx.saved_tensors
    if grad_out is None:
        grad_out = x.new_zeros(x.shape[0], attn.shape[1] * x.shape[2])
    if ctx.fc1_fused:
        grad_x, grad_weight, grad_alpha, grad_beta = _backward_op(ctx, cluster_pool_fc1_backward)(
            grad_out, grad_attn, x, weight, attn, norm, alpha, beta, lengths, ctx.shift, ctx.eps,
            ctx.eps_sqrt, ctx.backend)
        grad_bias = weight.new_zeros(weight.shape[0]) if ctx.has_bias else None
        if not ctx.shift:  # alpha and beta are unused without the shift, as in the reference
            grad_alpha = grad_beta = None
        return (grad_x, None, grad_weight, grad_bias, None, grad_alpha, grad_beta, None, None,
                None, None)
    grad_x, grad_scores, grad_alpha, grad_beta = _backward_op(ctx, cluster_pool_backward)(
        grad_out, x, attn, norm, alpha, beta, lengths, ctx.shift, ctx.eps, ctx.eps_sqrt,
        ctx.backend
    )
    if not ctx.shift:
        grad_alpha = grad_beta = None
    if grad_attn is not None:  # the caller also used the returned attention
        g = attn * (grad_attn - (attn * grad_attn).sum(-1, keepdim=True))
        grad_scores = grad_scores + g.transpose(1, 2).to(grad_scores.dtype)
    if weight is None:
        return (grad_x, grad_scores, None, None, None, grad_alpha, grad_beta, None, None, None,
                None)
    # the scoring layer: grad_x += grad_scores weight (into the kernel's fresh grad_x),
    # grad_weight = grad_scores^T x; the bias gradient is exactly 0
    F, N = x.shape[-1], weight.shape[0]
    gs = grad_scores.reshape(-1, N)
    grad_x.view(-1, F).addmm_(gs, weight)
    x = reference.zero_padded_frames(x, lengths)  # gs = 0 there: no 0 * NaN from padding
    grad_weight = gs.t() @ x.reshape(-1, F)
    grad_bias = weight.new_zeros(N) if ctx.has_bias else None
    return (grad_x, None, grad_weight, grad_bias, None, grad_alpha, grad_beta, None, None, None,
            None)


_register_autograd(cluster_pool, _cluster_backward, _cluster_setup)
_register_backward_op(cluster_pool_backward, "cluster_pool")
_register_backward_op(cluster_pool_fc1_backward, "cluster_pool")


# ========================================================== attentional pooling
_register_kernels("attentional_pooling", "attentional_pool", "attentional_pool")


def _dense_bcn(x: Tensor) -> Tensor:
    """x [B, C, n] as the kernels read it in place: n-contiguous (NCHW) or C-contiguous
    (channels-last) and dense; anything else is copied to n-contiguous."""
    B, C, n = x.shape
    def strided_as(*want):
        return all(size <= 1 or s == w for size, s, w in zip(x.shape, x.stride(), want))
    if strided_as(C * n, n, 1) or strided_as(n * C, 1, C):
        return x
    return x.contiguous()


@_custom_op("attnpool::attentional_pool")
def attentional_pool(x: Tensor, wb: Tensor, bb: Tensor, backend: str
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """Factored core of attentional pooling: x [B, C, n], wb [P, C], bb [P] ->
    z [B, P, C] = (1/n) Σ_i h[:, :, i] x[:, :, i], the bottom-up maps h [B, P, n] = wb x + bb,
    and their means over positions m [B, P] (opmath: the logits' bias term takes its
    gradient through m unrounded, not as n equal roundings in h's dtype)."""
    B, C, n = x.shape
    P = wb.shape[0]
    if B == 0:
        return x.new_empty(0, P, C), x.new_empty(0, P, n), x.new_empty(0, P, dtype=_opmath(x.dtype))
    impl = backends.implementation("attentional_pooling", backend)
    z, h = impl.forward(_dense_bcn(x), wb.contiguous(), bb.contiguous())
    return z, h, h.to(_opmath(x.dtype)).mean(-1)


@attentional_pool.register_fake
def _(x, wb, bb, backend):
    B, C, n = x.shape
    P = wb.shape[0]
    return x.new_empty(B, P, C), x.new_empty(B, P, n), x.new_empty(B, P, dtype=_opmath(x.dtype))


@_custom_op("attnpool::attentional_pool_backward")
def attentional_pool_backward(grad_z: Tensor, grad_h: Tensor, x: Tensor, h: Tensor, wb: Tensor,
                              backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of attentional_pool w.r.t. x (x's layout), wb and bb; grad_h may be opmath."""
    if x.shape[0] == 0:
        return torch.zeros_like(x), torch.zeros_like(wb), wb.new_zeros(wb.shape[0])
    impl = backends.implementation("attentional_pooling", backend)
    return impl.backward(grad_z.contiguous(), grad_h.contiguous(), _dense_bcn(x), h.contiguous(),
                         wb.contiguous())


@attentional_pool_backward.register_fake
def _(grad_z, grad_h, x, h, wb, backend):
    return torch.empty_like(_dense_bcn(x)), torch.empty_like(wb), wb.new_empty(wb.shape[0])


def _attpool_setup(ctx, inputs, output):
    x, wb, _, backend = inputs
    ctx.save_for_backward(x, output[1], wb)
    ctx.backend = backend


def _attpool_backward(ctx, grad_z, grad_h, grad_m):
    x, h, wb = ctx.saved_tensors
    if grad_z is None:
        grad_z = x.new_zeros(x.shape[0], wb.shape[0], x.shape[1])
    # the kernels read grad_h in opmath: the mean's gradient joins it unrounded
    grad_h = torch.zeros_like(h, dtype=_opmath(x.dtype)) if grad_h is None else \
        grad_h.to(_opmath(x.dtype))
    if grad_m is not None:
        grad_h = grad_h + grad_m[..., None] / x.shape[-1]
    grad_x, grad_wb, grad_bb = _backward_op(ctx, attentional_pool_backward)(
        grad_z, grad_h, x, h, wb, ctx.backend)
    return grad_x, grad_wb, grad_bb, None


_register_autograd(attentional_pool, _attpool_backward, _attpool_setup)
_register_backward_op(attentional_pool_backward, "attentional_pool")


# ============================================= weighted spatial pooling (given maps)
_register_kernels("weighted_pool", "attentional_pool", "weighted_pool")


@_custom_op("attnpool::weighted_pool")
def weighted_pool(x: Tensor, h: Tensor, backend: str) -> Tensor:
    """x [B, C, n], h [B, P, n] -> z [B, P, C] = (1/n) Σ_i h[:, :, i] x[:, :, i]."""
    B, C, _ = x.shape
    if B == 0:
        return x.new_empty(0, h.shape[1], C)
    impl = backends.implementation("weighted_pool", backend)
    return impl.forward(_dense_bcn(x), h.contiguous())


@weighted_pool.register_fake
def _(x, h, backend):
    return x.new_empty(x.shape[0], h.shape[1], x.shape[1])


@_custom_op("attnpool::weighted_pool_backward")
def weighted_pool_backward(grad_z: Tensor, x: Tensor, h: Tensor, backend: str
                           ) -> tuple[Tensor, Tensor]:
    """Gradients of weighted_pool w.r.t. x (x's layout) and h."""
    if x.shape[0] == 0:
        return torch.zeros_like(x), torch.zeros_like(h)
    impl = backends.implementation("weighted_pool", backend)
    return impl.backward(grad_z.contiguous(), _dense_bcn(x), h.contiguous())


@weighted_pool_backward.register_fake
def _(grad_z, x, h, backend):
    return torch.empty_like(_dense_bcn(x)), torch.empty_like(h, memory_format=torch.contiguous_format)


def _wpool_setup(ctx, inputs, output):
    x, h, backend = inputs
    ctx.save_for_backward(x, h)
    ctx.backend = backend


def _wpool_backward(ctx, grad_z):
    x, h = ctx.saved_tensors
    grad_x, grad_h = _backward_op(ctx, weighted_pool_backward)(grad_z, x, h, ctx.backend)
    return grad_x, grad_h, None


_register_autograd(weighted_pool, _wpool_backward, _wpool_setup)
_register_backward_op(weighted_pool_backward, "weighted_pool")


# ================================================ spatio-temporal regulariser
_register_kernels("st_regularizer", "st_regularizer", "st_regularizer")


@_custom_op("attnpool::st_regularizer")
def st_regularizer(mask: Tensor, w: Tensor, tv_weight: float, contrast_weight: float,
                   unimodal_weight: float, sqrt: bool, tv_mean: bool, unimodal_mean: bool,
                   backend: str) -> Tensor:
    """Total variation + contrast of mask [B, T, H, W] and unimodality of w [B, T], weighted
    and summed, in one fused kernel -> a 0-dim tensor."""
    if mask.shape[0] == 0:
        return mask.new_zeros(())
    impl = backends.implementation("st_regularizer", backend)
    return impl.forward(mask.contiguous(), w.contiguous(), tv_weight, contrast_weight,
                        unimodal_weight, sqrt, tv_mean, unimodal_mean)


@st_regularizer.register_fake
def _(mask, w, tv_weight, contrast_weight, unimodal_weight, sqrt, tv_mean, unimodal_mean,
      backend):
    return mask.new_empty(())


@_custom_op("attnpool::st_regularizer_backward")
def st_regularizer_backward(grad_total: Tensor, mask: Tensor, w: Tensor, tv_weight: float,
                            contrast_weight: float, unimodal_weight: float, sqrt: bool,
                            tv_mean: bool, unimodal_mean: bool, backend: str
                            ) -> tuple[Tensor, Tensor]:
    """Gradients of st_regularizer w.r.t. mask and w (one fused kernel)."""
    if mask.shape[0] == 0:
        return torch.zeros_like(mask), torch.zeros_like(w)
    impl = backends.implementation("st_regularizer", backend)
    return impl.backward(grad_total.contiguous(), mask.contiguous(), w.contiguous(), tv_weight,
                         contrast_weight, unimodal_weight, sqrt, tv_mean, unimodal_mean)


@st_regularizer_backward.register_fake
def _(grad_total, mask, w, tv_weight, contrast_weight, unimodal_weight, sqrt, tv_mean,
      unimodal_mean, backend):
    return (torch.empty_like(mask, memory_format=torch.contiguous_format),
            torch.empty_like(w, memory_format=torch.contiguous_format))


def _streg_setup(ctx, inputs, output):
    mask, w, *params = inputs
    ctx.save_for_backward(mask, w)
    ctx.params = params


def _streg_backward(ctx, grad_total):
    mask, w = ctx.saved_tensors
    grad_mask, grad_w = _backward_op(ctx, st_regularizer_backward)(grad_total, mask, w, *ctx.params)
    return (grad_mask, grad_w) + (None,) * len(ctx.params)


_register_autograd(st_regularizer, _streg_backward, _streg_setup)
_register_backward_op(st_regularizer_backward, "st_regularizer")


# ============================================= interaction-aware pyramid attention
_register_kernels("pyramid_attention", "pyramid_attention", "pyramid_attention")


@_custom_op("attnpool::pyramid_attention")
def pyramid_attention(xs: list[Tensor], weights: list[Tensor], bias: Tensor, eps: float,
                      lam: float, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused pyramid attention: xs[s] [B, T, C_s, H_s, W_s], weights[s] [C_s], bias [S] ->
    out [B, Σ C_s], loss (0-dim, batch mean), and for the backward the pooled maps
    [B, Σ C_s, n] and the scores y [B, S, n] (opmath), n = T·H·W of the last level."""
    B, T = xs[0].shape[:2]
    Ctot, n = sum(w.shape[0] for w in weights), T * xs[-1].shape[-2] * xs[-1].shape[-1]
    if B == 0:  # the batch mean of nothing, as torch's
        stat = _opmath(xs[0].dtype)
        return (xs[0].new_empty(0, Ctot), xs[0].new_full((), float("nan")),
                xs[0].new_empty(0, Ctot, n, dtype=stat), xs[0].new_empty(0, len(xs), n, dtype=stat))
    impl = backends.implementation("pyramid_attention", backend)
    return impl.forward([x.contiguous() for x in xs], [w.contiguous() for w in weights],
                        bias.contiguous(), eps, lam)


@pyramid_attention.register_fake
def _(xs, weights, bias, eps, lam, backend):
    B, T = xs[0].shape[:2]
    Ctot, n = sum(w.shape[0] for w in weights), T * xs[-1].shape[-2] * xs[-1].shape[-1]
    stat = _opmath(xs[0].dtype)
    return (xs[0].new_empty(B, Ctot), xs[0].new_empty(()), xs[0].new_empty(B, Ctot, n, dtype=stat),
            xs[0].new_empty(B, len(xs), n, dtype=stat))


@_custom_op("attnpool::pyramid_attention_backward")
def pyramid_attention_backward(grad_out: Tensor, grad_loss: Tensor, pooled: Tensor, y: Tensor,
                               weights: list[Tensor], eps: float, lam: float, sizes: list[int],
                               backend: str) -> list[Tensor]:
    """Gradients of pyramid_attention: [grad_xs..., grad_weights..., grad_bias] (S + S + 1
    tensors; sizes = [H_0, W_0, ..., H_{S-1}, W_{S-1}] of the inputs)."""
    impl = backends.implementation("pyramid_attention", backend)
    grad_xs, grad_ws, grad_bias = impl.backward(
        grad_out.contiguous(), grad_loss, pooled.contiguous(), y.contiguous(),
        [w.contiguous() for w in weights], eps, lam, sizes)
    return list(grad_xs) + list(grad_ws) + [grad_bias]


@pyramid_attention_backward.register_fake
def _(grad_out, grad_loss, pooled, y, weights, eps, lam, sizes, backend):
    B, S, n = y.shape
    T = n // (sizes[-2] * sizes[-1])
    return ([grad_out.new_empty(B, T, w.shape[0], sizes[2 * s], sizes[2 * s + 1])
             for s, w in enumerate(weights)]
            + [torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights]
            + [grad_out.new_empty(S)])


def _pyramid_setup(ctx, inputs, output):
    xs, weights, bias, eps, lam, backend = inputs
    _, _, pooled, y = output
    ctx.save_for_backward(pooled, y, bias, *weights)
    ctx.sizes = [d for x in xs for d in x.shape[-2:]]
    ctx.params = (eps, lam, backend)
    ctx.mark_non_differentiable(pooled, y)
    ctx.set_materialize_grads(False)


def _pyramid_backward(ctx, grad_out, grad_loss, grad_pooled, grad_y):
    pooled, y, bias, *weights = ctx.saved_tensors
    S = len(weights)
    eps, lam, backend = ctx.params
    dtype = weights[0].dtype
    if grad_out is None:
        grad_out = pooled.new_zeros(pooled.shape[:2], dtype=dtype)
    if grad_loss is None:
        grad_loss = pooled.new_zeros((), dtype=dtype)
    if pooled.shape[0] == 0:
        B, n = 0, y.shape[-1]
        T = n // (ctx.sizes[-2] * ctx.sizes[-1])
        grad_xs = [grad_out.new_zeros(B, T, w.shape[0], ctx.sizes[2 * s], ctx.sizes[2 * s + 1])
                   for s, w in enumerate(weights)]
        return grad_xs, [torch.zeros_like(w) for w in weights], grad_out.new_zeros(S), None, None, None
    if _legacy_batched((grad_out, grad_loss)):
        grads = _pyramid_backward_by_autograd(grad_out, grad_loss, pooled, bias, weights, eps,
                                              lam, ctx.sizes)
    else:
        grads = _backward_op(ctx, pyramid_attention_backward)(
            grad_out, grad_loss, pooled, y, weights, eps, lam, ctx.sizes, backend)
    return grads[:S], grads[S:2 * S], grads[2 * S], None, None, None


def _pyramid_backward_by_autograd(grad_out, grad_loss, pooled, bias, weights, eps, lam, sizes):
    """The backward through torch's autograd of the reference, from the pooled maps, for the
    legacy vmap's batched gradients (autograd.grad(is_grads_batched=True), as gradcheck's
    batched test uses): its fallback cannot batch an op with tensor-list arguments."""
    B, _, n = pooled.shape
    Ho, Wo = sizes[-2:]
    T = n // (Ho * Wo)
    with torch.enable_grad():
        levels = pooled.detach().split([w.shape[0] for w in weights], dim=1)
        maps = [p.unsqueeze(2).requires_grad_() for p in levels]  # [B, C_s, 1, n]: R = id
        params = [w.detach().to(pooled.dtype).requires_grad_() for w in weights]
        b = bias.detach().to(pooled.dtype).requires_grad_()
        out, loss = reference.pyramid_attention(maps, params, b, eps, lam)
        grads = torch.autograd.grad((out, loss), maps + params + [b], (grad_out, grad_loss))
        grad_xs = []
        for s, g in enumerate(grads[:len(weights)]):  # unpool: the adjoint of R
            C = g.shape[1]
            x = pooled.new_zeros(B * T, C, sizes[2 * s], sizes[2 * s + 1], requires_grad=True)
            r = torch.nn.functional.adaptive_avg_pool2d(x, (Ho, Wo))
            g = g.reshape(B, C, T, Ho, Wo).transpose(1, 2).reshape(B * T, C, Ho, Wo)
            (gx,) = torch.autograd.grad(r, x, g)
            grad_xs.append(gx.reshape(B, T, C, *gx.shape[-2:]))
    dtype = weights[0].dtype
    return [g.to(dtype) for g in grad_xs + list(grads[len(weights):])]


_register_autograd(pyramid_attention, _pyramid_backward, _pyramid_setup, eager=False)
_register_backward_op(pyramid_attention_backward, "pyramid_attention")
