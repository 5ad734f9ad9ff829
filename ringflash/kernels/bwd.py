"""FlashAttention-2 backward in Triton: a preprocessing kernel, then separate dK/dV and dQ
kernels (FlagAttention's layout). No atomics: every output element is written by exactly
one program, so the result is deterministic by construction.

* preprocess: delta = rowsum(dO * O) and lse in log2 units.
* dK/dV: one program per (key block, KV head, sequence). It loops over the query heads
  of its GQA group and over the query blocks that see its keys, accumulating in registers.
* dQ: one program per (query block, head, sequence), looping over visible key blocks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from . import configs
from .common import (
    alibi_bias, cdiv, check_device, dropout_keep, load_alibi_slope, check_output_buffer, finish_output, grad_buffer,
    interpreter_output, interpreting, kernel_operand,
    in_elements, key_block_ranges, query_block_ranges, row_base, scaled_scores, schedule, softcap_mode, sequence_bounds, tile_ptrs, visible,
)
from .launch import ArgTemplate, PlannedLaunch, PlanTable, int_class
from .problem import (
    AttnProblem, SeqMeta, alibi_args, dense_strides, dropout_args, lse_strides, meta_flags, meta_signature,
    seq_pointers, seqlen_args, stride_unit,
)


@triton.jit
def _bwd_preprocess_kernel(
    Out, DOut, Lse, Delta, Lse2,
    rows,
    stride_ob, stride_or, stride_oh,
    stride_dob, stride_dor, stride_doh,
    stride_lb, stride_lh,
    HEADDIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, LOG2_BLOCK_D: tl.constexpr,
    STRIDE_UNIT: tl.constexpr,
):
    """Grid (cdiv(rows, BLOCK_R), nheads, batch); varlen runs as batch 1 over all tokens.
    Delta and Lse2 share lse's layout (token stride 1). Out's and dOut's strides come in
    units of STRIDE_UNIT elements."""
    stride_ob, stride_or, stride_oh = in_elements(stride_ob, stride_or, stride_oh, STRIDE_UNIT)
    stride_dob, stride_dor, stride_doh = in_elements(stride_dob, stride_dor, stride_doh, STRIDE_UNIT)
    pid_r = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_r[:, None] < rows) & (offs_d[None, :] < HEADDIM)
    r0 = pid_r * BLOCK_R
    o = tl.load(tile_ptrs(Out, b, h, r0, stride_ob, stride_oh, stride_or, BLOCK_R, BLOCK_D),
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(tile_ptrs(DOut, b, h, r0, stride_dob, stride_doh, stride_dor, BLOCK_R, BLOCK_D),
                 mask=mask, other=0.0).to(tl.float32)
    # The row sums in one fixed order, a pairwise tree: each step adds column j and column
    # j + w/2 (a sum over an axis of two, exact in either order). tl.sum over the whole row
    # adds in an order that follows the loads' layout, which Triton picks from the strides'
    # divisibility, so an expanded or sliced dO rounded delta differently from a contiguous
    # one and changed the last bit of dQ and dK (run 36).
    x = o * do
    for _ in tl.static_range(LOG2_BLOCK_D):
        x = tl.sum(tl.reshape(x, (BLOCK_R, 2, x.shape[1] // 2)), 1)
    delta = tl.reshape(x, (BLOCK_R,))
    l_off = row_base(0, b, h, r0, stride_lb, stride_lh, 1) + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rows
    lse = tl.load(Lse + l_off, mask=r_mask, other=0.0)
    # Rows that saw no key keep lse2 = -inf; every score of theirs is masked, so their
    # recomputed probabilities are zeroed by the mask, never by this value.
    lse2 = lse * 1.4426950408889634
    tl.store(Delta + l_off, delta, mask=r_mask)
    tl.store(Lse2 + l_off, lse2, mask=r_mask)


@triton.jit
def _dkdv_block_loop(
    dk, dv, k, v, dk2, dv2, k2, v2,
    q_base, do_base, lse2_base, delta_base, stride_qs, stride_dos, dq_base, stride_dqs, softmax_scale,
    start, end, n0, offs_n, offs_d, offs_d2,
    sq, diag, sk, window_left, window_right,
    qk_scale_log2, softcap_in, softcap_out, alibi_slope, b, h, dropout_threshold, dropout_scale, dropout_seed,
    split, splits,
    MASKED: tl.constexpr, EVEN_D: tl.constexpr, HEADDIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    WANT_DK: tl.constexpr, WANT_DV: tl.constexpr, BLOCK_D2: tl.constexpr,
):
    """Accumulate dK, dV (key-major tiles, BLOCK_N x D) over the query blocks in [start, end)
    (block-aligned) whose index is ``split`` modulo ``splits``; WANT_DK / WANT_DV: which of
    the two (a pass of one keeps half the accumulators). With ATOMIC_DQ (and WANT_DK) also
    add this key block's share of dQ (scaled) into the float32 buffer at ``dq_base`` by
    atomics: the 5-GEMM backward, with no separate dQ pass. With a second head-dim part
    (BLOCK_D2 > 0) also dk2 and dv2, its columns offs_d2, from k2 and v2 (unused otherwise)."""
    offs_mb = tl.arange(0, BLOCK_M)
    start = start + ((split - (start // BLOCK_M) % splits + splits) % splits) * BLOCK_M
    qT_ptrs = q_base + start.to(tl.int64) * stride_qs + offs_mb[None, :] * stride_qs + offs_d[:, None]
    do_ptrs = do_base + start.to(tl.int64) * stride_dos + offs_mb[:, None] * stride_dos + offs_d[None, :]
    if BLOCK_D2 > 0:
        qT2_ptrs = q_base + start.to(tl.int64) * stride_qs + offs_mb[None, :] * stride_qs + offs_d2[:, None]
        do2_ptrs = do_base + start.to(tl.int64) * stride_dos + offs_mb[:, None] * stride_dos + offs_d2[None, :]
    for m0 in range(start, end, BLOCK_M * splits):
        m0 = tl.multiple_of(m0, BLOCK_M)
        offs_m = m0 + offs_mb
        if MASKED:
            row_ok = offs_m < sq
            qT = tl.load(qT_ptrs, mask=row_ok[None, :] & (offs_d[:, None] < HEADDIM), other=0.0)
            lse2 = tl.load(lse2_base + offs_m, mask=row_ok, other=float("inf"))
        elif EVEN_D:
            qT = tl.load(qT_ptrs)
            lse2 = tl.load(lse2_base + offs_m)
        else:
            qT = tl.load(qT_ptrs, mask=offs_d[:, None] < HEADDIM, other=0.0)
            lse2 = tl.load(lse2_base + offs_m)
        kq = tl.dot(k, qT, input_precision=INPUT_PRECISION)
        if BLOCK_D2 > 0:  # the second part's columns, all inside the head dim
            if MASKED:
                qT2 = tl.load(qT2_ptrs, mask=row_ok[None, :], other=0.0)
                do2 = tl.load(do2_ptrs, mask=row_ok[:, None], other=0.0)
            else:
                qT2 = tl.load(qT2_ptrs)
                do2 = tl.load(do2_ptrs)
            kq = tl.dot(k2, qT2, kq, input_precision=INPUT_PRECISION)
        sT = scaled_scores(kq, qk_scale_log2, softcap_in, softcap_out, HAS_SOFTCAP)
        if HAS_ALIBI:  # after the cap, whose derivative below needs the capped score alone
            pT = tl.math.exp2(sT + alibi_bias(offs_m[None, :], offs_n[:, None], diag, alibi_slope) - lse2[None, :])
        else:
            pT = tl.math.exp2(sT - lse2[None, :])
        if MASKED:
            mask = visible(offs_m[None, :], offs_n[:, None], diag, sk, window_left, window_right, HAS_LEFT, HAS_RIGHT)
            pT = tl.where(mask, pT, 0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEADDIM), other=0.0)
            delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        elif EVEN_D:
            do = tl.load(do_ptrs)
            delta = tl.load(delta_base + offs_m)
        else:
            do = tl.load(do_ptrs, mask=offs_d[None, :] < HEADDIM, other=0.0)
            delta = tl.load(delta_base + offs_m)
        if HAS_DROPOUT:
            keepT = dropout_keep(dropout_seed, b, h, m0, n0, dropout_threshold, BLOCK_M, BLOCK_N, True)
        if WANT_DV:
            # With dropout dV sees the dropped probabilities (the kernel scales dV by
            # 1 / (1 - p) once, at the end).
            pT_kept = tl.where(keepT, pT, 0.0) if HAS_DROPOUT else pT
            dv = tl.dot(pT_kept.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
            if BLOCK_D2 > 0:
                dv2 = tl.dot(pT_kept.to(do2.dtype), do2, dv2, input_precision=INPUT_PRECISION)
        if WANT_DK:
            dpT = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
            if BLOCK_D2 > 0:
                dpT = tl.dot(v2, tl.trans(do2), dpT, input_precision=INPUT_PRECISION)
            if HAS_DROPOUT:  # dP counts only where kept, scaled in the same multiply-add as delta
                dsT = pT * (tl.where(keepT, dpT, 0.0) * dropout_scale - delta[None, :])
            else:
                dsT = pT * (dpT - delta[None, :])
            if HAS_SOFTCAP:
                t = sT * (1.0 / softcap_out)  # tanh of the capped score (a scalar division, not one per entry)
                dsT = dsT * (1.0 - t * t)
            dsT = dsT.to(qT.dtype)
            dk = tl.dot(dsT, tl.trans(qT), dk, input_precision=INPUT_PRECISION)
            if BLOCK_D2 > 0:
                dk2 = tl.dot(dsT, tl.trans(qT2), dk2, input_precision=INPUT_PRECISION)
            if ATOMIC_DQ:
                dq = tl.dot(tl.trans(dsT), k, input_precision=INPUT_PRECISION) * softmax_scale
                dq_ptrs = dq_base + offs_m[:, None].to(tl.int64) * stride_dqs + offs_d[None, :]
                if MASKED:
                    tl.atomic_add(dq_ptrs, dq, mask=(offs_m[:, None] < sq) & (offs_d[None, :] < HEADDIM),
                                  sem="relaxed")
                else:
                    tl.atomic_add(dq_ptrs, dq, mask=offs_d[None, :] < HEADDIM, sem="relaxed")
                if BLOCK_D2 > 0:
                    dq2 = tl.dot(tl.trans(dsT), k2, input_precision=INPUT_PRECISION) * softmax_scale
                    tl.atomic_add(dq_base + offs_m[:, None].to(tl.int64) * stride_dqs + offs_d2[None, :], dq2,
                                  mask=offs_m[:, None] < sq, sem="relaxed")
        qT_ptrs += BLOCK_M * splits * stride_qs
        do_ptrs += BLOCK_M * splits * stride_dos
        if BLOCK_D2 > 0:
            qT2_ptrs += BLOCK_M * splits * stride_qs
            do2_ptrs += BLOCK_M * splits * stride_dos
    return dk, dv, dk2, dv2


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DOut, Lse2, Delta, DK, DV, DkvRows, DQacc,
    QStarts, QEnds, stride_qmeta_g, CuSeqlensK, SequsedK, Diag, stride_used_g,
    Alibi, stride_alibi_b, stride_alibi_h,
    seqlen_q, seqlen_k, total_q, total_k,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    stride_dqab, stride_dqas, stride_dqah,
    stride_lb, stride_lh,
    kv_group, num_groups, splits, stride_dk_split, stride_dv_split,
    qk_scale_log2, softcap_in, softcap_out, softmax_scale,
    window_left, window_right,
    dropout_threshold, dropout_scale, dropout_seed,
    HEADDIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_SEQUSED: tl.constexpr, HAS_DIAG: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr, HAS_DKV_ROWS: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, WANT_DK: tl.constexpr, WANT_DV: tl.constexpr, STRIDE_UNIT: tl.constexpr,
):
    """Grid: (cdiv(max_seqlen_k, BLOCK_N), nheads_k * splits, batch).

    With ``splits`` > 1 (never with HAS_DKV_ROWS), program ``split`` of a key block sums
    only the query blocks whose index is ``split`` modulo ``splits`` (interleaved, so that a
    causal band's work spreads evenly) and writes its float32 partial at
    ``split * stride_d{k,v}_split`` of DK/DV, which the launcher adds up.

    Every group that sees this key block (grouped attention: several query groups
    attending to prefixes of one K/V sequence) adds its contribution here, so dK/dV of
    the shared buffer are complete without atomics. Keys no group sees get zeros. With
    HAS_DKV_ROWS (varlen), key row i goes to row DkvRows[i] of DK/DV: context
    parallelism writes straight into its reduce-scatter buffer, in the ranks' layout.
    WANT_DK / WANT_DV: which of the two this launch computes and writes (a config with
    ``dkdv_passes=2`` launches it twice, each holding one accumulator). The dense tensors'
    (batch, token, head) strides come in units of STRIDE_UNIT elements.
    """
    stride_qb, stride_qs, stride_qh = in_elements(stride_qb, stride_qs, stride_qh, STRIDE_UNIT)
    stride_kb, stride_ks, stride_kh = in_elements(stride_kb, stride_ks, stride_kh, STRIDE_UNIT)
    stride_vb, stride_vs, stride_vh = in_elements(stride_vb, stride_vs, stride_vh, STRIDE_UNIT)
    stride_dob, stride_dos, stride_doh = in_elements(stride_dob, stride_dos, stride_doh, STRIDE_UNIT)
    stride_dkb, stride_dks, stride_dkh = in_elements(stride_dkb, stride_dks, stride_dkh, STRIDE_UNIT)
    stride_dvb, stride_dvs, stride_dvh = in_elements(stride_dvb, stride_dvs, stride_dvh, STRIDE_UNIT)
    stride_dqab, stride_dqas, stride_dqah = in_elements(stride_dqab, stride_dqas, stride_dqah, STRIDE_UNIT)
    pid_n = tl.program_id(0)
    hk = tl.program_id(1) // splits
    split = tl.program_id(1) % splits
    b = tl.program_id(2)
    _, _, k_start, _, sk_full, _ = sequence_bounds(
        b, 0, QStarts, QEnds, stride_qmeta_g, CuSeqlensK, SequsedK, Diag, stride_used_g,
        seqlen_q, seqlen_k, total_q, total_k, IS_VARLEN, False, False,
    )
    n0 = pid_n * BLOCK_N
    if n0 >= sk_full:
        return
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    EVEN_D: tl.constexpr = BLOCK_D <= HEADDIM  # the first (or only) head-dim part lies inside the head dim
    kv_mask = (offs_n[:, None] < sk_full) & (offs_d[None, :] < HEADDIM)
    k = tl.load(tile_ptrs(K, b, hk, k_start + n0, stride_kb, stride_kh, stride_ks, BLOCK_N, BLOCK_D),
                mask=kv_mask, other=0.0)
    v = tl.load(tile_ptrs(V, b, hk, k_start + n0, stride_vb, stride_vh, stride_vs, BLOCK_N, BLOCK_D),
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if BLOCK_D2 > 0:  # the head dim's second part: columns BLOCK_D .. HEADDIM - 1 (``configs.head_parts``)
        tl.static_assert(BLOCK_D + BLOCK_D2 == HEADDIM)
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        kv_mask2 = offs_n[:, None] < sk_full
        k2 = tl.load(tile_ptrs(K, b, hk, k_start + n0, stride_kb, stride_kh, stride_ks, BLOCK_N, BLOCK_D2) + BLOCK_D,
                     mask=kv_mask2, other=0.0)
        v2 = tl.load(tile_ptrs(V, b, hk, k_start + n0, stride_vb, stride_vh, stride_vs, BLOCK_N, BLOCK_D2) + BLOCK_D,
                     mask=kv_mask2, other=0.0)
        dk2 = tl.zeros([BLOCK_N, BLOCK_D2], dtype=tl.float32)
        dv2 = tl.zeros([BLOCK_N, BLOCK_D2], dtype=tl.float32)
    else:  # placeholders the loops pass along untouched
        offs_d2, k2, v2, dk2, dv2 = offs_d, k, v, dk, dv
    for gh in range(0, num_groups * kv_group):
        # gh runs over (query group, query head of this KV head's GQA group).
        grp = gh // kv_group
        h = hk * kv_group + gh % kv_group
        q_start, sq, _, sk, _, diag = sequence_bounds(
            b, grp, QStarts, QEnds, stride_qmeta_g, CuSeqlensK, SequsedK, Diag, stride_used_g,
            seqlen_q, seqlen_k, total_q, total_k, IS_VARLEN, HAS_SEQUSED, HAS_DIAG,
        )
        m_lo, a_end, b_end, m_hi = query_block_ranges(
            n0, sq, sk, diag, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT
        )
        alibi_slope = load_alibi_slope(Alibi, b, h, stride_alibi_b, stride_alibi_h, HAS_ALIBI, True)
        q_base = row_base(Q, b, h, q_start, stride_qb, stride_qh, stride_qs)
        dq_base = row_base(DQacc, b, h, q_start, stride_dqab, stride_dqah, stride_dqas)
        do_base = row_base(DOut, b, h, q_start, stride_dob, stride_doh, stride_dos)
        l_off = row_base(0, b, h, q_start, stride_lb, stride_lh, 1)
        if HAS_RIGHT:
            dk, dv, dk2, dv2 = _dkdv_block_loop(
                dk, dv, k, v, dk2, dv2, k2, v2, q_base, do_base, Lse2 + l_off, Delta + l_off, stride_qs, stride_dos,
                dq_base, stride_dqas, softmax_scale,
                m_lo, a_end, n0, offs_n, offs_d, offs_d2, sq, diag, sk, window_left, window_right,
                qk_scale_log2, softcap_in, softcap_out, alibi_slope,
                b, h, dropout_threshold, dropout_scale, dropout_seed, split, splits,
                True, EVEN_D, HEADDIM, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, INPUT_PRECISION,
                ATOMIC_DQ, WANT_DK, WANT_DV, BLOCK_D2,
            )
        dk, dv, dk2, dv2 = _dkdv_block_loop(
            dk, dv, k, v, dk2, dv2, k2, v2, q_base, do_base, Lse2 + l_off, Delta + l_off, stride_qs, stride_dos,
            dq_base, stride_dqas, softmax_scale,
            a_end, b_end, n0, offs_n, offs_d, offs_d2, sq, diag, sk, window_left, window_right,
            qk_scale_log2, softcap_in, softcap_out, alibi_slope,
            b, h, dropout_threshold, dropout_scale, dropout_seed, split, splits,
            False, EVEN_D, HEADDIM, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, INPUT_PRECISION,
            ATOMIC_DQ, WANT_DK, WANT_DV, BLOCK_D2,
        )
        dk, dv, dk2, dv2 = _dkdv_block_loop(
            dk, dv, k, v, dk2, dv2, k2, v2, q_base, do_base, Lse2 + l_off, Delta + l_off, stride_qs, stride_dos,
            dq_base, stride_dqas, softmax_scale,
            b_end, m_hi, n0, offs_n, offs_d, offs_d2, sq, diag, sk, window_left, window_right,
            qk_scale_log2, softcap_in, softcap_out, alibi_slope,
            b, h, dropout_threshold, dropout_scale, dropout_seed, split, splits,
            True, EVEN_D, HEADDIM, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, INPUT_PRECISION,
            ATOMIC_DQ, WANT_DK, WANT_DV, BLOCK_D2,
        )
    if HAS_DKV_ROWS:
        rows = tl.load(DkvRows + k_start + offs_n, mask=offs_n < sk_full, other=0).to(tl.int64)
    else:
        rows = offs_n  # unused
    _store_key_grads(DK, DV, dk, dv, rows, offs_d, kv_mask, b, hk, k_start + n0, split, stride_dkb, stride_dkh,
                     stride_dks, stride_dvb, stride_dvh, stride_dvs, stride_dk_split, stride_dv_split, softmax_scale,
                     dropout_scale, 0, BLOCK_D, BLOCK_N, HAS_DKV_ROWS, HAS_DROPOUT, WANT_DK, WANT_DV)
    if BLOCK_D2 > 0:
        _store_key_grads(DK, DV, dk2, dv2, rows, offs_d2, kv_mask2, b, hk, k_start + n0, split, stride_dkb,
                         stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs, stride_dk_split, stride_dv_split,
                         softmax_scale, dropout_scale, BLOCK_D, BLOCK_D2, BLOCK_N, HAS_DKV_ROWS, HAS_DROPOUT, WANT_DK,
                         WANT_DV)


@triton.jit
def _store_key_grads(
    DK, DV, dk, dv, rows, cols, mask, b, hk, row0, split, stride_dkb, stride_dkh, stride_dks,
    stride_dvb, stride_dvh, stride_dvs, stride_dk_split, stride_dv_split, softmax_scale, dropout_scale,
    COL0: tl.constexpr, WIDTH: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DKV_ROWS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, WANT_DK: tl.constexpr, WANT_DV: tl.constexpr,
):
    """Store one head-dim part (columns ``cols``, COL0 .. COL0 + WIDTH - 1) of a key block's
    dK and dV, scaled, at rows row0.. of (batch b, KV head hk), or with HAS_DKV_ROWS at the
    rows ``rows`` of the given buffers; ``split``'s partial at its split stride."""
    if HAS_DKV_ROWS:
        dk_ptrs = DK + hk.to(tl.int64) * stride_dkh + rows[:, None] * stride_dks + cols[None, :]
        dv_ptrs = DV + hk.to(tl.int64) * stride_dvh + rows[:, None] * stride_dvs + cols[None, :]
    else:
        dk_ptrs = tile_ptrs(DK, b, hk, row0, stride_dkb, stride_dkh, stride_dks, BLOCK_N, WIDTH) + COL0
        dv_ptrs = tile_ptrs(DV, b, hk, row0, stride_dvb, stride_dvh, stride_dvs, BLOCK_N, WIDTH) + COL0
    if WANT_DK:
        dk = dk * softmax_scale
        tl.store(dk_ptrs + split.to(tl.int64) * stride_dk_split, dk.to(DK.dtype.element_ty), mask=mask)
    if WANT_DV:
        if HAS_DROPOUT:
            dv = dv * dropout_scale
        tl.store(dv_ptrs + split.to(tl.int64) * stride_dv_split, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _dq_block_loop(
    dq, q, do, dq2, q2, do2, lse2, delta,
    k_ptrs, v_ptrs, k2_ptrs, v2_ptrs, stride_ks, stride_vs,
    start, end, m0, offs_n, offs_d,
    diag, sk, window_left, window_right,
    qk_scale_log2, softcap_in, softcap_out, alibi_slope, b, h, dropout_threshold, dropout_scale, dropout_seed,
    MASKED: tl.constexpr, EVEN_D: tl.constexpr, HEADDIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_D2: tl.constexpr,
):
    """Accumulate dQ (BLOCK_M x D) over key blocks [start, end); with a second head-dim part
    (BLOCK_D2 > 0) also dq2, its columns BLOCK_D.., from q2, do2 and the K/V columns at
    k2_ptrs / v2_ptrs (unused otherwise)."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    k_ptrs += start.to(tl.int64) * stride_ks
    v_ptrs += start.to(tl.int64) * stride_vs
    if BLOCK_D2 > 0:
        k2_ptrs += start.to(tl.int64) * stride_ks
        v2_ptrs += start.to(tl.int64) * stride_vs
    for n0 in range(start, end, BLOCK_N):
        n0 = tl.multiple_of(n0, BLOCK_N)
        if MASKED:
            kv_mask = (n0 + offs_n[:, None] < sk) & (offs_d[None, :] < HEADDIM)
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=offs_d[None, :] < HEADDIM, other=0.0)
            v = tl.load(v_ptrs, mask=offs_d[None, :] < HEADDIM, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
        if BLOCK_D2 > 0:
            if MASKED:
                k2 = tl.load(k2_ptrs, mask=n0 + offs_n[:, None] < sk, other=0.0)
                v2 = tl.load(v2_ptrs, mask=n0 + offs_n[:, None] < sk, other=0.0)
            else:
                k2 = tl.load(k2_ptrs)
                v2 = tl.load(v2_ptrs)
            qk = tl.dot(q2, tl.trans(k2), qk, input_precision=INPUT_PRECISION)
        s = scaled_scores(qk, qk_scale_log2, softcap_in, softcap_out, HAS_SOFTCAP)
        if HAS_ALIBI:  # after the cap, whose derivative below needs the capped score alone
            p = tl.math.exp2(s + alibi_bias(offs_m[:, None], (n0 + offs_n)[None, :], diag, alibi_slope) - lse2[:, None])
        else:
            p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            mask = visible(offs_m[:, None], (n0 + offs_n)[None, :], diag, sk, window_left, window_right, HAS_LEFT, HAS_RIGHT)
            p = tl.where(mask, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        if BLOCK_D2 > 0:
            dp = tl.dot(do2, tl.trans(v2), dp, input_precision=INPUT_PRECISION)
        if HAS_DROPOUT:
            keep = dropout_keep(dropout_seed, b, h, m0, n0, dropout_threshold, BLOCK_M, BLOCK_N, False)
            ds = p * (tl.where(keep, dp, 0.0) * dropout_scale - delta[:, None])
        else:
            ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            t = s * (1.0 / softcap_out)
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
        if BLOCK_D2 > 0:
            dq2 = tl.dot(ds.to(k2.dtype), k2, dq2, input_precision=INPUT_PRECISION)
            k2_ptrs += BLOCK_N * stride_ks
            v2_ptrs += BLOCK_N * stride_vs
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs
    return dq, dq2


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DOut, Lse2, Delta, DQ,
    QStarts, QEnds, stride_qmeta_g, CuSeqlensK, SequsedK, Diag, stride_used_g,
    Alibi, stride_alibi_b, stride_alibi_h,
    seqlen_q, seqlen_k, total_q, total_k,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_lb, stride_lh,
    kv_group, num_m_blocks, num_groups,
    qk_scale_log2, softcap_in, softcap_out, softmax_scale,
    window_left, window_right,
    dropout_threshold, dropout_scale, dropout_seed,
    HEADDIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_SEQUSED: tl.constexpr, HAS_DIAG: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr, GROUP_ORDER: tl.constexpr, STRIDE_UNIT: tl.constexpr,
):
    """Grid: ``configs.program_grid`` over cdiv(max_seqlen_q, BLOCK_M) query blocks; order as the forward's.
    The dense tensors' (batch, token, head) strides come in units of STRIDE_UNIT elements."""
    stride_qb, stride_qs, stride_qh = in_elements(stride_qb, stride_qs, stride_qh, STRIDE_UNIT)
    stride_kb, stride_ks, stride_kh = in_elements(stride_kb, stride_ks, stride_kh, STRIDE_UNIT)
    stride_vb, stride_vs, stride_vh = in_elements(stride_vb, stride_vs, stride_vh, STRIDE_UNIT)
    stride_dob, stride_dos, stride_doh = in_elements(stride_dob, stride_dos, stride_doh, STRIDE_UNIT)
    stride_dqb, stride_dqs, stride_dqh = in_elements(stride_dqb, stride_dqs, stride_dqh, STRIDE_UNIT)
    g, m_block, b = schedule(tl.program_id(0), tl.program_id(2), num_m_blocks, num_groups, GROUP_ORDER)
    h = tl.program_id(1)
    q_start, sq, k_start, sk, _, diag = sequence_bounds(
        b, g, QStarts, QEnds, stride_qmeta_g, CuSeqlensK, SequsedK, Diag, stride_used_g,
        seqlen_q, seqlen_k, total_q, total_k, IS_VARLEN, HAS_SEQUSED, HAS_DIAG,
    )
    m0 = m_block * BLOCK_M
    if m0 >= sq:
        return
    hk = h // kv_group
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    EVEN_D: tl.constexpr = BLOCK_D <= HEADDIM  # the first (or only) head-dim part lies inside the head dim
    row_ok = offs_m < sq
    tile_mask = row_ok[:, None] & (offs_d[None, :] < HEADDIM)
    q = tl.load(tile_ptrs(Q, b, h, q_start + m0, stride_qb, stride_qh, stride_qs, BLOCK_M, BLOCK_D),
                mask=tile_mask, other=0.0)
    do = tl.load(tile_ptrs(DOut, b, h, q_start + m0, stride_dob, stride_doh, stride_dos, BLOCK_M, BLOCK_D),
                 mask=tile_mask, other=0.0)
    l_off = row_base(0, b, h, q_start + m0, stride_lb, stride_lh, 1) + tl.arange(0, BLOCK_M)
    lse2 = tl.load(Lse2 + l_off, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + l_off, mask=row_ok, other=0.0)
    k_ptrs = tile_ptrs(K, b, hk, k_start, stride_kb, stride_kh, stride_ks, BLOCK_N, BLOCK_D)
    v_ptrs = tile_ptrs(V, b, hk, k_start, stride_vb, stride_vh, stride_vs, BLOCK_N, BLOCK_D)
    n_lo, a_end, b_end, n_hi = key_block_ranges(
        m0, sq, sk, diag, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT
    )
    alibi_slope = load_alibi_slope(Alibi, b, h, stride_alibi_b, stride_alibi_h, HAS_ALIBI, True)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if BLOCK_D2 > 0:  # the head dim's second part: columns BLOCK_D .. HEADDIM - 1 (``configs.head_parts``)
        tl.static_assert(BLOCK_D + BLOCK_D2 == HEADDIM)
        tile_mask2 = row_ok[:, None]
        q2 = tl.load(tile_ptrs(Q, b, h, q_start + m0, stride_qb, stride_qh, stride_qs, BLOCK_M, BLOCK_D2) + BLOCK_D,
                     mask=tile_mask2, other=0.0)
        do2 = tl.load(tile_ptrs(DOut, b, h, q_start + m0, stride_dob, stride_doh, stride_dos, BLOCK_M, BLOCK_D2)
                      + BLOCK_D, mask=tile_mask2, other=0.0)
        k2_ptrs = tile_ptrs(K, b, hk, k_start, stride_kb, stride_kh, stride_ks, BLOCK_N, BLOCK_D2) + BLOCK_D
        v2_ptrs = tile_ptrs(V, b, hk, k_start, stride_vb, stride_vh, stride_vs, BLOCK_N, BLOCK_D2) + BLOCK_D
        dq2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)
    else:  # placeholders the loops pass along untouched
        q2, do2, k2_ptrs, v2_ptrs, dq2 = q, do, k_ptrs, v_ptrs, dq
    if HAS_LEFT:
        dq, dq2 = _dq_block_loop(
            dq, q, do, dq2, q2, do2, lse2, delta, k_ptrs, v_ptrs, k2_ptrs, v2_ptrs, stride_ks, stride_vs, n_lo, a_end,
            m0, offs_n, offs_d,
            diag, sk, window_left, window_right, qk_scale_log2, softcap_in, softcap_out, alibi_slope,
            b, h, dropout_threshold, dropout_scale, dropout_seed,
            True, EVEN_D, HEADDIM, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, INPUT_PRECISION,
            BLOCK_D2,
        )
    dq, dq2 = _dq_block_loop(
        dq, q, do, dq2, q2, do2, lse2, delta, k_ptrs, v_ptrs, k2_ptrs, v2_ptrs, stride_ks, stride_vs, a_end, b_end,
        m0, offs_n, offs_d,
        diag, sk, window_left, window_right, qk_scale_log2, softcap_in, softcap_out, alibi_slope,
        b, h, dropout_threshold, dropout_scale, dropout_seed,
        False, EVEN_D, HEADDIM, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, INPUT_PRECISION,
        BLOCK_D2,
    )
    dq, dq2 = _dq_block_loop(
        dq, q, do, dq2, q2, do2, lse2, delta, k_ptrs, v_ptrs, k2_ptrs, v2_ptrs, stride_ks, stride_vs, b_end, n_hi,
        m0, offs_n, offs_d,
        diag, sk, window_left, window_right, qk_scale_log2, softcap_in, softcap_out, alibi_slope,
        b, h, dropout_threshold, dropout_scale, dropout_seed,
        True, EVEN_D, HEADDIM, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, INPUT_PRECISION,
        BLOCK_D2,
    )
    dq = dq * softmax_scale
    tl.store(tile_ptrs(DQ, b, h, q_start + m0, stride_dqb, stride_dqh, stride_dqs, BLOCK_M, BLOCK_D),
             dq.to(DQ.dtype.element_ty), mask=tile_mask)
    if BLOCK_D2 > 0:
        dq2 = dq2 * softmax_scale
        tl.store(tile_ptrs(DQ, b, h, q_start + m0, stride_dqb, stride_dqh, stride_dqs, BLOCK_M, BLOCK_D2) + BLOCK_D,
                 dq2.to(DQ.dtype.element_ty), mask=tile_mask2)


#: The widest (padded) head dim the atomic 5-GEMM backward takes (see ``attention_backward``).
ATOMIC_DQ_MAX_BLOCK_D = 128


def prepare_backward(
    dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, prob: AttnProblem
) -> tuple[torch.Tensor, torch.Tensor]:
    """(delta, lse2): delta = rowsum(dout * out) and lse in log2 units, both float32 in
    lse's layout. The backward of one forward needs them once, however many calls it makes
    (context parallelism). The launch is worked out once per signature (``_PREPARE_PLANS``)."""
    lse = lse.contiguous()  # delta and lse2 are written with lse's strides (a (nheads, n) copy at most)
    delta = torch.empty(lse.shape, dtype=torch.float32, device=lse.device)
    lse2 = torch.empty(lse.shape, dtype=torch.float32, device=lse.device)
    if lse.numel() == 0:
        return delta, lse2
    key = (out.shape, out.stride(), dout.stride(), lse.shape, out.dtype, dout.dtype, out.device, prob.is_varlen,
           prob.headdim, prob.nheads, out.data_ptr() % 16 == 0, dout.data_ptr() % 16 == 0, lse.data_ptr() % 16 == 0)
    plan = _PREPARE_PLANS.get(key)
    if plan is None:
        # Viewed as (batch, rows, head, d); varlen as one sequence of all its tokens.
        rows, batch = (out.shape[0], 1) if prob.is_varlen else (out.shape[1], out.shape[0])
        unit = stride_unit(out, dout, is_varlen=prob.is_varlen)
        strides = (*dense_strides(out, prob.is_varlen, unit), *dense_strides(dout, prob.is_varlen, unit))
        block_r = 16 if interpreting() else 64
        plan = _PREPARE_PLANS.keep(key, (
            (cdiv(rows, block_r), prob.nheads, batch), (rows, *strides, *lse_strides(lse, prob.is_varlen)),
            PlannedLaunch(_bwd_preprocess_kernel, dict(HEADDIM=prob.headdim, BLOCK_D=prob.block_d, BLOCK_R=block_r,
                                                       LOG2_BLOCK_D=prob.block_d.bit_length() - 1, STRIDE_UNIT=unit)),
        ))
    grid, scalars, launch = plan
    launch(grid, (out, dout, lse, delta, lse2, *scalars))
    return delta, lse2


#: ``prepare_backward``'s (grid, scalar arguments, launch) by signature.
_PREPARE_PLANS = PlanTable()


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    prob: AttnProblem,
    meta: Optional[SeqMeta] = None,
    *,
    dq: Optional[torch.Tensor] = None,
    dk: Optional[torch.Tensor] = None,
    dv: Optional[torch.Tensor] = None,
    prepared: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    after_dkdv: Optional[Callable[[], None]] = None,
    dkv_rows: Optional[torch.Tensor] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    dropout: Optional[tuple[float, int]] = None,
    atomic_dq: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) in the inputs' dtypes and shapes, laid out as the inputs where
    those are dense and writable (``common.grad_buffer``), contiguous otherwise.

    ``out`` and ``lse`` are the forward's results (lse float32 in the forward's layout).
    Given ``dq``/``dk``/``dv`` (views allowed; float32 allowed), the gradients are written
    there: every key of every sequence of k (zero for keys no entry sees), but only the
    query rows that some entry covers. ``prepared`` is ``prepare_backward``'s result.
    ``dkv_rows`` (varlen, int64 (total_k,), caller-checked): key i's gradients go to row
    ``dkv_rows[i]`` of the given ``dk``/``dv``, which may have any number of rows.
    ``after_dkdv`` runs once dK/dV are enqueued and before dQ is, so that a caller can
    start communicating dK/dV while dQ computes (context parallelism). ``alibi_slopes`` and
    ``dropout`` (the forward's probability and seed, which regenerate its mask) as in
    ``attention_forward``. ``atomic_dq``: the 5-GEMM backward, dQ accumulated in float32 by
    atomics inside the dK/dV kernel instead of a separate dQ kernel (faster where the dQ
    pass's recomputation dominates; the summation order then varies from run to run, so
    not deterministic). Not with ``dkv_rows``.
    """
    check_device(q)
    token_dim = 0 if prob.is_varlen else 1
    dq = grad_buffer(q, token_dim) if dq is None else dq
    dk = grad_buffer(k, token_dim) if dk is None else dk
    dv = grad_buffer(v, token_dim) if dv is None else dv
    if dkv_rows is not None and meta is None:
        raise ValueError("dkv_rows: given for a dense problem; expected varlen metadata")
    for name, buf in (("dq", dq), ("dk", dk), ("dv", dv)):
        check_output_buffer(buf, name, token_dim)
    dout, q, k, v, out = (kernel_operand(x, token_dim) for x in (dout, q, k, v, out))
    if q.numel() == 0 or k.numel() == 0:
        dq.zero_()
        if dkv_rows is None:
            dk.zero_()
            dv.zero_()
        else:  # only the named rows are this call's: the others hold a caller's sums (CP's own keys)
            dk.index_fill_(0, dkv_rows, 0)
            dv.index_fill_(0, dkv_rows, 0)
        # A caller may communicate dK/dV from this hook (context parallelism): a rank with
        # no queries or keys must still make that call, or the other ranks wait forever.
        if after_dkdv is not None:
            after_dkdv()
        return dq, dk, dv
    results = (dq, dk, dv)
    dq, dk, dv = (interpreter_output(x) for x in results)
    delta, lse2 = prepare_backward(dout, out, lse, prob) if prepared is None else prepared
    if atomic_dq and dkv_rows is not None:
        raise ValueError("atomic_dq: not with dkv_rows (context parallelism keeps the two-kernel backward)")
    # The atomic dQ's tiles outgrow shared memory past d=128: run 39's wide grid could not
    # launch it at d=192 or 256 (278784 bytes needed against an H200's 232448), where it
    # had also been the slower backward (run 26). Wider heads keep the two-kernel backward:
    # the same gradients, deterministic.
    atomic_dq = atomic_dq and prob.block_d <= ATOMIC_DQ_MAX_BLOCK_D
    # The float32 dQ accumulator of the 5-GEMM backward, in q's layout.
    dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if atomic_dq else delta
    io = _BackwardTensors(q, k, v, dout, lse2, delta, dq, dk, dv, dkv_rows, dq_acc, meta, alibi_slopes, dropout)
    key = _backward_key(io, prob, atomic_dq)
    plan = _PLANS.get(key)
    if plan is None:
        # Made once per signature; under RINGFLASH_AUTOTUNE the tuner first times each
        # candidate through a plan of its own.
        dkdv_cfg = configs.config_for("dkdv", q, prob, run=lambda cfg: _launch_dkdv(_dkdv_plan(cfg, io, prob, atomic_dq),
                                                                                     io, prob),
                                      dropout=dropout is not None, atomic_dq=atomic_dq)
        if atomic_dq and configs.autotune_enabled():
            dq_acc.zero_()  # the timing runs of the autotuner added into it
        dq_plan = None
        if not atomic_dq:
            dq_cfg = configs.config_for("dq", q, prob, run=lambda cfg: _launch_dq(_dq_plan(cfg, io, prob), io),
                                        dropout=dropout is not None)
            dq_plan = _dq_plan(dq_cfg, io, prob)
        plan = _PLANS.keep(key, (_dkdv_plan(dkdv_cfg, io, prob, atomic_dq), dq_plan))
    dkdv_plan, dq_plan = plan
    _launch_dkdv(dkdv_plan, io, prob)
    finish_output(results[1], dk)
    finish_output(results[2], dv)
    if after_dkdv is not None:
        after_dkdv()
    if atomic_dq:
        results[0].copy_(dq_acc)
    else:
        _launch_dq(dq_plan, io)
        finish_output(results[0], dq)
    return results


@dataclass(frozen=True)
class _BackwardTensors:
    """One backward call's tensors as its kernels take them (after ``kernel_operand``), and
    its metadata, ALiBi slopes and dropout."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    lse2: torch.Tensor
    delta: torch.Tensor
    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    dkv_rows: Optional[torch.Tensor]
    dq_acc: torch.Tensor
    meta: Optional[SeqMeta]
    alibi_slopes: Optional[torch.Tensor]
    dropout: Optional[tuple[float, int]]

    def pointers(self) -> tuple:
        """The tensors among ``seqlen_args`` and ``alibi_args``, in the kernels' order."""
        alibi = self.alibi_slopes if self.alibi_slopes is not None else self.delta
        return (*seq_pointers(self.q, self.meta), alibi)


def _backward_key(io: _BackwardTensors, prob: AttnProblem, atomic_dq: bool) -> tuple:
    """Everything the backward's plans read, and what Triton specializes their launches on
    beyond it (as ``fwd._forward_key``), with the dK/dV split setting."""
    tensors = (io.q, io.k, io.v, io.dout, io.lse2, io.delta, io.dq, io.dk, io.dv)
    return (
        tuple((t.shape, t.stride(), t.dtype, t.data_ptr() % 16 == 0) for t in tensors), io.q.device, prob,
        meta_signature(io.meta), atomic_dq,
        None if io.dkv_rows is None else (io.dkv_rows.shape, io.dkv_rows.dtype, io.dkv_rows.data_ptr() % 16 == 0),
        None if io.alibi_slopes is None else
        (io.alibi_slopes.shape, io.alibi_slopes.stride(), io.alibi_slopes.data_ptr() % 16 == 0),
        None if io.dropout is None else (io.dropout[0], int_class(int(io.dropout[1]))),
        configs.override_key(), configs.head_parts(prob.headdim), configs.input_precision(io.q.dtype),
        configs.autotune_enabled(), os.environ.get("RINGFLASH_DKV_SPLITS"),
    )


def _flags(io: _BackwardTensors, prob: AttnProblem) -> dict:
    """The constexprs both backward kernels share."""
    block_d, block_d2 = configs.head_parts(prob.headdim)
    return dict(
        HEADDIM=prob.headdim, BLOCK_D=block_d, BLOCK_D2=block_d2,
        **meta_flags(io.meta),
        HAS_LEFT=prob.has_left, HAS_RIGHT=prob.has_right, HAS_SOFTCAP=softcap_mode(prob.softcap, io.q.dtype),
        HAS_ALIBI=io.alibi_slopes is not None, HAS_DROPOUT=io.dropout is not None,
        INPUT_PRECISION=configs.input_precision(io.q.dtype),
    )


def _shared_args(io: _BackwardTensors, prob: AttnProblem, unit: int) -> tuple:
    """(sequence and ALiBi arguments, q/k/v/dout strides in units of ``unit`` elements,
    scalars) of both kernels."""
    seq_args = seqlen_args(io.q, io.k, io.meta)
    seq_args = (*seq_args[:7], *alibi_args(io.alibi_slopes, io.delta), *seq_args[7:])
    qkv_strides = tuple(s for x in (io.q, io.k, io.v, io.dout) for s in dense_strides(x, prob.is_varlen, unit))
    scalars = (*prob.scalar_args(), prob.softmax_scale, prob.window_left, prob.window_right,
               *dropout_args(io.dropout))
    return seq_args, qkv_strides, scalars


@dataclass(frozen=True)
class _KernelPlan:
    """One backward kernel's launches (two passes of the dK/dV kernel, or one) but for the
    call's tensors and dropout seed; ``splits``: the dK/dV kernel's float32 partials."""
    grid: tuple
    args: ArgTemplate
    launches: tuple
    splits: int = 1


#: Backward plans by call signature (``attention_backward``): (dK/dV plan, dQ plan or None).
_PLANS = PlanTable()


def _dkdv_plan(cfg: configs.KernelConfig, io: _BackwardTensors, prob: AttnProblem, atomic_dq: bool) -> _KernelPlan:
    splits = 1 if io.dkv_rows is not None else configs.dkv_splits(prob, cfg, io.q.device)
    if splits == 1:
        dk_first, dv_first, split_strides = io.dk, io.dv, (0, 0)
    else:  # the float32 partials' layout (the call allocates them)
        partial = torch.empty((splits,) + tuple(io.k.shape), dtype=torch.float32, device="meta")
        dk_first = dv_first = partial[0]
        split_strides = (partial.stride(0), partial.stride(0))
    unit = stride_unit(io.q, io.k, io.v, io.dout, dk_first, dv_first, *((io.dq_acc, ) if atomic_dq else ()),
                       is_varlen=prob.is_varlen)
    seq_args, qkv_strides, scalars = _shared_args(io, prob, unit)
    args = (
        io.q, io.k, io.v, io.dout, io.lse2, io.delta, dk_first, dv_first,
        io.dkv_rows if io.dkv_rows is not None else io.delta, io.dq_acc,
        *seq_args, *qkv_strides, *dense_strides(dk_first, prob.is_varlen, unit),
        *dense_strides(dv_first, prob.is_varlen, unit),
        *(dense_strides(io.dq_acc, prob.is_varlen, unit) if atomic_dq else (0, 0, 0)),
        *lse_strides(io.lse2, prob.is_varlen),
        prob.nheads // prob.nheads_k, prob.num_groups, splits, *split_strides, *scalars,
    )
    flags = _flags(io, prob)
    # Two passes hold one accumulator each (dV, then dK and the atomic dQ), for head dims
    # whose two accumulators and K/V tiles spill; each pass recomputes P.
    passes = ((False, True), (True, False)) if cfg.dkdv_passes == 2 else ((True, True),)
    return _KernelPlan(
        grid=(cdiv(prob.max_seqlen_k, cfg.block_n), prob.nheads_k * splits, prob.batch), args=ArgTemplate(args),
        launches=tuple(PlannedLaunch(_bwd_dkdv_kernel, dict(
            **cfg.launch_args(), **flags, HAS_DKV_ROWS=io.dkv_rows is not None, ATOMIC_DQ=atomic_dq and want_dk,
            WANT_DK=want_dk, WANT_DV=want_dv, STRIDE_UNIT=unit)) for want_dk, want_dv in passes),
        splits=splits,
    )


def _launch_dkdv(plan: _KernelPlan, io: _BackwardTensors, prob: AttnProblem) -> None:
    if plan.splits == 1:
        dk_out, dv_out = io.dk, io.dv
    else:  # float32 partials (splits, *k.shape), zeroed (rows no program writes add 0)
        dk_out, dv_out = (torch.zeros((plan.splits,) + tuple(io.k.shape), dtype=torch.float32, device=io.k.device)
                          for _ in range(2))
    dk_first, dv_first = (dk_out, dv_out) if plan.splits == 1 else (dk_out[0], dv_out[0])
    # The tensors in the order of the kernel's pointer arguments (``_dkdv_plan``'s args).
    args = plan.args.fill((io.q, io.k, io.v, io.dout, io.lse2, io.delta, dk_first, dv_first,
                           io.dkv_rows if io.dkv_rows is not None else io.delta, io.dq_acc, *io.pointers()))
    if io.dropout is not None:
        args[-1] = int(io.dropout[1])  # the seed, the last argument (``dropout_args``)
    for launch in plan.launches:
        launch(plan.grid, args)
    if plan.splits > 1:  # a fixed order of additions: deterministic
        io.dk.copy_(dk_out.sum(0))
        io.dv.copy_(dv_out.sum(0))


def _dq_plan(cfg: configs.KernelConfig, io: _BackwardTensors, prob: AttnProblem) -> _KernelPlan:
    cfg = configs.fit_grid(cfg, prob)
    num_m_blocks = cdiv(prob.max_seqlen_q, cfg.block_m)
    unit = stride_unit(io.q, io.k, io.v, io.dout, io.dq, is_varlen=prob.is_varlen)
    seq_args, qkv_strides, scalars = _shared_args(io, prob, unit)
    args = (
        io.q, io.k, io.v, io.dout, io.lse2, io.delta, io.dq, *seq_args, *qkv_strides,
        *dense_strides(io.dq, prob.is_varlen, unit), *lse_strides(io.lse2, prob.is_varlen),
        prob.nheads // prob.nheads_k, num_m_blocks, prob.num_groups, *scalars,
    )
    return _KernelPlan(grid=configs.program_grid(cfg, num_m_blocks, prob), args=ArgTemplate(args),
                       launches=(PlannedLaunch(_bwd_dq_kernel, dict(**cfg.launch_args(), **_flags(io, prob),
                                                                     GROUP_ORDER=cfg.group_order_code,
                                                                     STRIDE_UNIT=unit)),))


def _launch_dq(plan: _KernelPlan, io: _BackwardTensors) -> None:
    args = plan.args.fill((io.q, io.k, io.v, io.dout, io.lse2, io.delta, io.dq, *io.pointers()))
    if io.dropout is not None:
        args[-1] = int(io.dropout[1])
    plan.launches[0](plan.grid, args)
