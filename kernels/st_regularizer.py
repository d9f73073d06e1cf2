"""Fused Triton kernels of the spatio-temporal regulariser (Meng et al., ICLR 2019).

Contract: csrc/attnpool.h; executable spec: attnpool.reference.st_regularizer
(total_variation + mask_contrast + unimodality, weighted).

    st_regularizer_forward(mask, w, tv_weight, contrast_weight, unimodal_weight,
                           sqrt, tv_mean, unimodal_mean) -> total (0-dim, mask.dtype)
    st_regularizer_backward(grad_total, mask, w, <same scalars>) -> (grad_mask, grad_w)

mask [B, T, H, W] and w [B, T] are read contiguous (made so if they are not). A "map" is one
(b, t) pair, m = b * T + t: mask's maps are rows of a [B*T, H*W] matrix and w[b, t] = w[m].

Layout of the work: one grid over blocks of maps, cdiv(B*T, BLOCK_M) programs. A program
owns BLOCK_M consecutive maps and loops over their H*W positions in chunks of BLOCK_K
(flattened k = i * W + j, so any H, W >= 1 works; the neighbours k + W, k + 1 are masked at
the map's bottom row / right column). The unimodality term r_t, t = 1..T-2, belongs to map
(b, t): the same programs handle it, so one launch covers all three terms.

forward  ONE kernel: per program, sums of |vertical| + |horizontal| differences (TV), of
         0.5*M*[M<0.5] - 0.5*M*[M>0.5] (contrast) and of r_t (unimodality) over its maps, in
         opmath. With a single program (B*T <= BLOCK_M) it writes total itself; otherwise the
         three per-program partials go to an opmath buffer [3, n_prog] and a second tiny
         one-program kernel sums them in a fixed order and writes total (2 launches in all,
         no torch ops, deterministic, no atomics).
backward ONE kernel, same grid, no partials: every position of a map reads its 4
         neighbours and writes grad_mask once; map (b, s) recomputes q_{s-1}, q_s, q_{s+1}
         from w[s-2..s+2] and writes grad_w[b, s] once.

Precision: accumulation in float32 (float64 for float64 inputs); IEEE division and square
root (tl.math.div_rn / tl.sqrt_rn for float32: tl.sqrt and "/" are approximate for float32
on GPUs; float64 uses tl.sqrt and "/", which are exact). Outputs are rounded once to the
input dtype. Triton passes Python floats as float32, so each weight travels as a float32
pair (hi, lo) with hi + lo = weight to ~48 bits (float64 inputs keep ~1e-14 relative); the
mean divisors B*T and B*(T-2) travel as integers and divide in opmath. The one exception to
opmath: q_t = w[t-1] w[t+1] - w[t]^2, the unimodality term and its slope are in float64 (exact
products for fp32 / fp16 / bf16 inputs, one rounding), since its cancellation near the relu
threshold, magnified by sqrt's slope, would otherwise cost float32 results several digits,
and q of small float32 weights would be a float32 denormal (_q).
NaN / Inf follow torch's autograd of the reference: the contrast of a NaN or +-Inf is NaN
(0.5*M*0), sign(NaN) = 0 in the TV gradient, relu passes NaN (threshold "q <= 0 -> 0").
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import as_scalar, div_rn, sqrt_rn

__all__ = ["st_regularizer_forward", "st_regularizer_backward"]

# Module-level so that tests can force the multi-program / chunked paths. Untuned (no GPU):
# a program handles BLOCK_M maps x BLOCK_K positions = TILE elements per step (7x7 maps:
# BLOCK_K = 64, BLOCK_M = 16); the benchmark shape B*T = 600 gives 38 programs.
MAX_BLOCK_K = 1024
TILE = 1024
REDUCE_BLOCK = 1024
NUM_WARPS = 4


# =============================================================================== helpers
@triton.jit
def _weight(hi, lo, ACC: tl.constexpr):
    """A float64 weight passed as the float32 pair (hi, lo)."""
    return as_scalar(hi, ACC) + as_scalar(lo, ACC)


@triton.jit
def _sign(d):
    """torch.sign: -1, 0 or 1, and 0 for NaN (the gradient of |d| as autograd has it)."""
    return tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0)).to(d.dtype)


@triton.jit
def _q(w_l, w_c, w_r):
    """q = w_l * w_r - w_c^2 (input dtype in, float64 out), formed in float64: the products of
    fp32 / fp16 / bf16 values are exact there, so q is rounded once, as the float64 reference
    has it (q cancels badly near the relu threshold, and sqrt's slope 1 / (2 sqrt(q)) then
    magnifies an opmath q's error far beyond float32 precision). For float64 weights the
    products are rounded on their own, as the reference's: the launchers turn FMA contraction
    off (enable_fp_fusion=False), which would leave w_c^2's rounding error where equal
    weights must give exactly 0. The term and its slope stay in float64 too: q of small
    float32 weights (w ~ 1e-19) would be a float32 denormal."""
    a = w_l.to(tl.float64)
    b = w_c.to(tl.float64)
    c = w_r.to(tl.float64)
    return a * c - b * b


@triton.jit
def _combine(tv, con, u, tv_hi, tv_lo, con_hi, con_lo, u_hi, u_lo, tv_div, con_div, u_div,
             ACC: tl.constexpr):
    """total = tv_w * TV / tv_div + con_w * CON / B + u_w * U / u_div (0-dim opmath)."""
    return (_weight(tv_hi, tv_lo, ACC) * div_rn(tv, as_scalar(tv_div, ACC))
            + _weight(con_hi, con_lo, ACC) * div_rn(con, as_scalar(con_div, ACC))
            + _weight(u_hi, u_lo, ACC) * div_rn(u, as_scalar(u_div, ACC)))


# =============================================================================== forward
@triton.jit
def _st_fwd_kernel(
    mask_ptr, w_ptr, part_ptr, out_ptr,
    BT, T, H, W, HW, n_prog,
    tv_hi, tv_lo, con_hi, con_lo, u_hi, u_lo, tv_div, con_div, u_div,
    SQRT: tl.constexpr, SINGLE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """TV, contrast and unimodality sums of BLOCK_M maps (total itself when SINGLE)."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < BT
    row_base = mask_ptr + offs_m.to(tl.int64)[:, None] * HW  # [BLOCK_M, 1]
    offs_k = tl.arange(0, BLOCK_K)
    tv = tl.zeros([BLOCK_M, BLOCK_K], dtype=ACC)
    con = tl.zeros([BLOCK_M, BLOCK_K], dtype=ACC)
    for k0 in range(0, HW, BLOCK_K):
        k = k0 + offs_k
        i = k // W
        j = k - i * W
        ok = m_mask[:, None] & (k < HW)[None, :]
        dn_ok = ok & (i < H - 1)[None, :]
        rt_ok = ok & (j < W - 1)[None, :]
        ptrs = row_base + k[None, :]
        v = tl.load(ptrs, mask=ok, other=0.0).to(ACC)
        vd = tl.load(ptrs + W, mask=dn_ok, other=0.0).to(ACC)
        vr = tl.load(ptrs + 1, mask=rt_ok, other=0.0).to(ACC)
        tv += tl.where(dn_ok, tl.abs(vd - v), 0.0) + tl.where(rt_ok, tl.abs(vr - v), 0.0)
        # literally as the reference: 0.5*M*low - 0.5*M*high (NaN / Inf give NaN); 0 past the end
        low = (v < 0.5).to(ACC)
        high = (v > 0.5).to(ACC)
        half = 0.5 * v
        con += half * low - half * high
    # ---- unimodality: r_t of map (b, t) for t = 1..T-2
    t = offs_m % T
    u_ok = m_mask & (t >= 1) & (t < T - 1)
    w_l = tl.load(w_ptr + offs_m - 1, mask=u_ok, other=0.0)
    w_c = tl.load(w_ptr + offs_m, mask=u_ok, other=0.0)
    w_r = tl.load(w_ptr + offs_m + 1, mask=u_ok, other=0.0)
    q = _q(w_l, w_c, w_r)
    r = tl.where(q <= 0, 0.0, q)  # relu; NaN stays NaN
    if SQRT:
        r = sqrt_rn(r)
    r = tl.where(u_ok, r, 0.0).to(ACC)
    tv_s = tl.sum(tl.sum(tv, axis=1), axis=0)
    con_s = tl.sum(tl.sum(con, axis=1), axis=0)
    u_s = tl.sum(r, axis=0)
    if SINGLE:
        total = _combine(tv_s, con_s, u_s, tv_hi, tv_lo, con_hi, con_lo, u_hi, u_lo,
                         tv_div, con_div, u_div, ACC)
        tl.store(out_ptr, total.to(out_ptr.dtype.element_ty))
    else:
        tl.store(part_ptr + pid, tv_s)
        tl.store(part_ptr + n_prog + pid, con_s)
        tl.store(part_ptr + 2 * n_prog + pid, u_s)


@triton.jit
def _st_sum_kernel(
    part_ptr, out_ptr, n_prog,
    tv_hi, tv_lo, con_hi, con_lo, u_hi, u_lo, tv_div, con_div, u_div,
    BLOCK_R: tl.constexpr,
):
    """One program: fixed-order sums of the [3, n_prog] partials, weighted into total."""
    ACC = part_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK_R)
    tv = tl.zeros([BLOCK_R], dtype=ACC)
    con = tl.zeros([BLOCK_R], dtype=ACC)
    u = tl.zeros([BLOCK_R], dtype=ACC)
    for r0 in range(0, n_prog, BLOCK_R):
        r = r0 + offs
        ok = r < n_prog
        tv += tl.load(part_ptr + r, mask=ok, other=0.0)
        con += tl.load(part_ptr + n_prog + r, mask=ok, other=0.0)
        u += tl.load(part_ptr + 2 * n_prog + r, mask=ok, other=0.0)
    total = _combine(tl.sum(tv, axis=0), tl.sum(con, axis=0), tl.sum(u, axis=0),
                     tv_hi, tv_lo, con_hi, con_lo, u_hi, u_lo, tv_div, con_div, u_div, ACC)
    tl.store(out_ptr, total.to(out_ptr.dtype.element_ty))


