"""Fused Triton kernels of the interaction-aware pyramid attention (Du et al., ECCV 2018; our
formulation, docs/design.md "Pyramid attention").

Contract (forward and backward formulas): csrc/attnpool.h; executable spec:
attnpool.reference.pyramid_attention.

    pyramid_attention_forward(xs, weights, bias, eps, lam) -> (out, loss, pooled, y)
    pyramid_attention_backward(grad_out, grad_loss, pooled, y, weights, eps, lam, sizes)
        -> (grad_xs, grad_weights, grad_bias)

xs[s] [B, T, C_s, H_s, W_s] (one dtype), weights[s] [C_s], bias [S]. Ho, Wo = the last level's
H, W; n = T*Ho*Wo, position i = t*Ho*Wo + oh*Wo + ow; level s owns the channels
offs[s] .. offs[s]+C_s-1 of Ctot = sum C_s. R = adaptive average pooling of every frame to
Ho x Wo (torch's windows [floor(o*In/Out), ceil((o+1)*In/Out)), which may repeat rows when
H_s < Ho and overlap when sizes do not divide). Per sample, P_s = R(X_s) [C_s, n]:
    y_s = w_s^T P_s + bias_s, yh_s = y_s / max(||y_s||, eps), a = softmax(sum_s y_s),
    out_s = P_s a, u_s = P_s (yh_s - sig_s / n) with sig_s = sum_i yh_s[i], G = Yh Yh^T,
    loss_b = -(1/S) sum_s ||u_s||^2 / C_s + lam sum_{s != t} G_st^2, loss = mean_b loss_b.
(u_s = P_s yh_s - mu_s sig_s as in the contract, summed in its centred form, which is the
same value without the cancellation of the two terms.)

Layout of the work (b = sample, s = level, c = channel, i = position):

forward  1. _pool_kernel, one launch per level, 1-D grid of B*T x cdiv(Ho*Wo, BLOCK_O) x
            cdiv(C_s, BLOCK_C) programs (axis 0 only: axes 1, 2 stop at 65535, which B*T or
            the tiles of a large map exceed): a [BLOCK_C, BLOCK_O] tile of output cells loops
            over the largest window (KH x KW, host-computed) with masks, sums in opmath,
            divides by the cell's window size and writes its slice of pooled [B, Ctot, n] once.
         2. _head_fwd_kernel, grid (B,), loops over the levels (offsets and sizes from a small
            int tensor; the weights concatenated to [Ctot]):
              pass A, over position blocks: y_s for every level (stored), the Gram matrix of
                the raw y (its diagonal gives ||y_s||^2), sum_i y_s[i] and an online max / sum
                of the softmax of sum_s y_s;
              pass B, over levels x channel blocks, looping over positions: out = P a and
                u_s, and with them the per-sample loss (stored to an opmath [B] buffer).
            Pass B reads back the y that pass A stored (tl.debug_barrier in between).
         3. _batch_sum_kernel, one program: loss = sum_b loss_b / B in a fixed order.
backward 1. _head_bwd_kernel, grid (B,):
              phase 1: the statistics of y (same code as the forward's pass A, so the same
                values): Gram, norms, sig, softmax max / sum -> rr_s, sig_s / n stored;
              phase 2, levels x channel blocks over positions: u_s and mu_s; stores
                kappa_s u_s and mu_s [B, 2, Ctot];
              phase 3, over position blocks: ga = sum_s gz_s^T (P_s - mu_s) and
                gyh_s = kappa_s u_s^T (P_s - mu_s) + 4 lam gl sum_{t != s} G_st yh_t
                (both stored into the scratch wk [B, S + 1, n]), with yh_s.gyh_s and
                sum_i a_i ga_i (centring P changes neither ge = a (ga - a.ga) nor gyh_s
                mathematically, since sum_i a_i = 1, and avoids their cancellation when
                channel means dominate);
              phase 4, over position blocks: gy_s = ge + (gyh_s - yh_s (yh_s.gyh_s)) / r_s
                (gyh_s / eps when r_s < eps) into gy and a into its own buffer (phases read
                and write different buffers: a load and a store of the same addresses in one
                phase would race between the threads holding replicated copies of a tile);
                the grad_bias partial sum_i gy_s[i] in closed form (its ge and kappa parts
                sum to 0 exactly: summing gy would leave only their rounding noise), plus
                sum_i 0 * gy_s[i] so that NaN / inf (e.g. in grad_out) propagate as in the
                spec;
              phase 5, levels x channel blocks over positions: grad_weights partial
                sum_i gy_s[i] P_s[c, i], summed as sum_i gy_s[i] (P_s[c, i] - mu_s[c]) +
                mu_s[c] (grad_bias partial), so that the gy sum's noise is not multiplied
                by the channel's mean.
            Every phase that reads what an earlier phase of the same program stored
            follows a tl.debug_barrier. Partials go to an opmath [B, Ctot + S] buffer.
         2. _batch_sum_kernel: grad_weights / grad_bias = sum over b of the partials, in a
            fixed order (deterministic, no atomics).
         3. _unpool_kernel, one launch per level, 1-D grid of B*T x cdiv(H_s*W_s, BLOCK_K) x
            cdiv(C_s, BLOCK_C) programs (as the pooling's): every input pixel loops over the
            output cells whose window holds it (contiguous ranges [floor(h*Ho/H),
            floor(((h+1)*Ho-1)/H)], at most KH x KW of them, host-computed) and sums
            dP[c, i] / |window(i)|, dP = gz a^T + w gy_s^T + (kappa_s u_s)(yh_s - sig_s/n)^T
            formed on the fly (rank 3, never materialised). grad_xs[s] is written exactly once
            (no zero fill, no atomics).
Nothing of size n x n or S x C x n is materialised beyond pooled; scratch is O(B (S n + Ctot)).

Precision: accumulation in float32 (float64 for float64 inputs), pooled and y in that opmath;
IEEE division and square root (common.div_rn / sqrt_rn); outputs rounded once to xs' dtype.
eps and lam travel as an opmath tensor (exact for float64; it and the level table are
cached device tensors, so that calls with the same values copy nothing); grad_loss is read from its tensor
and divided by B in opmath. As in the spec, r_s >= eps selects the projected gradient (a NaN
norm is not clamped, so NaN propagates). Where the spec's sums cancel in rounding (channel
means, and the exact zeros in grad_bias), the kernels sum mathematically equal centred or
closed forms (see phases 3-5), which keeps float32 results near float32 precision.

The head kernels read back, in a later phase, global memory that an earlier phase of the same
program wrote (y in the forward; kappa u, mu, gyh, ga, gy in the backward), never the same
phase's own stores (no phase overwrites what it reads). tl.debug_barrier
(bar.sync) makes a block's global stores visible to all its threads; no other program touches
those rows, so no grid-wide synchronisation is needed.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import as_scalar, block, div_rn, opmath, sqrt_rn

__all__ = ["pyramid_attention_forward", "pyramid_attention_backward"]

# Block caps (powers of two >= 16), module-level so that tests can force the looped paths.
# Pooling tiles of BLOCK_C x BLOCK_O cells, head tiles of BLOCK_C x BLOCK_N pooled values,
# unpooling tiles of BLOCK_C x BLOCK_K pixels. Not tuned for speed (no GPU yet); an sm_90 AOT
# compile (Triton 3.9, ptxas -v, 4 warps) shows no register spills in fp32 / fp64 for S <= 8,
# except 4 bytes in the fp64 backward head at BLOCK_S = 8 (head tiles of 32 x 128 spilled up
# to 2 KB in fp64).
MAX_BLOCK_C = 32
MAX_BLOCK_O = 64
MAX_BLOCK_N = 64
MAX_BLOCK_K = 64
REDUCE_BLOCK = 256
NUM_WARPS = 4


# =============================================================================== helpers
@triton.jit
def _pick(vec, idx, s):
    """vec[s] of a small per-level vector, as a 0-dim value."""
    return tl.sum(tl.where(idx == s, vec, 0.0), axis=0)


@triton.jit
def _row(tile, idx, s):
    """Row s of a [BLOCK_S, X] tile."""
    return tl.sum(tl.where(idx[:, None] == s, tile, 0.0), axis=0)


@triton.jit
def _tile_ids(n_ct, n_pt):
    """(frame b*T + t as int64, channel tile, pixel tile) of this program: the grid is 1-D
    (axis 0 allows 2^31 - 1 programs; axes 1 and 2 only 65535, which B*T or the pixel tiles
    of a large map can exceed), channel tiles varying fastest, then pixel tiles."""
    pid = tl.program_id(0).to(tl.int64)
    ct = pid % n_ct
    rest = pid // n_ct
    pt = rest % n_pt
    bt = rest // n_pt
    return bt, ct.to(tl.int32), pt.to(tl.int32)


@triton.jit
def _load_y(y_base, sidx, s_ok, i, i_ok, n):
    """y[b, :, i] of one position block as a [BLOCK_S, BLOCK_N] tile, 0 outside."""
    return tl.load(y_base + sidx[:, None] * n + i[None, :],
                   mask=s_ok[:, None] & i_ok[None, :], other=0.0)


@triton.jit
def _load_p(p_base, off, c, c_ok, i, i_ok, n):
    """pooled[b, off + c, i] as a [BLOCK_C, BLOCK_N] tile, 0 outside."""
    return tl.load(p_base + (off + c)[:, None].to(tl.int64) * n + i[None, :],
                   mask=c_ok[:, None] & i_ok[None, :], other=0.0)


@triton.jit
def _y_stats(ytile, i_ok, sidx, S, gram, ysum, m, denom):
    """Accumulate over one position block: the Gram matrix of the raw y (rows y_s . y_t),
    sum_i y_s[i], and the online max / sum of exp of z = sum_s y_s (padding gives -inf)."""
    for s in range(S):
        ys = _row(ytile, sidx, s)
        gram += tl.where(sidx[:, None] == s, tl.sum(ytile * ys[None, :], axis=1)[None, :], 0.0)
    ysum += tl.sum(ytile, axis=1)
    z = tl.where(i_ok, tl.sum(ytile, axis=0), float("-inf"))
    m_new = tl.maximum(m, tl.max(z, axis=0))
    denom = denom * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
    return gram, ysum, m_new, denom


@triton.jit
def _finish_stats(gram, ysum, sidx, s_ok, eps):
    """-> r = ||y_s||, rr = max(r, eps) (1 on padding levels), sig = sum_i yh_s[i] and
    G = Yh Yh^T from the accumulated Gram matrix and sums."""
    diag = sidx[:, None] == sidx[None, :]
    r = sqrt_rn(tl.sum(tl.where(diag, gram, 0.0), axis=1))
    rr = tl.where(r < eps, eps, r)  # max(r, eps); NaN stays NaN
    rr = tl.where(s_ok, rr, 1.0)
    sig = div_rn(ysum, rr)
    G = div_rn(div_rn(gram, rr[:, None]), rr[None, :])
    return r, rr, sig, G


@triton.jit
def _centred_yh(y_base, s, i, i_ok, n, rr_s, sig_n):
    """yh_s[i] - sig_s / n for one position block (0 outside)."""
    ys = tl.load(y_base + s * n + i, mask=i_ok, other=0.0)
    return tl.where(i_ok, div_rn(ys, rr_s) - sig_n, 0.0)


# =============================================================================== forward
@triton.jit
def _pool_kernel(
    x_ptr, p_ptr, off, C, T, H, W, Ho, Wo, n, Ctot, KH, KW,
    BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """pooled[b, off + c, t*Ho*Wo + o] = mean of frame (b, t)'s window o, for a tile of
    channels x output cells (windows walked up to their largest size KH x KW, masked)."""
    ACC = p_ptr.dtype.element_ty
    HoWo = Ho * Wo
    bt, ct, ot = _tile_ids(tl.cdiv(C, BLOCK_C), tl.cdiv(HoWo, BLOCK_O))
    b = bt // T
    t = bt - b * T
    c = ct * BLOCK_C + tl.arange(0, BLOCK_C)
    o = ot * BLOCK_O + tl.arange(0, BLOCK_O)
    c_ok = c < C
    o_ok = o < HoWo
    oh = o // Wo
    ow = o - oh * Wo
    hs = oh * H // Ho
    he = ((oh + 1) * H + Ho - 1) // Ho
    ws = ow * W // Wo
    we = ((ow + 1) * W + Wo - 1) // Wo
    x_base = x_ptr + (bt * C + c)[:, None] * (H * W)  # [BLOCK_C, 1]
    acc = tl.zeros([BLOCK_C, BLOCK_O], dtype=ACC)
    for dh in range(KH):
        h = hs + dh
        h_ok = o_ok & (h < he)
        for dw in range(KW):
            w = ws + dw
            ok = h_ok & (w < we)
            v = tl.load(x_base + (h * W + w)[None, :], mask=c_ok[:, None] & ok[None, :],
                        other=0.0)
            acc += v.to(ACC)
    cnt = tl.where(o_ok, (he - hs) * (we - ws), 1).to(ACC)
    p_off = (b * Ctot + off + c)[:, None] * n + (t * HoWo + o)[None, :]
    tl.store(p_ptr + p_off, div_rn(acc, cnt[None, :]), mask=c_ok[:, None] & o_ok[None, :])


@triton.jit
def _head_fwd_kernel(
    p_ptr, w_ptr, bias_ptr, meta_ptr, scal_ptr, y_ptr, out_ptr, lossb_ptr,
    S, n, Ctot,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One sample: y, out and loss_b from pooled (see the module docstring, passes A, B)."""
    ACC = p_ptr.dtype.element_ty
    DT = out_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    p_base = p_ptr + b * Ctot * n
    y_base = y_ptr + b * S * n
    sidx = tl.arange(0, BLOCK_S)
    s_ok = sidx < S
    offs_c = tl.arange(0, BLOCK_C)
    offs_n = tl.arange(0, BLOCK_N)
    eps = tl.load(scal_ptr)
    lam = tl.load(scal_ptr + 1)
    nf = as_scalar(n, ACC)

    # ---- pass A: y (stored), its Gram matrix and sums, softmax max / sum
    gram = tl.zeros([BLOCK_S, BLOCK_S], dtype=ACC)
    ysum = tl.zeros([BLOCK_S], dtype=ACC)
    m = tl.max(tl.full([BLOCK_S], float("-inf"), ACC), axis=0)
    denom = tl.sum(tl.zeros([BLOCK_S], dtype=ACC), axis=0)
    for n0 in range(0, n, BLOCK_N):
        i = n0 + offs_n
        i_ok = i < n
        ytile = tl.zeros([BLOCK_S, BLOCK_N], dtype=ACC)
        for s in range(S):
            off = tl.load(meta_ptr + s)
            C = tl.load(meta_ptr + S + s)
            ys = tl.zeros([BLOCK_N], dtype=ACC)
            for c0 in range(0, C, BLOCK_C):
                c = c0 + offs_c
                c_ok = c < C
                w = tl.load(w_ptr + off + c, mask=c_ok, other=0.0).to(ACC)
                ys += tl.sum(w[:, None] * _load_p(p_base, off, c, c_ok, i, i_ok, n), axis=0)
            ys = tl.where(i_ok, ys + tl.load(bias_ptr + s).to(ACC), 0.0)
            tl.store(y_base + s * n + i, ys, mask=i_ok)
            ytile = tl.where(sidx[:, None] == s, ys[None, :], ytile)
        gram, ysum, m, denom = _y_stats(ytile, i_ok, sidx, S, gram, ysum, m, denom)
    r, rr, sig, G = _finish_stats(gram, ysum, sidx, s_ok, eps)
    off_diag = (sidx[:, None] != sidx[None, :]) & s_ok[:, None] & s_ok[None, :]
    penalty = tl.sum(tl.sum(tl.where(off_diag, G * G, 0.0), axis=1), axis=0)
    tl.debug_barrier()  # pass B reads the y stored above

    # ---- pass B: out = P a and u_s = P_s (yh_s - sig_s / n), level by level
    variance = tl.sum(tl.zeros([BLOCK_S], dtype=ACC), axis=0)
    for s in range(S):
        off = tl.load(meta_ptr + s)
        C = tl.load(meta_ptr + S + s)
        rr_s = _pick(rr, sidx, s)
        sig_n = div_rn(_pick(sig, sidx, s), nf)
        usq = tl.sum(tl.zeros([BLOCK_S], dtype=ACC), axis=0)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + offs_c
            c_ok = c < C
            acc_o = tl.zeros([BLOCK_C], dtype=ACC)
            u = tl.zeros([BLOCK_C], dtype=ACC)
            for n0 in range(0, n, BLOCK_N):
                i = n0 + offs_n
                i_ok = i < n
                p = _load_p(p_base, off, c, c_ok, i, i_ok, n)
                z = tl.sum(_load_y(y_base, sidx, s_ok, i, i_ok, n), axis=0)
                e = tl.where(i_ok, tl.exp(z - m), 0.0)  # a * denom
                acc_o += tl.sum(p * e[None, :], axis=1)
                u += tl.sum(p * _centred_yh(y_base, s, i, i_ok, n, rr_s, sig_n)[None, :], axis=1)
            out = div_rn(acc_o, denom)
            tl.store(out_ptr + b * Ctot + off + c, out.to(DT), mask=c_ok)
            usq += tl.sum(u * u, axis=0)
        variance += div_rn(usq, as_scalar(C, ACC))
    loss_b = lam * penalty - div_rn(variance, as_scalar(S, ACC))
    tl.store(lossb_ptr + b, loss_b)


