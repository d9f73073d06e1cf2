"""Fused Triton kernels of the attentional-pooling op (Girdhar & Ramanan, NeurIPS 2017)
and of the weighted pool (the same op with the maps h given: pose variant, DESIGN 3.3).

Contract: csrc/attnpool.h; executable specs:
attnpool.reference.attentional_pool and attnpool.reference.weighted_pool.

    attentional_pool_forward(x, wb, bb) -> (z [B, P, C], h [B, P, n])
    attentional_pool_backward(grad_z, grad_h, x, h, wb) -> (grad_x, grad_wb, grad_bb)
    weighted_pool_forward(x, h) -> z [B, P, C] = (1/n) h @ x^T
    weighted_pool_backward(grad_z, x, h) -> (grad_x, grad_h [B, P, n])

x is [B, C, n], either n-contiguous (strides (C*n, n, 1)) or C-contiguous (strides
(n*C, 1, C), channels-last): the kernels take x's strides and read it in place; the unit
stride is passed as a compile-time layout so that loads vectorise along it. grad_x gets
x's layout (torch.empty_like keeps strides).

Layout of the work (b = sample, p = rank, c = channel, i = position):

forward  grid (B, cdiv(n, BLOCK_I), cdiv(P, BLOCK_P)). A program owns a tile of BLOCK_I
         positions and loops twice over C chunks:
           1. h_tile [BLOCK_P, BLOCK_I] = wb_chunk @ x_chunk (+ bb), stored once;
           2. z_part [BLOCK_P, BLOCK_C] = h_tile @ x_chunk^T (h zeroed past n).
         When n fits one tile (SINGLE_I) z = z_part / n is written directly; otherwise the
         per-(b, tile) partials go to an opmath buffer [B, n_tiles, P, C] that torch sums
         over the tiles (fixed order, deterministic) and divides by n.
         Trade-off: the position tile is capped at MAX_BLOCK_I = 64 instead of covering
         n = 196 in one 256-wide tile: that gives B * 4 programs instead of B (a GPU has
         ~132 SMs) for the price of a partial buffer of 4 * P * C floats per sample (small
         next to x's C * n) and one torch reduction. x is read twice per program; the second
         pass finds its tile (C * BLOCK_I elements) in L2.
backward kernel 1, grid (B, n_tiles, p_tiles):
           1. loop over C: dh = grad_h + (grad_z @ x_chunk) / n        (full C reduction)
           2. loop over C: grad_wb partial [BLOCK_P, BLOCK_C] = dh @ x_chunk^T -> buffer
              [B, n_tiles, P, C]; grad_bb partial sum_i dh -> [B, n_tiles, P]; and, when P fits
              one block (FUSE_X), grad_x tile [BLOCK_C, BLOCK_I] =
              (grad_z^T @ h) / n + wb^T @ dh, written once.
         Partials are summed over (b, tile) by torch (fixed order, no atomics).
backward kernel 2 (only when P spans several blocks), grid (B, n_tiles, cdiv(C, BLOCK_C)):
         kernel 1 then stores dh [B, P, n] (opmath) and this kernel loops over the P blocks:
         grad_x tile = (grad_z^T @ h) / n + wb^T @ dh, summed over the P blocks.

weighted pool: the same grids and shared helpers (_pc_x_dot: the full-C reduction of a
         [P, C] matrix with an x tile; _store_z: the z loop and its partials).
         forward  = the attentional forward's step 2 with h loaded instead of computed;
         backward kernel, grid (B, n_tiles, p_tiles): grad_h tile = (grad_z @ x) / n (full C
         reduction, stored once, no partials) and, when P fits one block (FUSE_X),
         grad_x tile = (grad_z^T @ h) / n; otherwise grad_x comes from backward kernel 2
         above without its wb^T @ dh term (WITH_WB=False). No atomics, no partial buffers
         in the backward; the forward's z partials (n > MAX_BLOCK_I) are summed as above.

Precision: accumulation is in float32 (float64 for float64 inputs); tl.dot takes
fp16/bf16 operands on tensor cores, fp32 with input_precision="ieee", fp64 as is. The
opmath intermediates h (for z) and dh (for grad_wb and grad_x) enter tl.dot twice for
fp16/bf16, as hi = rounded and lo = rounding error (_split), so they keep ~2x the input
precision; grad_z enters unscaled and sums are divided by n in opmath (IEEE division).
Every output is then rounded once from an opmath value, which keeps the error at or below
the reference's own error at that dtype (the reference rounds h, grad_z / n and dh).
grad_x's term grad_z^T h uses the stored h (x.dtype), as autograd of the reference does.
The weighted pool has no opmath intermediate (its dot operands are all inputs in x.dtype),
so it needs no split: each output is one dot accumulated in opmath, divided by n in opmath
and rounded once.
All block dims are powers of two >= 16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import block, div_rn, dot_precision, opmath

__all__ = ["attentional_pool_forward", "attentional_pool_backward",
           "weighted_pool_forward", "weighted_pool_backward"]

# Block-size caps (powers of two, >= 16). Module-level so tests can force the tiled paths.
# Untuned (no GPU yet). Checked by an sm_90 AOT compile with ptxas: with BLOCK_C = 32,
# 8 warps and 2 stages no variant spills registers in any dtype (BLOCK_C = 64 with 4 warps
# and 3 stages spilled up to 2 KB in fp32/fp64, whose ieee dots run on FMAs) and shared
# memory stays <= 72 KB (fp64, BLOCK_P = 32).
MAX_BLOCK_P = 32
MAX_BLOCK_C = 32
MAX_BLOCK_I = 64
NUM_WARPS = 8
NUM_STAGES = 2
# Compile-time layout of x (and grad_x): which of its strides is the literal 1.
_GENERIC, _N_CONTIG, _C_CONTIG = 0, 1, 2


# =============================================================================== helpers
@triton.jit
def _x_offsets(c, i, s_c, s_i, LAYOUT: tl.constexpr):
    """Offsets [len(c), len(i)] of x[b, c, i] inside a sample; the unit stride is literal."""
    if LAYOUT == 1:  # n-contiguous
        off = c[:, None] * s_c + i[None, :]
    elif LAYOUT == 2:  # C-contiguous (channels last)
        off = c[:, None] + i[None, :] * s_i
    else:
        off = c[:, None] * s_c + i[None, :] * s_i
    return off


@triton.jit
def _load_x(x_base, c, c_mask, i, i_mask, s_c, s_i, LAYOUT: tl.constexpr):
    """x tile [BLOCK_C, BLOCK_I] in the input dtype, 0 outside [C, n]."""
    return tl.load(x_base + _x_offsets(c, i, s_c, s_i, LAYOUT),
                   mask=c_mask[:, None] & i_mask[None, :], other=0.0)


@triton.jit
def _load_pc(ptr, offs_p, p_mask, c, c_mask, C):
    """[BLOCK_P, BLOCK_C] tile of a row-major [P, C] matrix (wb, or grad_z of one sample)."""
    return tl.load(ptr + offs_p[:, None] * C + c[None, :],
                   mask=p_mask[:, None] & c_mask[None, :], other=0.0)


@triton.jit
def _split(v, DT: tl.constexpr, SPLIT: tl.constexpr):
    """An opmath tile as tl.dot operands: (hi, lo) with hi + lo ~= v when SPLIT (fp16/bf16:
    hi = v rounded to DT, lo = the rounding error in DT, so two dots carry ~2x DT's precision).
    lo is 0 where hi is not finite (Inf / NaN / fp16 overflow then behave as v rounded)."""
    hi = v.to(DT)
    if SPLIT:
        hi_acc = hi.to(v.dtype)
        lo = tl.where(tl.abs(hi_acc) < float("inf"), v - hi_acc, 0.0).to(DT)
    else:
        lo = hi  # unused
    return hi, lo


@triton.jit
def _dot_split(a_hi, a_lo, b_hi, b_lo, acc, SPLIT_A: tl.constexpr, SPLIT_B: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """acc + a @ b with a = a_hi + a_lo (SPLIT_A) or b = b_hi + b_lo (SPLIT_B), not both.

    The lo product is dropped where the hi result is not finite: an Inf in the other operand
    would otherwise meet lo's zeros or opposite signs and make a spurious NaN (where the hi
    result is finite, the other operand is finite wherever it meets hi != 0, and hi = 0
    implies lo = 0)."""
    ACC = acc.dtype  # float64 dots need their out_dtype named
    r = tl.dot(a_hi, b_hi, acc, input_precision=DOT_PRECISION, out_dtype=ACC)
    if SPLIT_A:
        r_lo = tl.dot(a_lo, b_hi, tl.zeros_like(r), input_precision=DOT_PRECISION, out_dtype=ACC)
        r = r + tl.where(tl.abs(r) < float("inf"), r_lo, 0.0)
    elif SPLIT_B:
        r_lo = tl.dot(a_hi, b_lo, tl.zeros_like(r), input_precision=DOT_PRECISION, out_dtype=ACC)
        r = r + tl.where(tl.abs(r) < float("inf"), r_lo, 0.0)
    return r


@triton.jit
def _pc_x_dot(acc, m_base, offs_p, p_mask, x_base, offs_i, i_mask, C, s_c, s_i,
              LAYOUT: tl.constexpr, BLOCK_C: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc [BLOCK_P, BLOCK_I] + m @ x_tile: the full C reduction of a row-major [P, C] matrix
    m (wb, or grad_z of one sample) with the x columns of one position tile."""
    ACC = acc.dtype  # float64 dots need their out_dtype named
    offs_c = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + offs_c
        c_mask = c < C
        m = _load_pc(m_base, offs_p, p_mask, c, c_mask, C)  # [BLOCK_P, BLOCK_C]
        xc = _load_x(x_base, c, c_mask, offs_i, i_mask, s_c, s_i, LAYOUT)  # [BLOCK_C, BLOCK_I]
        acc = tl.dot(m, xc, acc, input_precision=DOT_PRECISION, out_dtype=ACC)
    return acc


