"""Fused Triton kernels of the attention-cluster op (softmax pooling + shift + L2 norm).

Contract: csrc/attnpool.h; executable spec: attnpool.reference.cluster_pool.

    cluster_pool_forward(x, scores, lengths, alpha, beta, shift, eps, eps_sqrt)
        -> (out, attn, norm)
    cluster_pool_backward(grad_out, x, attn, norm, alpha, beta, lengths, shift, eps, eps_sqrt)
        -> (grad_x, grad_scores, grad_alpha, grad_beta)

With shift, out = u / (sqrt(N) r), r = max(norm, eps), norm = sqrt(||u||^2 + eps_sqrt) (stored
unclamped). eps_sqrt = 0 is torch's clamp_min form, eps = 0 PaddlePaddle's eps inside the root.

Layout of the work (b = sample, n = attention unit, l = frame, f = feature):

forward  grid (B, cdiv(N, BLOCK_N)): masked softmax of a [BLOCK_N, L] block of scores in
         opmath (attn stored once), then loops over F tiles computing v = a @ x with tl.dot.
         With shift, a first F loop accumulates ||alpha*v + beta||^2 and a second recomputes v
         and writes out once; without shift a single loop writes v and accumulates ||v||^2.
         The [B, N, F] intermediate never reaches memory.
backward kernel 1, grid (B, cdiv(N, BLOCK_N), L chunks): one loop over F tiles recomputes v,
         u = alpha*v + beta and w = u / r (r = max(norm, eps)), and
         accumulates the per-unit scalars (w.g, g.v, sum g, w.v, sum w) together with
         gx = g @ x_c^T and wx = w @ x_c^T for its chunk of frames. Then
         dv = p * (g - k * w) (p = alpha c / r, k = w.g; k = 0 where the norm is clamped)
         gives da = p * (gx - k * wx) and the softmax backward gives grad_scores. It stores
         (p, k, r) [B, N, 3] and per-sample partial grad_alpha / grad_beta [B, N] (summed
         over b by torch afterwards: deterministic, no atomics).
backward kernel 2, grid (B, L chunks, cdiv(F, BLOCK_F)): loop over unit blocks, recompute v,
         dv = p * (g - k * u / r), grad_x_tile += a^T @ dv.
         Without shift dv = g: neither backward kernel recomputes v.

When L fits one block (SINGLE_L) the attention block stays in registers for the whole
kernel. Otherwise frames are processed in chunks of BLOCK_L: the forward uses an online
max / sum for the softmax and recomputes a from scores per chunk; backward kernel 1 then
writes da to a small [B, N, L] opmath scratch and a third tiny kernel does the softmax
backward (so sum_l a_l da_l is reduced exactly like the reference, from the same da).

Accumulation is in float32 (float64 for float64 inputs); tl.dot takes operands in the input
dtype (fp16/bf16 tensor cores; fp32 with input_precision="ieee"; fp64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import block, div_rn, dot_precision, opmath, sqrt_rn

__all__ = ["cluster_pool_forward", "cluster_pool_backward"]

# Caps (BLOCK_N, BLOCK_L, BLOCK_F, num_warps) per kernel and dtype class; blocks are powers of
# two >= 16, shrunk to the problem. lowp / fp64: from an offline ptxas sweep (Triton 3.9, sm_90
# and sm_80) so that no kernel spills registers (at most 32 bytes on sm_80). fp32 ("ieee" dots
# on FMA units): the fastest of 12 tiles per kernel on an H200 (benchmarks/gpu_tune.py, forward
# + backward at B=128, L=25, F=2048, N=64, one kernel varied at a time against the old caps'
# 1.56-1.69 ms: fwd 1.33 ms, bwd_x 1.32 ms; bwd_scores' best 1.62 ms is within that spread, so
# it keeps its caps; benchmarks/NOTES.md), still spill-free.
# Module-level so that tests can force the chunked paths.
CONFIGS = {
    "fwd": {"lowp": (32, 64, 128, 8), "fp32": (16, 64, 64, 4), "fp64": (16, 32, 32, 8)},
    "bwd_scores": {"lowp": (32, 64, 32, 8), "fp32": (16, 32, 32, 8), "fp64": (16, 32, 32, 8)},
    "bwd_x": {"lowp": (32, 64, 128, 8), "fp32": (16, 64, 64, 4), "fp64": (16, 32, 32, 8)},
}

# =============================================================================== helpers
@triton.jit
def _load_scores(s_base, offs_n, n_mask, ll, length, N, ACC: tl.constexpr):
    """scores[b, ll, offs_n] as a [BLOCK_N, BLOCK_L] tile in opmath; -inf past ``length``.

    Padded units (n >= N) read 0 on valid frames so that their softmax stays finite."""
    l_valid = ll < length
    s = tl.load(s_base + ll[None, :] * N + offs_n[:, None],
                mask=n_mask[:, None] & l_valid[None, :], other=0.0).to(ACC)
    return tl.where(l_valid[None, :], s, float("-inf"))


@triton.jit
def _attn_chunk(s_base, offs_n, n_mask, ll, length, N, m, denom, ACC: tl.constexpr):
    """Softmax weights of one chunk of frames from the row max ``m`` and row sum ``denom``."""
    s = _load_scores(s_base, offs_n, n_mask, ll, length, N, ACC)
    e = tl.exp(s - m[:, None])
    return e / denom[:, None]


@triton.jit
def _fwd_v_tile(x_base, s_base, a_dot, offs_n, n_mask, offs_l, f, f_mask, length, L, F, N,
                m, denom, SINGLE_L: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_L: tl.constexpr, BLOCK_F: tl.constexpr, ACC: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """v[n, f] = sum_{l < length} a[n, l] x[l, f] for one F tile (forward)."""
    DT = x_base.dtype.element_ty
    acc = tl.zeros([BLOCK_N, BLOCK_F], dtype=ACC)
    if SINGLE_L:
        l_valid = offs_l < length
        xt = tl.load(x_base + offs_l[:, None] * F + f[None, :],
                     mask=l_valid[:, None] & f_mask[None, :], other=0.0)
        acc = tl.dot(a_dot, xt, acc, input_precision=DOT_PRECISION, out_dtype=ACC)
    else:
        for l0 in range(0, length, BLOCK_L):
            ll = l0 + offs_l
            l_valid = ll < length
            a = _attn_chunk(s_base, offs_n, n_mask, ll, length, N, m, denom, ACC)
            xt = tl.load(x_base + ll[:, None] * F + f[None, :],
                         mask=l_valid[:, None] & f_mask[None, :], other=0.0)
            acc = tl.dot(a.to(DT), xt, acc, input_precision=DOT_PRECISION, out_dtype=ACC)
    return acc


@triton.jit
def _valid_length(len_ptr, b, L, HAS_LENGTHS: tl.constexpr):
    """Sample b's valid frames: lengths[b] clamped to L, or L without lengths. Frames past it
    (attention 0) are never read: a NaN there must reach no gradient as 0 * NaN."""
    if HAS_LENGTHS:
        length = tl.minimum(tl.load(len_ptr + b), L)
    else:
        length = L
    return length


@triton.jit
def _bwd_v_tile(v_base, a_dot, xt, offs_n, n_mask, f, f_mask, F,
                SINGLE_L: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
                ACC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """v[n, f] = sum_{l < length} attn[n, l] x[l, f] for one F tile (backward).

    SINGLE_L: from a_dot [BLOCK_N, BLOCK_L] and the x tile xt [BLOCK_L, BLOCK_F]; else read
    from v (_cluster_v_kernel), computed once: recomputing it in every frame chunk's program
    made the backward's cost grow as L² (24.7 ms at L=300 on an H200, eager 2.9 ms)."""
    if SINGLE_L:
        acc = tl.dot(a_dot, xt, tl.zeros([BLOCK_N, BLOCK_F], dtype=ACC),
                     input_precision=DOT_PRECISION, out_dtype=ACC)
    else:
        acc = tl.load(v_base + offs_n[:, None] * F + f[None, :],
                      mask=n_mask[:, None] & f_mask[None, :], other=0.0)
    return acc