@triton.jit
def _batch_sum_kernel(part_ptr, out_ptr, B, K, div, BLOCK_K: tl.constexpr):
    """out[k] = sum_b part[b, k] / div, b in increasing order (deterministic)."""
    ACC = part_ptr.dtype.element_ty
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = k < K
    acc = tl.zeros([BLOCK_K], dtype=ACC)
    for bb in range(B):
        acc += tl.load(part_ptr + bb * K + k, mask=ok, other=0.0)
    tl.store(out_ptr + k, div_rn(acc, as_scalar(div, ACC)).to(out_ptr.dtype.element_ty), mask=ok)


# =============================================================================== backward
@triton.jit
def _head_bwd_kernel(
    go_ptr, gl_ptr, p_ptr, y_ptr, w_ptr, meta_ptr, scal_ptr,
    wk_ptr, gy_ptr, a_ptr, ku_ptr, stats_ptr, part_ptr,
    B, S, n, Ctot,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One sample: gy [S, n], kappa_s u_s [Ctot], a [n], (rr_s, sig_s / n) and the partials
    of grad_weights / grad_bias (see the module docstring, phases 1-5). wk [S + 1, n] is
    scratch: gyh_s (rows 0..S-1) and ga (row S), which phase 3 writes and phase 4 reads."""
    ACC = p_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    p_base = p_ptr + b * Ctot * n
    y_base = y_ptr + b * S * n
    gy_base = gy_ptr + b * S * n
    gyh_base = wk_ptr + b * (S + 1) * n  # gyh_s, then ga
    ga_base = gyh_base + S * n
    a_base = a_ptr + b * n
    ku_base = ku_ptr + b * 2 * Ctot  # kappa_s u_s, then mu_s
    go_base = go_ptr + b * Ctot
    part_base = part_ptr + b * (Ctot + S)
    sidx = tl.arange(0, BLOCK_S)
    s_ok = sidx < S
    offs_c = tl.arange(0, BLOCK_C)
    offs_n = tl.arange(0, BLOCK_N)
    eps = tl.load(scal_ptr)
    lam = tl.load(scal_ptr + 1)
    nf = as_scalar(n, ACC)
    gl = div_rn(tl.load(gl_ptr).to(ACC), as_scalar(B, ACC))
    zero = tl.sum(tl.zeros([BLOCK_S], dtype=ACC), axis=0)

    # ---- phase 1: statistics of y (as the forward's pass A)
    gram = tl.zeros([BLOCK_S, BLOCK_S], dtype=ACC)
    ysum = tl.zeros([BLOCK_S], dtype=ACC)
    m = tl.max(tl.full([BLOCK_S], float("-inf"), ACC), axis=0)
    denom = zero
    for n0 in range(0, n, BLOCK_N):
        i = n0 + offs_n
        i_ok = i < n
        ytile = _load_y(y_base, sidx, s_ok, i, i_ok, n)
        gram, ysum, m, denom = _y_stats(ytile, i_ok, sidx, S, gram, ysum, m, denom)
    r, rr, sig, G = _finish_stats(gram, ysum, sidx, s_ok, eps)
    sig_n = div_rn(sig, nf)
    tl.store(stats_ptr + b * 2 * S + sidx, rr, mask=s_ok)
    tl.store(stats_ptr + b * 2 * S + S + sidx, sig_n, mask=s_ok)

    # ---- phase 2: u_s, mu_s -> kappa_s u_s and mu_s (stored)
    for s in range(S):
        off = tl.load(meta_ptr + s)
        C = tl.load(meta_ptr + S + s)
        kappa = div_rn(-2.0 * gl, as_scalar(S * C, ACC))
        rr_s = _pick(rr, sidx, s)
        sig_n_s = _pick(sig_n, sidx, s)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + offs_c
            c_ok = c < C
            u = tl.zeros([BLOCK_C], dtype=ACC)
            acc_p = tl.zeros([BLOCK_C], dtype=ACC)
            for n0 in range(0, n, BLOCK_N):
                i = n0 + offs_n
                i_ok = i < n
                p = _load_p(p_base, off, c, c_ok, i, i_ok, n)
                u += tl.sum(p * _centred_yh(y_base, s, i, i_ok, n, rr_s, sig_n_s)[None, :], axis=1)
                acc_p += tl.sum(p, axis=1)
            mu = div_rn(acc_p, nf)
            tl.store(ku_base + off + c, kappa * u, mask=c_ok)
            tl.store(ku_base + Ctot + off + c, mu, mask=c_ok)
    tl.debug_barrier()  # phase 3 reads kappa u and mu

    # ---- phase 3: gyh_s and ga (into wk), yh_s . gyh_s and sum_i a_i ga_i
    dots = tl.zeros([BLOCK_S], dtype=ACC)
    aga = zero
    for n0 in range(0, n, BLOCK_N):
        i = n0 + offs_n
        i_ok = i < n
        ytile = _load_y(y_base, sidx, s_ok, i, i_ok, n)
        yh = div_rn(ytile, rr[:, None])
        a = tl.where(i_ok, div_rn(tl.exp(tl.sum(ytile, axis=0) - m), denom), 0.0)
        ga = tl.zeros([BLOCK_N], dtype=ACC)
        for s in range(S):
            off = tl.load(meta_ptr + s)
            C = tl.load(meta_ptr + S + s)
            kup = tl.zeros([BLOCK_N], dtype=ACC)
            for c0 in range(0, C, BLOCK_C):
                c = c0 + offs_c
                c_ok = c < C
                p = _load_p(p_base, off, c, c_ok, i, i_ok, n)
                gz = tl.load(go_base + off + c, mask=c_ok, other=0.0).to(ACC)
                ku = tl.load(ku_base + off + c, mask=c_ok, other=0.0)
                mu = tl.load(ku_base + Ctot + off + c, mask=c_ok, other=0.0)
                # centred (P - mu): with sum_i a_i = 1 the softmax backward
                # ga - a.ga and u^T P - u.mu are unchanged by it, and they cancel badly in
                # rounding when the channels' means dominate their variation
                pc = p - mu[:, None]
                ga += tl.sum(gz[:, None] * pc, axis=0)
                kup += tl.sum(ku[:, None] * pc, axis=0)
            g_s = tl.where(sidx != s, _row(G, sidx, s), 0.0)  # G_st, t != s
            inter = tl.sum(g_s[:, None] * yh, axis=0)
            gyh = kup + 4.0 * lam * gl * inter
            gyh = tl.where(i_ok, gyh, 0.0)
            tl.store(gyh_base + s * n + i, gyh, mask=i_ok)
            dots += tl.where(sidx == s, tl.sum(_row(yh, sidx, s) * gyh, axis=0), 0.0)
        ga = tl.where(i_ok, ga, 0.0)
        tl.store(ga_base + i, ga, mask=i_ok)
        aga += tl.sum(a * ga, axis=0)
    tl.debug_barrier()  # phase 4 reads gyh and ga

    # ---- phase 4: gy = ge + d yh / d y (gyh) (into gy), a (into a). Each reads wk and
    # writes other buffers: a load and a store of the same addresses in one block would
    # race (threads holding replicated copies of a tile may load after another's store).
    proj = tl.where(r >= eps, dots, 0.0)  # below eps, yh = y / eps: no projection
    # grad_bias partial sum_i gy_s[i] in closed form: sum_i ge_i = aga (1 - sum_i a_i) = 0 and
    # the kappa part of sum_i gyh_s[i] is kappa sum_c u_c (n mu_c - n mu_c) = 0, which leaves
    # (4 lam gl sum_{t != s} G_st sig_t - sig_s proj_s) / rr_s. Summing gy instead would give
    # those zeros' rounding noise, which swamps small biases' gradients (cancellation).
    # sum_i 0 * gy_s[i] is added (0, or NaN where a gy_s[i] is not finite) so that NaN / inf
    # in grad_out (through ga, aga) reach grad_bias as in the spec's plain sum.
    off_diag = (sidx[:, None] != sidx[None, :]) & s_ok[:, None] & s_ok[None, :]
    inter = tl.sum(tl.where(off_diag, G * sig[None, :], 0.0), axis=1)
    gb = div_rn(4.0 * lam * gl * inter - sig * proj, rr)
    nonfinite = tl.zeros([BLOCK_S], dtype=ACC)
    for n0 in range(0, n, BLOCK_N):
        i = n0 + offs_n
        i_ok = i < n
        ytile = _load_y(y_base, sidx, s_ok, i, i_ok, n)
        yh = div_rn(ytile, rr[:, None])
        a = tl.where(i_ok, div_rn(tl.exp(tl.sum(ytile, axis=0) - m), denom), 0.0)
        ga = tl.load(ga_base + i, mask=i_ok, other=0.0)
        ge = a * (ga - aga)
        gyh = _load_y(gyh_base, sidx, s_ok, i, i_ok, n)
        gy = ge[None, :] + div_rn(gyh - yh * proj[:, None], rr[:, None])
        gy = tl.where(s_ok[:, None] & i_ok[None, :], gy, 0.0)
        nonfinite += tl.sum(0.0 * gy, axis=1)
        tl.store(gy_base + sidx[:, None] * n + i[None, :], gy,
                 mask=s_ok[:, None] & i_ok[None, :])
        tl.store(a_base + i, a, mask=i_ok)
    gb = gb + nonfinite
    tl.store(part_base + Ctot + sidx, gb, mask=s_ok)
    tl.debug_barrier()  # phase 5 reads gy

    # ---- phase 5: grad_weights partial sum_i gy_s[i] P_s[c, i], as
    # sum_i gy_s[i] (P_s[c, i] - mu_s[c]) + mu_s[c] gb_s: the rounding noise of the gy sum
    # (see gb) would otherwise come back multiplied by the channel's mean
    for s in range(S):
        off = tl.load(meta_ptr + s)
        C = tl.load(meta_ptr + S + s)
        gb_s = _pick(gb, sidx, s)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + offs_c
            c_ok = c < C
            mu = tl.load(ku_base + Ctot + off + c, mask=c_ok, other=0.0)
            acc = tl.zeros([BLOCK_C], dtype=ACC)
            for n0 in range(0, n, BLOCK_N):
                i = n0 + offs_n
                i_ok = i < n
                g = tl.load(gy_base + s * n + i, mask=i_ok, other=0.0)
                pc = _load_p(p_base, off, c, c_ok, i, i_ok, n) - mu[:, None]
                acc += tl.sum(pc * g[None, :], axis=1)
            tl.store(part_base + off + c, acc + mu * gb_s, mask=c_ok)


@triton.jit
def _unpool_kernel(
    go_ptr, a_ptr, gy_ptr, y_ptr, ku_ptr, w_ptr, stats_ptr, gx_ptr,
    s, off, C, S, T, H, W, Ho, Wo, n, Ctot, KH, KW,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad_xs[s][b, t, c, h, w] = sum over the output cells i whose window holds (h, w) of
    dP_s[c, i] / |window(i)|, dP_s formed on the fly from its three rank-1 terms."""
    ACC = a_ptr.dtype.element_ty
    HW = H * W
    bt, ct, kt = _tile_ids(tl.cdiv(C, BLOCK_C), tl.cdiv(HW, BLOCK_K))
    b = bt // T
    t = bt - b * T
    c = ct * BLOCK_C + tl.arange(0, BLOCK_C)
    k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
    c_ok = c < C
    k_ok = k < HW
    h = k // W
    w = k - h * W
    gz = tl.load(go_ptr + b * Ctot + off + c, mask=c_ok, other=0.0).to(ACC)
    wc = tl.load(w_ptr + off + c, mask=c_ok, other=0.0).to(ACC)
    ku = tl.load(ku_ptr + b * 2 * Ctot + off + c, mask=c_ok, other=0.0)
    rr_s = tl.load(stats_ptr + b * 2 * S + s)
    sig_n = tl.load(stats_ptr + b * 2 * S + S + s)
    row_base = (b * S + s) * n + t * (Ho * Wo)
    # the cells holding row h: start(oh) <= h < end(oh)  <=>  oh in [oh_lo, oh_hi]
    oh_lo = h * Ho // H
    oh_hi = ((h + 1) * Ho - 1) // H
    ow_lo = w * Wo // W
    ow_hi = ((w + 1) * Wo - 1) // W
    acc = tl.zeros([BLOCK_C, BLOCK_K], dtype=ACC)
    for dh in range(KH):
        oh = oh_lo + dh
        h_ok = k_ok & (oh <= oh_hi)
        rows = ((oh + 1) * H + Ho - 1) // Ho - oh * H // Ho
        for dw in range(KW):
            ow = ow_lo + dw
            ok = h_ok & (ow <= ow_hi)
            cols = ((ow + 1) * W + Wo - 1) // Wo - ow * W // Wo
            cell = oh * Wo + ow
            a = tl.load(a_ptr + b * n + t * (Ho * Wo) + cell, mask=ok, other=0.0)
            g = tl.load(gy_ptr + row_base + cell, mask=ok, other=0.0)
            yv = tl.load(y_ptr + row_base + cell, mask=ok, other=0.0)
            yc = div_rn(yv, rr_s) - sig_n
            d = gz[:, None] * a[None, :] + wc[:, None] * g[None, :] + ku[:, None] * yc[None, :]
            cnt = tl.where(ok, rows * cols, 1).to(ACC)
            acc += tl.where(ok[None, :], div_rn(d, cnt[None, :]), 0.0)
    gx_off = (bt * C + c)[:, None] * HW + k[None, :]
    tl.store(gx_ptr + gx_off, acc.to(gx_ptr.dtype.element_ty), mask=c_ok[:, None] & k_ok[None, :])


# =============================================================================== host side
def _max_window(size_in: int, size_out: int) -> int:
    """Largest adaptive-pooling window (input rows per output row)."""
    return max(-(-(o + 1) * size_in // size_out) - o * size_in // size_out
               for o in range(size_out))


def _max_cover(size_in: int, size_out: int) -> int:
    """Largest number of output rows whose window holds one input row."""
    return max(((h + 1) * size_out - 1) // size_in - h * size_out // size_in + 1
               for h in range(size_in))


# Small constant device tensors (the level table, (eps, lam)), cached by (device, dtype,
# values): torch.tensor(..., device="cuda") is a blocking host-to-device copy (and is not
# allowed during CUDA-graph capture), so only the first call with given values makes one.
# The kernels only read them. Floats are keyed by float.hex (keeps -0.0 apart from 0.0).
_CONSTS: OrderedDict = OrderedDict()
_CONSTS_MAX = 64
_GRID_MAX = 2**31 - 1


def _const(values: list, dtype: torch.dtype, device) -> Tensor:
    device = torch.device(device)
    key = (device.type, device.index, dtype,
           tuple(float(v).hex() if dtype.is_floating_point else int(v) for v in values))
    t = _CONSTS.get(key)
    if t is None:
        t = torch.tensor(values, dtype=dtype, device=device)
        _CONSTS[key] = t
        if len(_CONSTS) > _CONSTS_MAX:
            _CONSTS.popitem(last=False)
    else:
        _CONSTS.move_to_end(key)
    return t


def _levels(Cs: list[int], device) -> tuple[list[int], Tensor]:
    """Channel offsets, and the int32 tensor [offs..., Cs...] the head kernels read."""
    offs = [sum(Cs[:s]) for s in range(len(Cs))]
    return offs, _const(offs + list(Cs), torch.int32, device)


def _tile_grid(frames: int, C: int, block_c: int, pixels: int, block_p: int) -> tuple[int]:
    """The 1-D grid of _tile_ids: frames x channel tiles x pixel tiles programs."""
    size = frames * triton.cdiv(C, block_c) * triton.cdiv(pixels, block_p)
    if size > _GRID_MAX:
        raise ValueError(f"pyramid attention: {size} tiles exceed the grid limit {_GRID_MAX}")
    return (size,)


def _head_blocks(S: int, Cs: list[int], n: int) -> dict:
    return dict(BLOCK_S=max(2, triton.next_power_of_2(S)), BLOCK_C=block(max(Cs), MAX_BLOCK_C),
                BLOCK_N=block(n, MAX_BLOCK_N), num_warps=NUM_WARPS)


def pyramid_attention_forward(xs: list[Tensor], weights: list[Tensor], bias: Tensor, eps: float,
                              lam: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """xs[s] [B, T, C_s, H_s, W_s] -> out [B, Ctot] (xs' dtype), loss (0-dim, xs' dtype),
    pooled [B, Ctot, n] and y [B, S, n] (opmath)."""
    xs = [x.contiguous() for x in xs]
    dtype, dev = xs[0].dtype, xs[0].device
    acc = opmath(dtype)
    S = len(xs)
    B, T = xs[0].shape[:2]
    Ho, Wo = xs[-1].shape[-2:]
    n = T * Ho * Wo
    Cs = [x.shape[2] for x in xs]
    Ctot = sum(Cs)
    offs, meta = _levels(Cs, dev)
    pooled = torch.empty(B, Ctot, n, dtype=acc, device=dev)
    block_o = block(Ho * Wo, MAX_BLOCK_O)
    for x, off, C in zip(xs, offs, Cs):
        H, W = x.shape[-2:]
        block_c = block(C, MAX_BLOCK_C)
        grid = _tile_grid(B * T, C, block_c, Ho * Wo, block_o)
        _pool_kernel[grid](x, pooled, off, C, T, H, W, Ho, Wo, n, Ctot,
                           _max_window(H, Ho), _max_window(W, Wo),
                           BLOCK_C=block_c, BLOCK_O=block_o, num_warps=NUM_WARPS)
    wcat = torch.cat([w.reshape(-1) for w in weights])
    scal = _const([eps, lam], acc, dev)  # exact for float64
    y = torch.empty(B, S, n, dtype=acc, device=dev)
    out = torch.empty(B, Ctot, dtype=dtype, device=dev)
    loss_b = torch.empty(B, dtype=acc, device=dev)
    loss = torch.empty((), dtype=dtype, device=dev)
    _head_fwd_kernel[(B,)](pooled, wcat, bias.contiguous(), meta, scal, y, out, loss_b,
                           S, n, Ctot, **_head_blocks(S, Cs, n))
    _batch_sum_kernel[(1,)](loss_b, loss, B, 1, B, BLOCK_K=16, num_warps=1)
    return out, loss, pooled, y


def pyramid_attention_backward(grad_out: Tensor, grad_loss: Tensor, pooled: Tensor, y: Tensor,
                               weights: list[Tensor], eps: float, lam: float, sizes: list[int]
                               ) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """-> (grad_xs[s] [B, T, C_s, H_s, W_s], grad_weights[s] [C_s], grad_bias [S]), all in
    grad_out's dtype (xs'), deterministic. sizes = [H_0, W_0, ..., H_{S-1}, W_{S-1}]."""
    grad_out = grad_out.contiguous()
    pooled = pooled.contiguous()
    y = y.contiguous()
    dtype, dev = grad_out.dtype, grad_out.device
    acc = pooled.dtype
    B, S, n = y.shape
    Cs = [w.shape[0] for w in weights]
    Ctot = sum(Cs)
    Ho, Wo = sizes[-2], sizes[-1]
    T = n // (Ho * Wo)
    offs, meta = _levels(Cs, dev)
    wcat = torch.cat([w.reshape(-1) for w in weights])
    scal = _const([eps, lam], acc, dev)
    gl = torch.as_tensor(grad_loss, dtype=None if isinstance(grad_loss, Tensor) else acc,
                         device=dev)
    wk = torch.empty(B, S + 1, n, dtype=acc, device=dev)  # scratch: gyh_s, ga
    gy = torch.empty(B, S, n, dtype=acc, device=dev)
    a = torch.empty(B, n, dtype=acc, device=dev)
    ku = torch.empty(B, 2, Ctot, dtype=acc, device=dev)  # kappa_s u_s, mu_s
    stats = torch.empty(B, 2, S, dtype=acc, device=dev)  # rr_s, sig_s / n
    part = torch.empty(B, Ctot + S, dtype=acc, device=dev)  # grad_weights | grad_bias
    _head_bwd_kernel[(B,)](grad_out, gl, pooled, y, wcat, meta, scal,
                           wk, gy, a, ku, stats, part, B, S, n, Ctot, **_head_blocks(S, Cs, n))
    grads = torch.empty(Ctot + S, dtype=dtype, device=dev)
    _batch_sum_kernel[(triton.cdiv(Ctot + S, REDUCE_BLOCK),)](
        part, grads, B, Ctot + S, 1, BLOCK_K=REDUCE_BLOCK, num_warps=NUM_WARPS)
    grad_xs = []
    for s, (off, C) in enumerate(zip(offs, Cs)):
        H, W = sizes[2 * s], sizes[2 * s + 1]
        gx = torch.empty(B, T, C, H, W, dtype=dtype, device=dev)
        block_c = block(C, MAX_BLOCK_C)
        block_k = block(H * W, MAX_BLOCK_K)
        grid = _tile_grid(B * T, C, block_c, H * W, block_k)
        _unpool_kernel[grid](grad_out, a, gy, y, ku, wcat, stats, gx,
                             s, off, C, S, T, H, W, Ho, Wo, n, Ctot,
                             _max_cover(H, Ho), _max_cover(W, Wo),
                             BLOCK_C=block_c, BLOCK_K=block_k, num_warps=NUM_WARPS)
        grad_xs.append(gx)
    # separate tensors: a custom op's outputs may not alias each other
    grad_ws = [g.clone() for g in grads[:Ctot].split(Cs)]
    return grad_xs, grad_ws, grads[Ctot:].clone()