@triton.jit
def _store_z(h_hi, h_lo, x_base, z_ptr, zp_ptr, b, pid_i, offs_p, p_mask, offs_i, i_mask,
             C, n, P, s_c, s_i, n_tiles, LAYOUT: tl.constexpr, SINGLE_I: tl.constexpr,
             SPLIT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
             DOT_PRECISION: tl.constexpr):
    """z (partial) of one position tile: h @ x^T over all C chunks, h = h_hi (+ h_lo when
    SPLIT) [BLOCK_P, BLOCK_I], 0 past n and P. SINGLE_I: z = . / n in x's dtype; otherwise the
    opmath partial goes to zp [B, n_tiles, P, C]."""
    ACC = zp_ptr.dtype.element_ty
    DT = z_ptr.dtype.element_ty
    offs_c = tl.arange(0, BLOCK_C)
    nf = tl.zeros([1, 1], dtype=ACC) + n
    for c0 in range(0, C, BLOCK_C):
        c = c0 + offs_c
        c_mask = c < C
        xt = tl.trans(_load_x(x_base, c, c_mask, offs_i, i_mask, s_c, s_i, LAYOUT))
        zp = _dot_split(h_hi, h_lo, xt, xt, tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC),
                        SPLIT, False, DOT_PRECISION)  # [BLOCK_P, BLOCK_C]
        pc_mask = p_mask[:, None] & c_mask[None, :]
        if SINGLE_I:
            tl.store(z_ptr + (b * P + offs_p[:, None]) * C + c[None, :],
                     div_rn(zp, nf).to(DT), mask=pc_mask)
        else:
            tl.store(zp_ptr + ((b * n_tiles + pid_i) * P + offs_p[:, None]) * C + c[None, :],
                     zp, mask=pc_mask)