@triton.jit
def _cluster_v_kernel(
    x_ptr, len_ptr, attn_ptr, v_ptr, L, F, N,
    HAS_LENGTHS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_F: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """v[b, n, f] = sum_{l < length} attn[b, n, l] x[b, l, f] (opmath), per (b, unit block,
    F tile), for the backward when the frames span several chunks. Padded frames are never
    read."""
    ACC = v_ptr.dtype.element_ty
    DT = x_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    f = tl.program_id(2) * BLOCK_F + tl.arange(0, BLOCK_F)
    f_mask = f < F
    offs_l = tl.arange(0, BLOCK_L)
    length = _valid_length(len_ptr, b, L, HAS_LENGTHS)
    x_base = x_ptr + b * L * F
    attn_base = attn_ptr + b * N * L
    acc = tl.zeros([BLOCK_N, BLOCK_F], dtype=ACC)
    for l0 in range(0, length, BLOCK_L):
        ll = l0 + offs_l
        l_mask = ll < length
        a = tl.load(attn_base + offs_n[:, None] * L + ll[None, :],
                    mask=n_mask[:, None] & l_mask[None, :], other=0.0)
        xj = tl.load(x_base + ll[:, None] * F + f[None, :],
                     mask=l_mask[:, None] & f_mask[None, :], other=0.0)
        acc = tl.dot(a.to(DT), xj, acc, input_precision=DOT_PRECISION, out_dtype=ACC)
    tl.store(v_ptr + (b * N + offs_n[:, None]) * F + f[None, :], acc,
             mask=n_mask[:, None] & f_mask[None, :])


# =============================================================================== forward
@triton.jit
def _cluster_fwd_kernel(
    x_ptr, s_ptr, len_ptr, alpha_ptr, beta_ptr, eps_ptr,
    out_ptr, attn_ptr, norm_ptr,
    L, F, N,
    SHIFT: tl.constexpr, HAS_LENGTHS: tl.constexpr, SINGLE_L: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_F: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    ACC = eps_ptr.dtype.element_ty
    DT = x_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_l = tl.arange(0, BLOCK_L)
    offs_f = tl.arange(0, BLOCK_F)
    length = _valid_length(len_ptr, b, L, HAS_LENGTHS)
    x_base = x_ptr + b * L * F
    s_base = s_ptr + b * L * N
    attn_base = attn_ptr + b * N * L
    out_base = out_ptr + b * N * F

    # ---- masked softmax over the valid frames; attn written once (exact 0 on padding)
    if SINGLE_L:
        s = _load_scores(s_base, offs_n, n_mask, offs_l, length, N, ACC)
        m = tl.max(s, axis=1)
        e = tl.exp(s - m[:, None])
        denom = tl.sum(e, axis=1)
        a = e / denom[:, None]
        tl.store(attn_base + offs_n[:, None] * L + offs_l[None, :], a,
                 mask=n_mask[:, None] & (offs_l < L)[None, :])
        a_dot = a.to(DT)
    else:
        m = tl.full([BLOCK_N], float("-inf"), ACC)
        denom = tl.zeros([BLOCK_N], dtype=ACC)
        for l0 in range(0, length, BLOCK_L):  # online max / sum
            s = _load_scores(s_base, offs_n, n_mask, l0 + offs_l, length, N, ACC)
            m_new = tl.maximum(m, tl.max(s, axis=1))
            denom = denom * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
            m = m_new
        for l0 in range(0, L, BLOCK_L):
            ll = l0 + offs_l
            a = _attn_chunk(s_base, offs_n, n_mask, ll, length, N, m, denom, ACC)
            tl.store(attn_base + offs_n[:, None] * L + ll[None, :], a,
                     mask=n_mask[:, None] & (ll < L)[None, :])
        a_dot = m  # unused placeholder

    # ---- pooling, shift, L2 norm
    sumsq = tl.zeros([BLOCK_N], dtype=ACC)
    if SHIFT:
        alpha = tl.load(alpha_ptr + offs_n, mask=n_mask, other=0.0).to(ACC)
        beta = tl.load(beta_ptr + offs_n, mask=n_mask, other=0.0).to(ACC)
        for f0 in range(0, F, BLOCK_F):
            f = f0 + offs_f
            f_mask = f < F
            v = _fwd_v_tile(x_base, s_base, a_dot, offs_n, n_mask, offs_l, f, f_mask, length,
                            L, F, N, m, denom, SINGLE_L, BLOCK_N, BLOCK_L, BLOCK_F, ACC,
                            DOT_PRECISION)
            u = alpha[:, None] * v + beta[:, None]
            u = tl.where(f_mask[None, :], u, 0.0)
            sumsq += tl.sum(u * u, axis=1)
        nrm = sqrt_rn(sumsq + tl.load(eps_ptr + 1))  # eps_sqrt
        eps = tl.load(eps_ptr)
        r = tl.where(nrm < eps, eps, nrm)  # max(nrm, eps); NaN stays NaN
        scale = sqrt_rn(tl.zeros([BLOCK_N], dtype=ACC) + N) * r  # sqrt(N) * max(nrm, eps)
        for f0 in range(0, F, BLOCK_F):
            f = f0 + offs_f
            f_mask = f < F
            v = _fwd_v_tile(x_base, s_base, a_dot, offs_n, n_mask, offs_l, f, f_mask, length,
                            L, F, N, m, denom, SINGLE_L, BLOCK_N, BLOCK_L, BLOCK_F, ACC,
                            DOT_PRECISION)
            u = alpha[:, None] * v + beta[:, None]
            o = u / scale[:, None]
            tl.store(out_base + offs_n[:, None] * F + f[None, :], o.to(DT),
                     mask=n_mask[:, None] & f_mask[None, :])
    else:
        for f0 in range(0, F, BLOCK_F):
            f = f0 + offs_f
            f_mask = f < F
            v = _fwd_v_tile(x_base, s_base, a_dot, offs_n, n_mask, offs_l, f, f_mask, length,
                            L, F, N, m, denom, SINGLE_L, BLOCK_N, BLOCK_L, BLOCK_F, ACC,
                            DOT_PRECISION)
            tl.store(out_base + offs_n[:, None] * F + f[None, :], v.to(DT),
                     mask=n_mask[:, None] & f_mask[None, :])
            sumsq += tl.sum(v * v, axis=1)  # padded f: x was 0, so v is 0
        nrm = sqrt_rn(sumsq)
    tl.store(norm_ptr + b * N + offs_n, nrm, mask=n_mask)


# =============================================================================== backward
@triton.jit
def _cluster_bwd_scores_kernel(
    go_ptr, x_ptr, len_ptr, attn_ptr, v_ptr, norm_ptr, alpha_ptr, beta_ptr, eps_ptr, ga_ptr,
    gs_ptr, da_ptr, coef_ptr, pa_ptr, pb_ptr,
    L, F, N,
    SHIFT: tl.constexpr, HAS_LENGTHS: tl.constexpr, SINGLE_L: tl.constexpr,
    HAS_GRAD_ATTN: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_F: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Per (b, unit block, frame chunk): scalars, da = x_c . dv, grad_scores (or da).
    Padded frames (l >= length, a = 0) are never read: a NaN there reaches no gradient."""
    ACC = eps_ptr.dtype.element_ty
    DT = x_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    pid_l = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_l = tl.arange(0, BLOCK_L)
    lc = pid_l * BLOCK_L + offs_l
    lc_mask = lc < L
    length = _valid_length(len_ptr, b, L, HAS_LENGTHS)
    lv_mask = lc < length
    offs_f = tl.arange(0, BLOCK_F)
    x_base = x_ptr + b * L * F
    attn_base = attn_ptr + b * N * L
    go_base = go_ptr + b * N * F
    v_base = v_ptr + b * N * F  # read only when the frames span several chunks

    a_c = tl.load(attn_base + offs_n[:, None] * L + lc[None, :],
                  mask=n_mask[:, None] & lc_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_L]
    a_dot = a_c.to(DT)
    gx = tl.zeros([BLOCK_N, BLOCK_L], dtype=ACC)  # g . x_l
    if SHIFT:
        # out = c u / r with r = max(nrm, eps), c = 1/sqrt(N). With w = u / r:
        #   du = (c/r) (g - k w),  k = w . g  (k = 0 where the norm is clamped),  dv = alpha du,
        # whether nrm holds eps_sqrt or not (dnrm/du = u / nrm in both forms). Normalising
        # first makes F = 1 exact for eps_sqrt = 0 (w = +-1, du = 0) and never forms r^2.
        alpha = tl.load(alpha_ptr + offs_n, mask=n_mask, other=0.0).to(ACC)
        beta = tl.load(beta_ptr + offs_n, mask=n_mask, other=0.0).to(ACC)
        nrm = tl.load(norm_ptr + b * N + offs_n, mask=n_mask, other=1.0)
        eps = tl.load(eps_ptr)
        clamped = nrm < eps  # NaN norm: not clamped, so NaN propagates
        r = tl.where(clamped, eps, nrm)
        r_w = tl.where(clamped, 1.0, r)  # w is unused (k = 0) when clamped: avoid u / eps
        wx = tl.zeros([BLOCK_N, BLOCK_L], dtype=ACC)  # w . x_l
        s_wg = tl.zeros([BLOCK_N], dtype=ACC)
        s_gv = tl.zeros([BLOCK_N], dtype=ACC)
        s_g = tl.zeros([BLOCK_N], dtype=ACC)
        s_wv = tl.zeros([BLOCK_N], dtype=ACC)
        s_w = tl.zeros([BLOCK_N], dtype=ACC)
    for f0 in range(0, F, BLOCK_F):
        f = f0 + offs_f
        f_mask = f < F
        xc = tl.load(x_base + lc[:, None] * F + f[None, :],
                     mask=lv_mask[:, None] & f_mask[None, :], other=0.0)  # [BLOCK_L, BLOCK_F]
        g = tl.load(go_base + offs_n[:, None] * F + f[None, :],
                    mask=n_mask[:, None] & f_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_F]
        xc_t = tl.trans(xc)
        gx = tl.dot(g, xc_t, gx, input_precision=DOT_PRECISION, out_dtype=ACC)
        if SHIFT:
            v = _bwd_v_tile(v_base, a_dot, xc, offs_n, n_mask, f, f_mask, F, SINGLE_L, BLOCK_N,
                            BLOCK_F, ACC, DOT_PRECISION)
            u = alpha[:, None] * v + beta[:, None]
            w = div_rn(u, r_w[:, None])
            w = tl.where(f_mask[None, :], w, 0.0)
            gf = g.to(ACC)
            s_wg += tl.sum(w * gf, axis=1)
            s_gv += tl.sum(gf * v, axis=1)
            s_g += tl.sum(gf, axis=1)
            s_wv += tl.sum(w * v, axis=1)
            s_w += tl.sum(w, axis=1)
            wx = tl.dot(w.to(DT), xc_t, wx, input_precision=DOT_PRECISION, out_dtype=ACC)

    if SHIFT:
        c = 1.0 / sqrt_rn(tl.zeros([BLOCK_N], dtype=ACC) + N)
        k = tl.where(clamped, 0.0, s_wg)
        cr = c / r
        p = alpha * cr  # dv = alpha du = p (g - k w)
        da = p[:, None] * (gx - k[:, None] * wx)
        if pid_l == 0:  # one writer per (b, n)
            tl.store(coef_ptr + (b * N + offs_n) * 3, p, mask=n_mask)
            tl.store(coef_ptr + (b * N + offs_n) * 3 + 1, k, mask=n_mask)
            tl.store(coef_ptr + (b * N + offs_n) * 3 + 2, r_w, mask=n_mask)
            tl.store(pa_ptr + b * N + offs_n, cr * (s_gv - k * s_wv), mask=n_mask)
            tl.store(pb_ptr + b * N + offs_n, cr * (s_g - k * s_w), mask=n_mask)
    else:
        da = gx
    if HAS_GRAD_ATTN:  # the caller's gradient w.r.t. attn joins before the softmax backward
        da += tl.load(ga_ptr + b * N * L + offs_n[:, None] * L + lc[None, :],
                      mask=n_mask[:, None] & lc_mask[None, :], other=0.0).to(ACC)

    if SINGLE_L:
        # softmax backward: a_l (da_l - sum_l' a_l' da_l')
        d = tl.sum(a_c * da, axis=1)
        gs = a_c * (da - d[:, None])
        tl.store(gs_ptr + b * L * N + lc[None, :] * N + offs_n[:, None], gs.to(DT),
                 mask=n_mask[:, None] & lc_mask[None, :])
    else:
        tl.store(da_ptr + b * N * L + offs_n[:, None] * L + lc[None, :], da,
                 mask=n_mask[:, None] & lc_mask[None, :])


@triton.jit
def _softmax_bwd_kernel(attn_ptr, da_ptr, gs_ptr, L, N,
                        BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    """grad_scores[b, l, n] = a (da - sum_l a da) when frames span several chunks."""
    ACC = da_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_l = tl.arange(0, BLOCK_L)
    base = b * N * L + offs_n[:, None] * L
    d = tl.zeros([BLOCK_N], dtype=ACC)
    for l0 in range(0, L, BLOCK_L):
        ll = l0 + offs_l
        msk = n_mask[:, None] & (ll < L)[None, :]
        a = tl.load(attn_ptr + base + ll[None, :], mask=msk, other=0.0)
        da = tl.load(da_ptr + base + ll[None, :], mask=msk, other=0.0)
        d += tl.sum(a * da, axis=1)
    for l0 in range(0, L, BLOCK_L):
        ll = l0 + offs_l
        msk = n_mask[:, None] & (ll < L)[None, :]
        a = tl.load(attn_ptr + base + ll[None, :], mask=msk, other=0.0)
        da = tl.load(da_ptr + base + ll[None, :], mask=msk, other=0.0)
        gs = a * (da - d[:, None])
        tl.store(gs_ptr + b * L * N + ll[None, :] * N + offs_n[:, None],
                 gs.to(gs_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _cluster_bwd_x_kernel(
    go_ptr, x_ptr, len_ptr, attn_ptr, v_ptr, alpha_ptr, beta_ptr, coef_ptr, gx_ptr,
    L, F, N,
    SHIFT: tl.constexpr, HAS_LENGTHS: tl.constexpr, SINGLE_L: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_F: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """grad_x[b, l, f] = sum_n attn[b, n, l] dv[b, n, f], dv formed per unit block."""
    ACC = coef_ptr.dtype.element_ty
    DT = x_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    pid_l = tl.program_id(1)
    pid_f = tl.program_id(2)
    offs_l = tl.arange(0, BLOCK_L)
    lc = pid_l * BLOCK_L + offs_l
    lc_mask = lc < L
    f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    f_mask = f < F
    x_base = x_ptr + b * L * F
    attn_base = attn_ptr + b * N * L
    go_base = go_ptr + b * N * F
    v_base = v_ptr + b * N * F  # read only when the frames span several chunks
    length = _valid_length(len_ptr, b, L, HAS_LENGTHS)

    xc = tl.load(x_base + lc[:, None] * F + f[None, :],
                 mask=(lc < length)[:, None] & f_mask[None, :], other=0.0)
    acc = tl.zeros([BLOCK_L, BLOCK_F], dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        a_c = tl.load(attn_base + offs_n[:, None] * L + lc[None, :],
                      mask=n_mask[:, None] & lc_mask[None, :], other=0.0)
        a_dot = a_c.to(DT)
        nf_mask = n_mask[:, None] & f_mask[None, :]
        g = tl.load(go_base + offs_n[:, None] * F + f[None, :], mask=nf_mask, other=0.0)
        if SHIFT:
            v = _bwd_v_tile(v_base, a_dot, xc, offs_n, n_mask, f, f_mask, F, SINGLE_L, BLOCK_N,
                            BLOCK_F, ACC, DOT_PRECISION)
            alpha = tl.load(alpha_ptr + offs_n, mask=n_mask, other=0.0).to(ACC)
            beta = tl.load(beta_ptr + offs_n, mask=n_mask, other=0.0).to(ACC)
            p = tl.load(coef_ptr + (b * N + offs_n) * 3, mask=n_mask, other=0.0)
            k = tl.load(coef_ptr + (b * N + offs_n) * 3 + 1, mask=n_mask, other=0.0)
            r_w = tl.load(coef_ptr + (b * N + offs_n) * 3 + 2, mask=n_mask, other=1.0)
            u = alpha[:, None] * v + beta[:, None]
            dv = p[:, None] * (g.to(ACC) - k[:, None] * div_rn(u, r_w[:, None]))
            dv = tl.where(nf_mask, dv, 0.0)
            acc = tl.dot(tl.trans(a_dot), dv.to(DT), acc, input_precision=DOT_PRECISION, out_dtype=ACC)
        else:
            acc = tl.dot(tl.trans(a_dot), g, acc, input_precision=DOT_PRECISION, out_dtype=ACC)
    tl.store(gx_ptr + b * L * F + lc[:, None] * F + f[None, :], acc.to(DT),
             mask=lc_mask[:, None] & f_mask[None, :])


# =============================================================================== host side
def _config(kernel: str, dtype: torch.dtype, L: int, F: int, N: int) -> dict:
    kind = {torch.float32: "fp32", torch.float64: "fp64"}.get(dtype, "lowp")
    cap_n, cap_l, cap_f, num_warps = CONFIGS[kernel][kind]
    block_l = block(L, cap_l)
    return dict(BLOCK_N=block(N, cap_n), BLOCK_L=block_l, BLOCK_F=block(F, cap_f),
                SINGLE_L=L <= block_l, num_warps=num_warps)


def cluster_pool_forward(x: Tensor, scores: Tensor, lengths: Tensor | None, alpha: Tensor,
                         beta: Tensor, shift: bool, eps: float, eps_sqrt: float
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """x [B, L, F], scores [B, L, N] (opmath) -> out [B, N*F] (x.dtype), attn [B, N, L], norm
    [B, N] (opmath)."""
    B, L, F = x.shape
    N = scores.shape[-1]
    acc = opmath(x.dtype)
    out = torch.empty(B, N * F, dtype=x.dtype, device=x.device)
    attn = torch.empty(B, N, L, dtype=acc, device=x.device)
    norm = torch.empty(B, N, dtype=acc, device=x.device)
    eps_t = torch.tensor([eps, eps_sqrt], dtype=acc, device=x.device)  # exact for float64
    has_lengths = lengths is not None
    len_arg = lengths if has_lengths else eps_t  # never read without lengths
    cfg = _config("fwd", x.dtype, L, F, N)
    grid = (B, triton.cdiv(N, cfg["BLOCK_N"]))
    _cluster_fwd_kernel[grid](
        x, scores, len_arg, alpha, beta, eps_t, out, attn, norm, L, F, N,
        SHIFT=bool(shift), HAS_LENGTHS=has_lengths, DOT_PRECISION=dot_precision(x.dtype), **cfg,
    )
    return out, attn, norm


def cluster_pool_backward(grad_out: Tensor, x: Tensor, attn: Tensor, norm: Tensor,
                          alpha: Tensor, beta: Tensor, lengths: Tensor | None, shift: bool,
                          eps: float, eps_sqrt: float, *, grad_attn: Tensor | None = None
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients w.r.t. x [B, L, F], scores [B, L, N], alpha [N], beta [N] (x.dtype).
    Frames past ``lengths`` are never read; their gradients are 0. ``eps_sqrt`` is already in
    the forward's ``norm``, which these kernels read instead of recomputing it.

    ``grad_attn`` (optional, [B, N, L], any float dtype): a gradient w.r.t. the returned
    attention, folded into the one softmax backward (grad_scores = a (da + grad_attn - sum)),
    which is better conditioned than adding a second softmax backward afterwards."""
    B, L, F = x.shape
    N = attn.shape[1]
    acc = opmath(x.dtype)
    dev = x.device
    shift = bool(shift)
    prec = dot_precision(x.dtype)
    cs = _config("bwd_scores", x.dtype, L, F, N)
    cx = _config("bwd_x", x.dtype, L, F, N)
    single_l = cs["SINGLE_L"]
    eps_t = torch.full((1,), eps, dtype=acc, device=dev)
    grad_x = torch.empty_like(x)
    grad_scores = torch.empty(B, L, N, dtype=x.dtype, device=dev)
    coef = torch.empty(B, N, 3, dtype=acc, device=dev) if shift else eps_t  # p, k, r
    pa = torch.empty(B, N, dtype=acc, device=dev) if shift else eps_t
    pb = torch.empty(B, N, dtype=acc, device=dev) if shift else eps_t
    da = eps_t if single_l else torch.empty(B, N, L, dtype=acc, device=dev)
    ga = eps_t if grad_attn is None else grad_attn.contiguous()
    n_lc = triton.cdiv(L, cs["BLOCK_L"])  # 1 when SINGLE_L
    has_lengths = lengths is not None
    len_arg = lengths if has_lengths else eps_t  # never read without lengths
    v = eps_t  # the pooled rows, formed once where frames span several chunks (_bwd_v_tile)
    if shift and not (single_l and cx["SINGLE_L"]):
        v = torch.empty(B, N, F, dtype=acc, device=dev)
        _cluster_v_kernel[(B, triton.cdiv(N, cs["BLOCK_N"]), triton.cdiv(F, cs["BLOCK_F"]))](
            x, len_arg, attn, v, L, F, N, HAS_LENGTHS=has_lengths, BLOCK_N=cs["BLOCK_N"],
            BLOCK_L=cs["BLOCK_L"], BLOCK_F=cs["BLOCK_F"], DOT_PRECISION=prec,
            num_warps=cs["num_warps"])
    _cluster_bwd_scores_kernel[(B, triton.cdiv(N, cs["BLOCK_N"]), n_lc)](
        grad_out, x, len_arg, attn, v, norm, alpha, beta, eps_t, ga, grad_scores, da, coef, pa,
        pb,
        L, F, N, SHIFT=shift, HAS_LENGTHS=has_lengths, HAS_GRAD_ATTN=grad_attn is not None,
        DOT_PRECISION=prec, **cs,
    )
    if not single_l:
        _softmax_bwd_kernel[(B, triton.cdiv(N, cs["BLOCK_N"]))](
            attn, da, grad_scores, L, N, BLOCK_N=cs["BLOCK_N"], BLOCK_L=cs["BLOCK_L"],
            num_warps=4)
    grid_x = (B, triton.cdiv(L, cx["BLOCK_L"]), triton.cdiv(F, cx["BLOCK_F"]))
    _cluster_bwd_x_kernel[grid_x](
        grad_out, x, len_arg, attn, v, alpha, beta, coef, grad_x, L, F, N,
        SHIFT=shift, HAS_LENGTHS=has_lengths, DOT_PRECISION=prec, **cx,
    )
    if shift:
        grad_alpha = pa.sum(0).to(alpha.dtype)  # fixed-order reduction over b
        grad_beta = pb.sum(0).to(beta.dtype)
    else:
        grad_alpha = torch.zeros_like(alpha)
        grad_beta = torch.zeros_like(beta)
    return grad_x, grad_scores, grad_alpha, grad_beta