# =============================================================================== backward
@triton.jit
def _st_bwd_kernel(
    gt_ptr, mask_ptr, w_ptr, gm_ptr, gw_ptr,
    BT, T, H, W, HW,
    tv_hi, tv_lo, con_hi, con_lo, u_hi, u_lo, tv_div, con_div, u_div,
    SQRT: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad_mask of BLOCK_M maps (each element from its 4 neighbours) and their grad_w."""
    DT = gm_ptr.dtype.element_ty
    pid = tl.program_id(0)
    g = tl.load(gt_ptr).to(ACC)
    g_tv = div_rn(g * _weight(tv_hi, tv_lo, ACC), as_scalar(tv_div, ACC))
    g_con = div_rn(g * _weight(con_hi, con_lo, ACC), as_scalar(con_div, ACC))
    g_u = div_rn(g * _weight(u_hi, u_lo, ACC), as_scalar(u_div, ACC))
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < BT
    row_off = offs_m.to(tl.int64)[:, None] * HW  # [BLOCK_M, 1]
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, HW, BLOCK_K):
        k = k0 + offs_k
        i = k // W
        j = k - i * W
        ok = m_mask[:, None] & (k < HW)[None, :]
        up_ok = ok & (i > 0)[None, :]
        dn_ok = ok & (i < H - 1)[None, :]
        lf_ok = ok & (j > 0)[None, :]
        rt_ok = ok & (j < W - 1)[None, :]
        off = row_off + k[None, :]
        ptrs = mask_ptr + off
        v = tl.load(ptrs, mask=ok, other=0.0).to(ACC)
        vu = tl.load(ptrs - W, mask=up_ok, other=0.0).to(ACC)
        vd = tl.load(ptrs + W, mask=dn_ok, other=0.0).to(ACC)
        vl = tl.load(ptrs - 1, mask=lf_ok, other=0.0).to(ACC)
        vr = tl.load(ptrs + 1, mask=rt_ok, other=0.0).to(ACC)
        # d|M[k] - M[k-W]|/dM[k] = sign, d|M[k+W] - M[k]|/dM[k] = -sign, same horizontally
        s = (tl.where(up_ok, _sign(v - vu), 0.0) - tl.where(dn_ok, _sign(vd - v), 0.0)
             + tl.where(lf_ok, _sign(v - vl), 0.0) - tl.where(rt_ok, _sign(vr - v), 0.0))
        low = (v < 0.5).to(ACC)
        high = (v > 0.5).to(ACC)
        gm = g_tv * s + g_con * (0.5 * low - 0.5 * high)
        tl.store(gm_ptr + off, gm.to(DT), mask=ok)
    # ---- grad_w[b, s] from the terms t = s-1, s, s+1 (those in 1..T-2) that contain w[s]
    t = offs_m % T
    w_m2 = tl.load(w_ptr + offs_m - 2, mask=m_mask & (t >= 2), other=0.0)
    w_m1 = tl.load(w_ptr + offs_m - 1, mask=m_mask & (t >= 1), other=0.0)
    w_0 = tl.load(w_ptr + offs_m, mask=m_mask, other=0.0)
    w_p1 = tl.load(w_ptr + offs_m + 1, mask=m_mask & (t < T - 1), other=0.0)
    w_p2 = tl.load(w_ptr + offs_m + 2, mask=m_mask & (t < T - 2), other=0.0)
    ok_prev = m_mask & (t >= 2)  # term t-1: w[s] is its w[t+1]
    ok_cur = m_mask & (t >= 1) & (t < T - 1)  # term t: w[s] is its w[t]
    ok_next = m_mask & (t < T - 2)  # term t+1: w[s] is its w[t-1]
    g_u64 = g_u.to(tl.float64)
    gq_prev = _dq(_q(w_m2, w_m1, w_0), g_u64, SQRT)
    gq_cur = _dq(_q(w_m1, w_0, w_p1), g_u64, SQRT)
    gq_next = _dq(_q(w_0, w_p1, w_p2), g_u64, SQRT)
    gw = (tl.where(ok_next, gq_next * w_p2.to(tl.float64), 0.0)
          + tl.where(ok_cur, -gq_cur * (2.0 * w_0.to(tl.float64)), 0.0)
          + tl.where(ok_prev, gq_prev * w_m2.to(tl.float64), 0.0))
    tl.store(gw_ptr + offs_m, gw.to(DT), mask=m_mask)


@triton.jit
def _dq(q, g_u, SQRT: tl.constexpr):
    """d(term)/dq times g_u (float64): relu passes the gradient unless q <= 0 (so NaN passes,
    as torch's threshold_backward); sqrt's slope 1 / (2 sqrt(q))."""
    if SQRT:
        d = div_rn(g_u, 2.0 * sqrt_rn(q))
    else:
        d = g_u + tl.zeros_like(q)
    return tl.where(q <= 0, 0.0, d)


# =============================================================================== host side
def _f32_pair(v: float) -> tuple[float, float]:
    """v as float32 (hi, lo), hi + lo ~= v to ~48 bits (Triton passes floats as float32)."""
    v = float(v)
    try:
        hi = struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:  # beyond float32: the kernel sees +-Inf either way
        return v, 0.0
    lo = v - hi if abs(hi) != float("inf") else 0.0
    return hi, lo


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _setup(mask: Tensor, w: Tensor, tv_weight: float, contrast_weight: float,
           unimodal_weight: float, tv_mean: bool, unimodal_mean: bool):
    B, T, H, W = mask.shape
    BT, HW = B * T, H * W
    block_k = min(triton.next_power_of_2(HW), MAX_BLOCK_K)
    block_m = min(triton.next_power_of_2(max(BT, 1)), max(1, TILE // block_k))
    # divisors of the reference's reductions: mean over max(numel, 1) terms; contrast / B
    tv_div = max(BT, 1) if tv_mean else 1
    u_div = max(B * max(T - 2, 0), 1) if unimodal_mean else 1
    scalars = (*_f32_pair(tv_weight), *_f32_pair(contrast_weight), *_f32_pair(unimodal_weight),
               tv_div, max(B, 1), u_div)  # B = 0: the reference's contrast is 0
    return (B, T, H, W, BT, HW), block_m, block_k, scalars


def st_regularizer_forward(mask: Tensor, w: Tensor, tv_weight: float, contrast_weight: float,
                           unimodal_weight: float, sqrt: bool, tv_mean: bool,
                           unimodal_mean: bool) -> Tensor:
    """mask [B, T, H, W], w [B, T] (mask's dtype) -> total, a 0-dim tensor of mask's dtype.
    B = 0 gives 0 like the reference."""
    mask = mask.contiguous()
    w = w.contiguous()
    (B, T, H, W, BT, HW), block_m, block_k, scalars = _setup(
        mask, w, tv_weight, contrast_weight, unimodal_weight, tv_mean, unimodal_mean)
    acc = torch.float64 if mask.dtype == torch.float64 else torch.float32
    dev = mask.device
    n_prog = max(1, triton.cdiv(BT, block_m))
    single = n_prog == 1
    total = torch.empty((), dtype=mask.dtype, device=dev)
    part = (torch.empty(1, dtype=acc, device=dev) if single  # never read
            else torch.empty(3, n_prog, dtype=acc, device=dev))
    _st_fwd_kernel[(n_prog,)](
        mask, w, part, total, BT, T, H, W, HW, n_prog, *scalars,
        SQRT=bool(sqrt), SINGLE=single, ACC=_acc_dtype(mask.dtype),
        BLOCK_M=block_m, BLOCK_K=block_k, num_warps=NUM_WARPS, enable_fp_fusion=False,
    )
    if not single:
        _st_sum_kernel[(1,)](part, total, n_prog, *scalars, BLOCK_R=REDUCE_BLOCK,
                             num_warps=NUM_WARPS)
    return total


def st_regularizer_backward(grad_total: Tensor, mask: Tensor, w: Tensor, tv_weight: float,
                            contrast_weight: float, unimodal_weight: float, sqrt: bool,
                            tv_mean: bool, unimodal_mean: bool) -> tuple[Tensor, Tensor]:
    """grad_total (0-dim) -> (grad_mask [B, T, H, W], grad_w [B, T]), contiguous, mask's dtype."""
    mask = mask.contiguous()
    w = w.contiguous()
    (B, T, H, W, BT, HW), block_m, block_k, scalars = _setup(
        mask, w, tv_weight, contrast_weight, unimodal_weight, tv_mean, unimodal_mean)
    grad_mask = torch.empty(B, T, H, W, dtype=mask.dtype, device=mask.device)
    grad_w = torch.empty(B, T, dtype=w.dtype, device=w.device)
    if BT == 0:
        return grad_mask, grad_w
    _st_bwd_kernel[(triton.cdiv(BT, block_m),)](
        grad_total, mask, w, grad_mask, grad_w, BT, T, H, W, HW, *scalars,
        SQRT=bool(sqrt), ACC=_acc_dtype(mask.dtype), BLOCK_M=block_m, BLOCK_K=block_k,
        num_warps=NUM_WARPS, enable_fp_fusion=False,
    )
    return grad_mask, grad_w