# =============================================================================== forward
@triton.jit
def _attpool_fwd_kernel(
    x_ptr, wb_ptr, bb_ptr, z_ptr, h_ptr, zp_ptr,
    C, n, P, s_b, s_c, s_i, n_tiles,
    LAYOUT: tl.constexpr, SINGLE_I: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """h of one (b, position tile, P block), and its z (or z partial)."""
    ACC = zp_ptr.dtype.element_ty
    DT = x_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    pid_i = tl.program_id(1)
    pid_p = tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < P
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    i_mask = offs_i < n
    x_base = x_ptr + b * s_b

    # ---- bottom-up maps of this tile: h = wb @ x + bb (full C reduction)
    acc = _pc_x_dot(tl.zeros([BLOCK_P, BLOCK_I], dtype=ACC), wb_ptr, offs_p, p_mask,
                    x_base, offs_i, i_mask, C, s_c, s_i, LAYOUT, BLOCK_C, DOT_PRECISION)
    bias = tl.load(bb_ptr + offs_p, mask=p_mask, other=0.0).to(ACC)
    h = acc + bias[:, None]
    tl.store(h_ptr + (b * P + offs_p[:, None]) * n + offs_i[None, :], h.to(DT),
             mask=p_mask[:, None] & i_mask[None, :])
    h = tl.where(p_mask[:, None] & i_mask[None, :], h, 0.0)  # no bias past n, no NaN past P
    h_hi, h_lo = _split(h, DT, SPLIT)

    # ---- z (partial) of this tile: h @ x^T, h in opmath (hi + lo for fp16 / bf16)
    _store_z(h_hi, h_lo, x_base, z_ptr, zp_ptr, b, pid_i, offs_p, p_mask, offs_i, i_mask,
             C, n, P, s_c, s_i, n_tiles, LAYOUT, SINGLE_I, SPLIT, BLOCK_P, BLOCK_C,
             DOT_PRECISION)


@triton.jit
def _wpool_fwd_kernel(
    x_ptr, h_ptr, z_ptr, zp_ptr,
    C, n, P, s_b, s_c, s_i, n_tiles,
    LAYOUT: tl.constexpr, SINGLE_I: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """z (or z partial) of one (b, position tile, P block) under the given maps h."""
    b = tl.program_id(0).to(tl.int64)
    pid_i = tl.program_id(1)
    pid_p = tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < P
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    i_mask = offs_i < n
    h = tl.load(h_ptr + (b * P + offs_p[:, None]) * n + offs_i[None, :],
                mask=p_mask[:, None] & i_mask[None, :], other=0.0)  # x.dtype: no split
    _store_z(h, h, x_ptr + b * s_b, z_ptr, zp_ptr, b, pid_i, offs_p, p_mask, offs_i, i_mask,
             C, n, P, s_c, s_i, n_tiles, LAYOUT, SINGLE_I, False, BLOCK_P, BLOCK_C,
             DOT_PRECISION)


# =============================================================================== backward
@triton.jit
def _attpool_bwd_kernel(
    gz_ptr, gh_ptr, x_ptr, h_ptr, wb_ptr, gx_ptr, dh_ptr, pwb_ptr, pbb_ptr,
    C, n, P, s_b, s_c, s_i, g_b, g_c, g_i, n_tiles,
    LAYOUT: tl.constexpr, G_LAYOUT: tl.constexpr, FUSE_X: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dh, grad_wb / grad_bb partials and (FUSE_X) grad_x of one (b, position tile, P block)."""
    ACC = pwb_ptr.dtype.element_ty
    DT = x_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    pid_i = tl.program_id(1)
    pid_p = tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < P
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    i_mask = offs_i < n
    offs_c = tl.arange(0, BLOCK_C)
    pi_mask = p_mask[:, None] & i_mask[None, :]
    x_base = x_ptr + b * s_b
    gz_base = gz_ptr + b * P * C
    nf = tl.zeros([1, 1], dtype=ACC) + n

    # ---- dh = grad_h + (grad_z @ x) / n   (full C reduction; grad_z enters unscaled)
    acc = _pc_x_dot(tl.zeros([BLOCK_P, BLOCK_I], dtype=ACC), gz_base, offs_p, p_mask,
                    x_base, offs_i, i_mask, C, s_c, s_i, LAYOUT, BLOCK_C, DOT_PRECISION)
    pi_off = (b * P + offs_p[:, None]) * n + offs_i[None, :]
    gh = tl.load(gh_ptr + pi_off, mask=pi_mask, other=0.0).to(ACC)
    # Rows past P must be exactly 0 (not 0 * Inf = NaN from a padded grad_z row): they meet
    # wb's zero padding in the grad_x dot.
    dh = tl.where(pi_mask, gh + div_rn(acc, nf), 0.0)
    if not FUSE_X:
        tl.store(dh_ptr + pi_off, dh, mask=pi_mask)
    tl.store(pbb_ptr + (b * n_tiles + pid_i) * P + offs_p, tl.sum(dh, axis=1), mask=p_mask)
    dh_hi, dh_lo = _split(dh, DT, SPLIT)
    if FUSE_X:
        h_dot = tl.load(h_ptr + pi_off, mask=pi_mask, other=0.0)  # [BLOCK_P, BLOCK_I]

    # ---- grad_wb partial = dh @ x^T;  grad_x tile = (grad_z^T @ h) / n + wb^T @ dh
    pwb_base = pwb_ptr + (b * n_tiles + pid_i) * P * C
    for c0 in range(0, C, BLOCK_C):
        c = c0 + offs_c
        c_mask = c < C
        pc_mask = p_mask[:, None] & c_mask[None, :]
        xt = tl.trans(_load_x(x_base, c, c_mask, offs_i, i_mask, s_c, s_i, LAYOUT))
        gw = _dot_split(dh_hi, dh_lo, xt, xt, tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC),
                        SPLIT, False, DOT_PRECISION)  # [BLOCK_P, BLOCK_C]
        tl.store(pwb_base + offs_p[:, None] * C + c[None, :], gw, mask=pc_mask)
        if FUSE_X:
            gz_t = tl.trans(_load_pc(gz_base, offs_p, p_mask, c, c_mask, C))  # [BLOCK_C, BLOCK_P]
            w_t = tl.trans(_load_pc(wb_ptr, offs_p, p_mask, c, c_mask, C))
            gx = tl.dot(gz_t, h_dot, tl.zeros([BLOCK_C, BLOCK_I], dtype=ACC),
                        input_precision=DOT_PRECISION, out_dtype=ACC)  # [BLOCK_C, BLOCK_I]
            gx = div_rn(gx, nf)
            gx = _dot_split(w_t, w_t, dh_hi, dh_lo, gx, False, SPLIT, DOT_PRECISION)
            tl.store(gx_ptr + b * g_b + _x_offsets(c, offs_i, g_c, g_i, G_LAYOUT), gx.to(DT),
                     mask=c_mask[:, None] & i_mask[None, :])


@triton.jit
def _attpool_bwd_x_kernel(
    gz_ptr, h_ptr, wb_ptr, dh_ptr, gx_ptr,
    C, n, P, g_b, g_c, g_i,
    G_LAYOUT: tl.constexpr, SPLIT: tl.constexpr, WITH_WB: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """grad_x tile [BLOCK_C, BLOCK_I] = (grad_z^T @ h) / n (+ wb^T @ dh when WITH_WB; the
    weighted pool has no wb: wb_ptr is unused and dh_ptr only carries the opmath dtype),
    over all P blocks."""
    ACC = dh_ptr.dtype.element_ty
    DT = h_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    pid_i = tl.program_id(1)
    pid_c = tl.program_id(2)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    i_mask = offs_i < n
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    gz_base = gz_ptr + b * P * C
    acc_z = tl.zeros([BLOCK_C, BLOCK_I], dtype=ACC)  # grad_z^T @ h
    acc_h = tl.zeros([BLOCK_C, BLOCK_I], dtype=ACC)  # wb^T @ dh
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_mask = offs_p < P
        pi_mask = p_mask[:, None] & i_mask[None, :]
        pi_off = (b * P + offs_p[:, None]) * n + offs_i[None, :]
        gz_t = tl.trans(_load_pc(gz_base, offs_p, p_mask, c, c_mask, C))
        h_dot = tl.load(h_ptr + pi_off, mask=pi_mask, other=0.0)
        acc_z = tl.dot(gz_t, h_dot, acc_z, input_precision=DOT_PRECISION, out_dtype=ACC)
        if WITH_WB:
            w_t = tl.trans(_load_pc(wb_ptr, offs_p, p_mask, c, c_mask, C))
            dh_hi, dh_lo = _split(tl.load(dh_ptr + pi_off, mask=pi_mask, other=0.0), DT, SPLIT)
            acc_h = _dot_split(w_t, w_t, dh_hi, dh_lo, acc_h, False, SPLIT, DOT_PRECISION)
    nf = tl.zeros([1, 1], dtype=ACC) + n
    gx = div_rn(acc_z, nf)
    if WITH_WB:
        gx = gx + acc_h
    tl.store(gx_ptr + b * g_b + _x_offsets(c, offs_i, g_c, g_i, G_LAYOUT), gx.to(DT),
             mask=c_mask[:, None] & i_mask[None, :])


@triton.jit
def _wpool_bwd_kernel(
    gz_ptr, x_ptr, h_ptr, gx_ptr, gh_ptr,
    C, n, P, s_b, s_c, s_i, g_b, g_c, g_i,
    LAYOUT: tl.constexpr, G_LAYOUT: tl.constexpr, FUSE_X: tl.constexpr, ACC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """grad_h and (FUSE_X) grad_x of one (b, position tile, P block) of the weighted pool."""
    DT = x_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    pid_i = tl.program_id(1)
    pid_p = tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < P
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    i_mask = offs_i < n
    pi_mask = p_mask[:, None] & i_mask[None, :]
    pi_off = (b * P + offs_p[:, None]) * n + offs_i[None, :]
    x_base = x_ptr + b * s_b
    gz_base = gz_ptr + b * P * C
    nf = tl.zeros([1, 1], dtype=ACC) + n

    # ---- grad_h = (grad_z @ x) / n   (full C reduction; grad_z enters unscaled)
    acc = _pc_x_dot(tl.zeros([BLOCK_P, BLOCK_I], dtype=ACC), gz_base, offs_p, p_mask,
                    x_base, offs_i, i_mask, C, s_c, s_i, LAYOUT, BLOCK_C, DOT_PRECISION)
    tl.store(gh_ptr + pi_off, div_rn(acc, nf).to(DT), mask=pi_mask)

    # ---- grad_x tile = (grad_z^T @ h) / n, when this program holds all of P
    if FUSE_X:
        h_dot = tl.load(h_ptr + pi_off, mask=pi_mask, other=0.0)  # [BLOCK_P, BLOCK_I]
        offs_c = tl.arange(0, BLOCK_C)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + offs_c
            c_mask = c < C
            gz_t = tl.trans(_load_pc(gz_base, offs_p, p_mask, c, c_mask, C))  # [BLOCK_C, BLOCK_P]
            gx = tl.dot(gz_t, h_dot, tl.zeros([BLOCK_C, BLOCK_I], dtype=ACC),
                        input_precision=DOT_PRECISION, out_dtype=ACC)  # [BLOCK_C, BLOCK_I]
            tl.store(gx_ptr + b * g_b + _x_offsets(c, offs_i, g_c, g_i, G_LAYOUT),
                     div_rn(gx, nf).to(DT), mask=c_mask[:, None] & i_mask[None, :])


# =============================================================================== host side
def _blocks(C: int, n: int, P: int) -> tuple[int, int, int]:
    return block(P, MAX_BLOCK_P), block(C, MAX_BLOCK_C), block(n, MAX_BLOCK_I)


def _split_dots(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def _layout(t: Tensor) -> int:
    """Which stride of [B, C, n] ``t`` is the literal 1 (size-1 dims never matter)."""
    _, C, n = t.shape
    if n == 1 or t.stride(2) == 1:
        return _N_CONTIG
    if C == 1 or t.stride(1) == 1:
        return _C_CONTIG
    return _GENERIC


def _strides(t: Tensor, layout: int) -> tuple[int, int, int]:
    s_b, s_c, s_i = t.stride()
    if layout == _N_CONTIG:
        s_i = 1
    elif layout == _C_CONTIG:
        s_c = 1
    return s_b, s_c, s_i


def attentional_pool_forward(x: Tensor, wb: Tensor, bb: Tensor) -> tuple[Tensor, Tensor]:
    """x [B, C, n] (n- or C-contiguous), wb [P, C], bb [P] -> z [B, P, C], h [B, P, n]."""
    B, C, n = x.shape
    P = wb.shape[0]
    acc = opmath(x.dtype)
    dev = x.device
    wb = wb.contiguous()
    bb = bb.contiguous()
    block_p, block_c, block_i = _blocks(C, n, P)
    n_tiles = triton.cdiv(n, block_i)
    single_i = n_tiles == 1
    layout = _layout(x)
    z = torch.empty(B, P, C, dtype=x.dtype, device=dev)
    h = torch.empty(B, P, n, dtype=x.dtype, device=dev)
    zp = (torch.empty(1, dtype=acc, device=dev) if single_i  # never read: carries the dtype
          else torch.empty(B, n_tiles, P, C, dtype=acc, device=dev))
    grid = (B, n_tiles, triton.cdiv(P, block_p))
    _attpool_fwd_kernel[grid](
        x, wb, bb, z, h, zp, C, n, P, *_strides(x, layout), n_tiles,
        LAYOUT=layout, SINGLE_I=single_i, SPLIT=_split_dots(x.dtype),
        BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_I=block_i,
        DOT_PRECISION=dot_precision(x.dtype), num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    if not single_i:
        z.copy_(zp.sum(1).div_(n))  # fixed-order reduction over the tiles
    return z, h


def attentional_pool_backward(grad_z: Tensor, grad_h: Tensor, x: Tensor, h: Tensor, wb: Tensor
                              ) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients w.r.t. x (x's layout), wb [P, C] and bb [P], all in x.dtype."""
    B, C, n = x.shape
    P = wb.shape[0]
    acc = opmath(x.dtype)
    dev = x.device
    grad_z = grad_z.contiguous()
    grad_h = grad_h.contiguous()
    h = h.contiguous()
    wb = wb.contiguous()
    block_p, block_c, block_i = _blocks(C, n, P)
    n_tiles = triton.cdiv(n, block_i)
    p_tiles = triton.cdiv(P, block_p)
    fuse_x = p_tiles == 1
    layout = _layout(x)
    grad_x = torch.empty_like(x)  # keeps x's strides
    g_layout = _layout(grad_x)
    pwb = torch.empty(B, n_tiles, P, C, dtype=acc, device=dev)
    pbb = torch.empty(B, n_tiles, P, dtype=acc, device=dev)
    dh = pwb if fuse_x else torch.empty(B, P, n, dtype=acc, device=dev)  # fuse_x: never used
    prec = dot_precision(x.dtype)
    split = _split_dots(x.dtype)
    g_strides = _strides(grad_x, g_layout)
    _attpool_bwd_kernel[(B, n_tiles, p_tiles)](
        grad_z, grad_h, x, h, wb, grad_x, dh, pwb, pbb,
        C, n, P, *_strides(x, layout), *g_strides, n_tiles,
        LAYOUT=layout, G_LAYOUT=g_layout, FUSE_X=fuse_x, SPLIT=split,
        BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_I=block_i, DOT_PRECISION=prec,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    if not fuse_x:
        _attpool_bwd_x_kernel[(B, n_tiles, triton.cdiv(C, block_c))](
            grad_z, h, wb, dh, grad_x, C, n, P, *g_strides,
            G_LAYOUT=g_layout, SPLIT=split, WITH_WB=True, BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_I=block_i,
            DOT_PRECISION=prec, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
        )
    # fixed-order reductions over (b, tile): deterministic, no atomics
    grad_wb = pwb.sum((0, 1)).to(x.dtype)
    grad_bb = pbb.sum((0, 1)).to(x.dtype)
    return grad_x, grad_wb, grad_bb


def weighted_pool_forward(x: Tensor, h: Tensor) -> Tensor:
    """x [B, C, n] (n- or C-contiguous), h [B, P, n] (x.dtype) -> z [B, P, C] = h @ x^T / n."""
    B, C, n = x.shape
    P = h.shape[1]
    acc = opmath(x.dtype)
    dev = x.device
    h = h.contiguous()
    block_p, block_c, block_i = _blocks(C, n, P)
    n_tiles = triton.cdiv(n, block_i)
    single_i = n_tiles == 1
    layout = _layout(x)
    z = torch.empty(B, P, C, dtype=x.dtype, device=dev)
    zp = (torch.empty(1, dtype=acc, device=dev) if single_i  # never read: carries the dtype
          else torch.empty(B, n_tiles, P, C, dtype=acc, device=dev))
    _wpool_fwd_kernel[(B, n_tiles, triton.cdiv(P, block_p))](
        x, h, z, zp, C, n, P, *_strides(x, layout), n_tiles,
        LAYOUT=layout, SINGLE_I=single_i, BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_I=block_i,
        DOT_PRECISION=dot_precision(x.dtype), num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    if not single_i:
        z.copy_(zp.sum(1).div_(n))  # fixed-order reduction over the tiles
    return z


def weighted_pool_backward(grad_z: Tensor, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients w.r.t. x (x's shape and layout) and h ([B, P, n], contiguous), in x.dtype."""
    B, C, n = x.shape
    P = h.shape[1]
    acc = opmath(x.dtype)
    dev = x.device
    grad_z = grad_z.contiguous()
    h = h.contiguous()
    block_p, block_c, block_i = _blocks(C, n, P)
    n_tiles = triton.cdiv(n, block_i)
    p_tiles = triton.cdiv(P, block_p)
    fuse_x = p_tiles == 1
    layout = _layout(x)
    grad_x = torch.empty_like(x)  # keeps x's strides
    g_layout = _layout(grad_x)
    grad_h = torch.empty(B, P, n, dtype=x.dtype, device=dev)
    prec = dot_precision(x.dtype)
    g_strides = _strides(grad_x, g_layout)
    _wpool_bwd_kernel[(B, n_tiles, p_tiles)](
        grad_z, x, h, grad_x, grad_h, C, n, P, *_strides(x, layout), *g_strides,
        LAYOUT=layout, G_LAYOUT=g_layout, FUSE_X=fuse_x,
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
        BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_I=block_i, DOT_PRECISION=prec,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    if not fuse_x:
        dtype_carrier = torch.empty(1, dtype=acc, device=dev)  # never read
        _attpool_bwd_x_kernel[(B, n_tiles, triton.cdiv(C, block_c))](
            grad_z, h, h, dtype_carrier, grad_x, C, n, P, *g_strides,
            G_LAYOUT=g_layout, SPLIT=False, WITH_WB=False, BLOCK_P=block_p, BLOCK_C=block_c,
            BLOCK_I=block_i, DOT_PRECISION=prec, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
        )
    return grad_x, grad_h
