"""FlashAttention-2 forward in Triton, and its host launcher.

One kernel body serves dense and varlen batches, causal / sliding-window / softcap,
GQA/MQA and split-KV; each variant is a constexpr or data. Scores are kept in log2
units (the softmax scale is pre-multiplied by log2(e)) so the exponentials are exp2.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import configs
from .common import (
    alibi_bias, cdiv, check_device, dropout_keep, load_alibi_slope, check_output_buffer, finish_output, interpreter_output, kernel_operand, key_block_ranges,
    in_elements, next_power_of_2, row_base, scaled_scores, schedule, softcap_mode, sequence_bounds, tile_ptrs, tma_readable, visible,
)
from .launch import ArgTemplate, PlannedLaunch, PlanTable, cached_launch, descriptor_key, int_class
from .problem import (
    AttnProblem, SeqMeta, alibi_args, dense_strides, dropout_args, lse_strides, meta_flags, meta_signature,
    seq_pointers, seqlen_args, stride_unit, strides_unit,
)


@triton.jit
def _fwd_block_loop(
    acc, l_i, m_i, q, acc2, q2,
    k_ptrs, v_ptrs, k2_ptrs, v2_ptrs, stride_ks, stride_vs,
    start, end, m0, offs_n, offs_d,
    diag, sk, window_left, window_right,
    qk_scale_log2, softcap_in, softcap_out, alibi_slope, b, h, dropout_threshold, dropout_seed, kv_b, kv_row, kv_h,
    MASKED: tl.constexpr, EVEN_D: tl.constexpr, HEADDIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr, KV_CACHE: tl.constexpr, USE_EXP2: tl.constexpr,
    BLOCK_D2: tl.constexpr, KV_TMA: tl.constexpr,
):
    """Online-softmax update of (acc, l_i, m_i) over key blocks [start, end); with a second
    head-dim part (BLOCK_D2 > 0: ``configs.head_parts``) also of acc2, the output's columns
    BLOCK_D.., from q2 and the K/V columns at k2_ptrs / v2_ptrs (unused otherwise).

    Scores are in log2 units when USE_EXP2, natural units otherwise (the host scales them);
    ``alibi_slope`` is in the same units.

    KV_TMA: ``k_ptrs``/``v_ptrs`` are TMA descriptors over (batch, keys, heads, d), the
    sequence's keys from (``kv_b``, ``kv_row``) of head ``kv_h``; keys past the tensor and
    columns past d read as zeros, and a masked block zeroes V's rows past ``sk`` (a varlen
    sequence's next keys, or a cache's unused slots) so that no value of them reaches acc."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    if not KV_TMA:
        k_ptrs += start.to(tl.int64) * stride_ks
        v_ptrs += start.to(tl.int64) * stride_vs
    if BLOCK_D2 > 0:
        k2_ptrs += start.to(tl.int64) * stride_ks
        v2_ptrs += start.to(tl.int64) * stride_vs
    for n0 in range(start, end, BLOCK_N):
        n0 = tl.multiple_of(n0, BLOCK_N)
        if KV_TMA:
            k = k_ptrs.load([kv_b, kv_row + n0, kv_h, 0]).reshape(BLOCK_N, offs_d.shape[0])
        elif MASKED:
            kv_mask = (n0 + offs_n[:, None] < sk) & (offs_d[None, :] < HEADDIM)
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0, cache_modifier=KV_CACHE)
        elif EVEN_D:
            k = tl.load(k_ptrs, cache_modifier=KV_CACHE)
        else:
            k = tl.load(k_ptrs, mask=offs_d[None, :] < HEADDIM, other=0.0, cache_modifier=KV_CACHE)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
        if BLOCK_D2 > 0:  # the second part's columns, all inside the head dim
            if MASKED:
                k2 = tl.load(k2_ptrs, mask=n0 + offs_n[:, None] < sk, other=0.0, cache_modifier=KV_CACHE)
            else:
                k2 = tl.load(k2_ptrs, cache_modifier=KV_CACHE)
            qk = tl.dot(q2, tl.trans(k2), qk, input_precision=INPUT_PRECISION)
        s = scaled_scores(qk, qk_scale_log2, softcap_in, softcap_out, HAS_SOFTCAP)
        if HAS_ALIBI:
            s += alibi_bias(offs_m[:, None], (n0 + offs_n)[None, :], diag, alibi_slope)
        if MASKED:
            mask = visible(offs_m[:, None], (n0 + offs_n)[None, :], diag, sk, window_left, window_right, HAS_LEFT, HAS_RIGHT)
            s = tl.where(mask, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen only masked keys keeps max -inf: subtract 0 instead of -inf.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_sub = m_new
        if USE_EXP2:
            p = tl.math.exp2(s - m_sub[:, None])
            alpha = tl.math.exp2(m_i - m_sub)
        else:
            p = tl.exp(s - m_sub[:, None])
            alpha = tl.exp(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if BLOCK_D2 > 0:
            acc2 = acc2 * alpha[:, None]
        if KV_TMA:
            v = v_ptrs.load([kv_b, kv_row + n0, kv_h, 0]).reshape(BLOCK_N, offs_d.shape[0])
            if MASKED:
                v = tl.where(n0 + offs_n[:, None] < sk, v, 0.0)
        elif MASKED:
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0, cache_modifier=KV_CACHE)
        elif EVEN_D:
            v = tl.load(v_ptrs, cache_modifier=KV_CACHE)
        else:
            v = tl.load(v_ptrs, mask=offs_d[None, :] < HEADDIM, other=0.0, cache_modifier=KV_CACHE)
        if HAS_DROPOUT:  # l_i keeps the undropped sum; the 1 / (1 - p) comes at the end
            p = tl.where(dropout_keep(dropout_seed, b, h, m0, n0, dropout_threshold, BLOCK_M, BLOCK_N, False), p, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        if BLOCK_D2 > 0:
            if MASKED:
                v2 = tl.load(v2_ptrs, mask=n0 + offs_n[:, None] < sk, other=0.0, cache_modifier=KV_CACHE)
            else:
                v2 = tl.load(v2_ptrs, cache_modifier=KV_CACHE)
            acc2 = tl.dot(p.to(v2.dtype), v2, acc2, input_precision=INPUT_PRECISION)
            k2_ptrs += BLOCK_N * stride_ks
            v2_ptrs += BLOCK_N * stride_vs
        m_i = m_new
        if not KV_TMA:
            k_ptrs += BLOCK_N * stride_ks
            v_ptrs += BLOCK_N * stride_vs
    return acc, l_i, m_i, acc2


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse,
    QStarts, QEnds, stride_qmeta_g, CuSeqlensK, SequsedK, Diag, stride_used_g,
    Alibi, stride_alibi_b, stride_alibi_h,
    seqlen_q, seqlen_k, total_q, total_k,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh, stride_osplit,
    stride_lb, stride_lh, stride_lsplit,
    kv_group, num_m_blocks, num_groups, num_splits,
    qk_scale_log2, softcap_in, softcap_out,
    window_left, window_right,
    dropout_threshold, dropout_scale, dropout_seed,
    HEADDIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_SEQUSED: tl.constexpr, HAS_DIAG: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, IS_SPLIT: tl.constexpr, INPUT_PRECISION: tl.constexpr, KV_CACHE: tl.constexpr,
    SPLIT_PHASES: tl.constexpr, USE_EXP2: tl.constexpr, GROUP_ORDER: tl.constexpr, STRIDE_UNIT: tl.constexpr,
    KV_TMA: tl.constexpr = False,
):
    """Grid: ``configs.program_grid`` (query blocks x splits, heads, batch), with the groups
    on axis 0 or 2 as ``schedule`` orders them.

    Axis 0 runs the splits of one (group, query block) together. Writes out (q's dtype) and
    lse (float32, natural log), or with IS_SPLIT the float32 partial out/lse of its key split
    for the combine kernel. The q, k, v and out strides come in units of STRIDE_UNIT elements.
    KV_TMA (``configs.fwd_kv_tma``): K and V are TMA descriptors over (batch, keys, heads, d)
    (varlen: batch 1 of all tokens), read by the loops' TMA loads instead of pointers.
    """
    stride_qb, stride_qs, stride_qh = in_elements(stride_qb, stride_qs, stride_qh, STRIDE_UNIT)
    stride_kb, stride_ks, stride_kh = in_elements(stride_kb, stride_ks, stride_kh, STRIDE_UNIT)
    stride_vb, stride_vs, stride_vh = in_elements(stride_vb, stride_vs, stride_vh, STRIDE_UNIT)
    stride_ob, stride_os, stride_oh = in_elements(stride_ob, stride_os, stride_oh, STRIDE_UNIT)
    pid = tl.program_id(0)
    h = tl.program_id(1)
    if IS_SPLIT:
        split = pid % num_splits
        pid = pid // num_splits
    g, m_block, b = schedule(pid, tl.program_id(2), num_m_blocks, num_groups, GROUP_ORDER)
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

    row_mask = offs_m < sq
    q = tl.load(
        tile_ptrs(Q, b, h, q_start + m0, stride_qb, stride_qh, stride_qs, BLOCK_M, BLOCK_D),
        mask=row_mask[:, None] & (offs_d[None, :] < HEADDIM), other=0.0,
    )
    if KV_TMA:
        tl.static_assert(BLOCK_D2 == 0)
        k_ptrs = K
        v_ptrs = V
        kv_b = 0 if IS_VARLEN else b
    else:
        k_ptrs = tile_ptrs(K, b, hk, k_start, stride_kb, stride_kh, stride_ks, BLOCK_N, BLOCK_D)
        v_ptrs = tile_ptrs(V, b, hk, k_start, stride_vb, stride_vh, stride_vs, BLOCK_N, BLOCK_D)
        kv_b = b
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if BLOCK_D2 > 0:  # the head dim's second part: columns BLOCK_D .. HEADDIM - 1 (``configs.head_parts``)
        tl.static_assert(BLOCK_D + BLOCK_D2 == HEADDIM)
        q2 = tl.load(tile_ptrs(Q, b, h, q_start + m0, stride_qb, stride_qh, stride_qs, BLOCK_M, BLOCK_D2) + BLOCK_D,
                     mask=row_mask[:, None], other=0.0)
        k2_ptrs = tile_ptrs(K, b, hk, k_start, stride_kb, stride_kh, stride_ks, BLOCK_N, BLOCK_D2) + BLOCK_D
        v2_ptrs = tile_ptrs(V, b, hk, k_start, stride_vb, stride_vh, stride_vs, BLOCK_N, BLOCK_D2) + BLOCK_D
        acc2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)
    else:  # placeholders the loops pass along untouched
        q2, k2_ptrs, v2_ptrs, acc2 = q, k_ptrs, v_ptrs, acc

    n_lo, a_end, b_end, n_hi = key_block_ranges(
        m0, sq, sk, diag, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT
    )
    if not SPLIT_PHASES:  # measurement switch: every block through the masked loop
        a_end = n_lo
        b_end = n_lo
    if IS_SPLIT:
        # This split's share of the key blocks, intersected with each phase.
        blocks_per_split = tl.cdiv(tl.cdiv(tl.maximum(n_hi - n_lo, 0), BLOCK_N), num_splits)
        s_lo = n_lo + split * blocks_per_split * BLOCK_N
        s_hi = tl.minimum(s_lo + blocks_per_split * BLOCK_N, n_hi)
        a_lo = tl.maximum(n_lo, s_lo)
        a_end = tl.minimum(a_end, s_hi)
        b_lo = tl.maximum(a_end, s_lo)
        b_end = tl.minimum(b_end, s_hi)
        c_lo = tl.maximum(b_end, s_lo)
        n_hi = s_hi
    else:
        a_lo = n_lo
        b_lo = a_end
        c_lo = b_end

    alibi_slope = load_alibi_slope(Alibi, b, h, stride_alibi_b, stride_alibi_h, HAS_ALIBI, USE_EXP2)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_LEFT:
        acc, l_i, m_i, acc2 = _fwd_block_loop(
            acc, l_i, m_i, q, acc2, q2, k_ptrs, v_ptrs, k2_ptrs, v2_ptrs, stride_ks, stride_vs, a_lo, a_end, m0, offs_n,
            offs_d,
            diag, sk, window_left, window_right, qk_scale_log2, softcap_in, softcap_out, alibi_slope,
            b, h, dropout_threshold, dropout_seed, kv_b, k_start, hk,
            True, EVEN_D, HEADDIM, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, INPUT_PRECISION,
            KV_CACHE, USE_EXP2, BLOCK_D2, KV_TMA,
        )
    acc, l_i, m_i, acc2 = _fwd_block_loop(
        acc, l_i, m_i, q, acc2, q2, k_ptrs, v_ptrs, k2_ptrs, v2_ptrs, stride_ks, stride_vs, b_lo, b_end, m0, offs_n,
        offs_d,
        diag, sk, window_left, window_right, qk_scale_log2, softcap_in, softcap_out, alibi_slope,
        b, h, dropout_threshold, dropout_seed, kv_b, k_start, hk,
        False, EVEN_D, HEADDIM, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, INPUT_PRECISION,
        KV_CACHE, USE_EXP2, BLOCK_D2, KV_TMA,
    )
    acc, l_i, m_i, acc2 = _fwd_block_loop(
        acc, l_i, m_i, q, acc2, q2, k_ptrs, v_ptrs, k2_ptrs, v2_ptrs, stride_ks, stride_vs, c_lo, n_hi, m0, offs_n,
        offs_d,
        diag, sk, window_left, window_right, qk_scale_log2, softcap_in, softcap_out, alibi_slope,
        b, h, dropout_threshold, dropout_seed, kv_b, k_start, hk,
        True, EVEN_D, HEADDIM, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, INPUT_PRECISION,
        KV_CACHE, USE_EXP2, BLOCK_D2, KV_TMA,
    )

    # Rows that saw no key: out = 0, lse = -inf.
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if HAS_DROPOUT:
        out = out * dropout_scale
    if USE_EXP2:
        lse = (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453
    else:
        lse = m_i + tl.log(tl.where(empty, 1.0, l_i))
    lse = tl.where(empty, float("-inf"), lse)
    if IS_SPLIT:
        o_base = Out + split.to(tl.int64) * stride_osplit
        l_base = Lse + split.to(tl.int64) * stride_lsplit
    else:
        o_base = Out
        l_base = Lse
    tl.store(tile_ptrs(o_base, b, h, q_start + m0, stride_ob, stride_oh, stride_os, BLOCK_M, BLOCK_D),
             out.to(o_base.dtype.element_ty), mask=row_mask[:, None] & (offs_d[None, :] < HEADDIM))
    if BLOCK_D2 > 0:
        out2 = acc2 / tl.where(empty, 1.0, l_i)[:, None]
        if HAS_DROPOUT:
            out2 = out2 * dropout_scale
        tl.store(tile_ptrs(o_base, b, h, q_start + m0, stride_ob, stride_oh, stride_os, BLOCK_M, BLOCK_D2) + BLOCK_D,
                 out2.to(o_base.dtype.element_ty), mask=row_mask[:, None])
    tl.store(row_base(l_base, b, h, q_start + m0, stride_lb, stride_lh, 1) + tl.arange(0, BLOCK_M), lse, mask=row_mask)


@triton.jit
def _combine_splits_kernel(
    OutPartial, LsePartial, Out, Lse,
    num_splits, rows,
    stride_ps, stride_pb, stride_pr, stride_ph,
    stride_qs, stride_qb, stride_qh,
    stride_ob, stride_or, stride_oh,
    stride_lb, stride_lh,
    HEADDIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, MAX_SPLITS: tl.constexpr,
    STRIDE_UNIT: tl.constexpr,
):
    """Merge per-split partial results through their lse: lse = logsumexp_s lse_s,
    out = sum_s exp(lse_s - lse) * out_s. Rows whose every split is empty stay 0 / -inf.

    Grid (batch * cdiv(rows, BLOCK_R), nheads): the batch on axis 0, whose limit is 2**31 - 1
    (a decode batch can pass axis 1's and 2's 65535); varlen runs as batch 1 over all tokens.
    Partial out is (split, batch, row, head, d), partial lse (split, batch, head, row). The
    partial out's and out's strides come in units of STRIDE_UNIT elements."""
    stride_pb, stride_pr, stride_ph = in_elements(stride_pb, stride_pr, stride_ph, STRIDE_UNIT)
    stride_ob, stride_or, stride_oh = in_elements(stride_ob, stride_or, stride_oh, STRIDE_UNIT)
    stride_ps = stride_ps * STRIDE_UNIT
    row_blocks = tl.cdiv(rows, BLOCK_R)
    pid_r = tl.program_id(0) % row_blocks
    b = tl.program_id(0) // row_blocks
    h = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_s = tl.arange(0, MAX_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    r_mask = offs_r < rows
    lse_s = tl.load(
        LsePartial + offs_s[None, :].to(tl.int64) * stride_qs + b.to(tl.int64) * stride_qb
        + h.to(tl.int64) * stride_qh + offs_r[:, None],
        mask=r_mask[:, None] & (offs_s[None, :] < num_splits), other=float("-inf"),
    )
    lse_max = tl.max(lse_s, 1)
    lse_max_safe = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    w = tl.exp(lse_s - lse_max_safe[:, None])
    w_sum = tl.sum(w, 1)
    empty = w_sum == 0.0
    lse = tl.where(empty, float("-inf"), lse_max_safe + tl.log(tl.where(empty, 1.0, w_sum)))
    w = w / tl.where(empty, 1.0, w_sum)[:, None]
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    d_mask = offs_d[None, :] < HEADDIM
    r0 = pid_r * BLOCK_R
    part_ptrs = tile_ptrs(OutPartial, b, h, r0, stride_pb, stride_ph, stride_pr, BLOCK_R, BLOCK_D)
    for s in range(0, num_splits):
        part = tl.load(part_ptrs, mask=r_mask[:, None] & d_mask, other=0.0)
        w_s = tl.sum(tl.where(offs_s[None, :] == s, w, 0.0), 1)
        acc += w_s[:, None] * part
        part_ptrs += stride_ps  # 64-bit pointer arithmetic: the partial buffer may pass 2**31 elements
    tl.store(tile_ptrs(Out, b, h, r0, stride_ob, stride_oh, stride_or, BLOCK_R, BLOCK_D),
             acc.to(Out.dtype.element_ty), mask=r_mask[:, None] & d_mask)
    tl.store(row_base(Lse, b, h, r0, stride_lb, stride_lh, 1) + tl.arange(0, BLOCK_R), lse, mask=r_mask)


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prob: AttnProblem,
    meta: Optional[SeqMeta] = None,
    *,
    out: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    dropout: Optional[tuple[float, int]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel (dense when ``meta`` is None, varlen/grouped otherwise).
    ``alibi_slopes``: float32 (1 or batch, nheads), contiguous (``validation.check_alibi_slopes``).
    ``dropout``: (probability, seed) of dropping each attention probability (Philox: see
    ``common.dropout_keep``); kept ones are scaled by 1 / (1 - probability).
    Strides are free (``common.kernel_operand`` copies the rare layouts the kernels cannot read).

    Returns out (q's shape, contiguous, q's dtype) and lse (float32: (batch, nheads, seqlen_q)
    dense, (nheads, total_q) varlen). Given ``out``/``lse`` (views allowed, unit stride on the
    last dim; ``out`` may be float32), the results are written there instead. Query rows that
    no entry covers are left as they were.
    """
    check_device(q)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if lse is None:
        lse_shape = (prob.nheads, q.shape[0]) if prob.is_varlen else (prob.batch, prob.nheads, q.shape[1])
        lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    token_dim = 0 if prob.is_varlen else 1
    check_output_buffer(out, "out", token_dim)
    q, k, v = (kernel_operand(x, token_dim) for x in (q, k, v))
    if out.numel() == 0 or lse.numel() == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    key = _forward_key(q, k, v, out, lse, prob, meta, alibi_slopes, dropout)
    result, out = out, interpreter_output(out)
    plan = _PLANS.get(key)
    if plan is None:
        # Made once per signature; under RINGFLASH_AUTOTUNE the tuner first times each
        # candidate through a plan of its own.
        def run(cfg: configs.KernelConfig) -> None:
            _launch_forward(_forward_plan(cfg, q, k, v, out, lse, prob, meta, alibi_slopes, dropout),
                            q, k, v, out, lse, prob, meta, alibi_slopes, dropout)

        cfg = configs.config_for("fwd", q, prob, run=run, dropout=dropout is not None)
        plan = _PLANS.keep(key, _forward_plan(cfg, q, k, v, out, lse, prob, meta, alibi_slopes, dropout))
    _launch_forward(plan, q, k, v, out, lse, prob, meta, alibi_slopes, dropout)
    finish_output(result, out)
    return result, lse


@dataclass(frozen=True)
class _ForwardPlan:
    """``attention_forward``'s launch but for its tensors (and the dropout seed)."""
    num_splits: int
    grid: tuple
    args: ArgTemplate
    launch: PlannedLaunch
    kv_box: Optional[list] = None  # KV_TMA: the K/V descriptors' box (1, BLOCK_N, 1, BLOCK_D)


#: Forward plans by call signature (``attention_forward``).
_PLANS = PlanTable()


def _forward_key(q, k, v, out, lse, prob, meta, alibi_slopes, dropout) -> tuple:
    """Everything ``_forward_plan`` reads, and what Triton specializes the launch on beyond
    it: the tensors' shapes, strides, dtypes and 16-byte alignment, the options, and the
    configuration state (an override context, the head-dim split, the fp32 precision,
    autotuning)."""
    return (
        q.shape, q.stride(), k.shape, k.stride(), v.stride(), out.shape, out.stride(), lse.stride(),
        q.dtype, k.dtype, out.dtype, q.device, prob, meta_signature(meta),
        None if alibi_slopes is None else (alibi_slopes.shape, alibi_slopes.stride()),
        None if dropout is None else (dropout[0], int_class(int(dropout[1]))),
        tuple(t.data_ptr() % 16 == 0 for t in (q, k, v, out, lse)),
        alibi_slopes is None or alibi_slopes.data_ptr() % 16 == 0,
        configs.override_key(), configs.head_parts(prob.headdim), configs.input_precision(q.dtype),
        configs.autotune_enabled(), configs.fwd_kv_tma_setting(),
    )


def _forward_plan(cfg: configs.KernelConfig, q, k, v, out, lse, prob: AttnProblem, meta, alibi_slopes,
                  dropout) -> _ForwardPlan:
    cfg = configs.fit_grid(cfg, prob)
    block_d, block_d2 = configs.head_parts(prob.headdim)
    num_m_blocks = cdiv(max(prob.max_seqlen_q, 1), cfg.block_m)
    num_splits = configs.choose_num_splits(q.device, prob, num_m_blocks, cfg)
    if num_splits == 1:
        out_target, lse_target, split_strides = out, lse, (0, 0)
    else:  # the float32 partials' layout (the call allocates them)
        out_target = torch.empty((num_splits,) + tuple(out.shape), dtype=torch.float32, device="meta")
        lse_target = torch.empty((num_splits,) + tuple(lse.shape), dtype=torch.float32, device="meta")
        split_strides = (out_target.stride(0), lse_target.stride(0))
    out_view, lse_view = (out, lse) if num_splits == 1 else (out_target[0], lse_target[0])
    seq_args = seqlen_args(q, k, meta)
    unit = stride_unit(q, k, v, out_view, is_varlen=prob.is_varlen)
    # A descriptor's dimensions are positive: no keys keeps the pointer loads.
    kv_tma = configs.fwd_kv_tma(q.device, cfg.kv_tma) and block_d2 == 0 and k.numel() > 0 and \
        all(tma_readable(x) for x in (k, v))
    if kv_tma and not cfg.split_phases:
        # Its masked loop zeroes V's rows past the keys through registers and back to shared
        # memory (two more barriers a block, compiled for sm_90): only the edge blocks take it.
        cfg = replace(cfg, split_phases=True)
    args = (
        q, k, v, out_target, lse_target, *seq_args[:7], *alibi_args(alibi_slopes, lse), *seq_args[7:],
        *(s for x in (q, k, v, out_view) for s in dense_strides(x, prob.is_varlen, unit)), split_strides[0],
        *lse_strides(lse_view, prob.is_varlen), split_strides[1],
        prob.nheads // prob.nheads_k, num_m_blocks, prob.num_groups, num_splits,
        *prob.scalar_args(log2_units=cfg.exp2), prob.window_left, prob.window_right, *dropout_args(dropout),
    )
    return _ForwardPlan(num_splits=num_splits, grid=configs.program_grid(cfg, num_m_blocks * num_splits, prob),
                        kv_box=[1, cfg.block_n, 1, block_d] if kv_tma else None,
                        args=ArgTemplate(args), launch=PlannedLaunch(_fwd_kernel, dict(
                            HEADDIM=prob.headdim, BLOCK_D=block_d, BLOCK_D2=block_d2,
                            **meta_flags(meta),
                            HAS_LEFT=prob.has_left, HAS_RIGHT=prob.has_right, HAS_SOFTCAP=softcap_mode(prob.softcap, q.dtype),
                            HAS_ALIBI=alibi_slopes is not None, HAS_DROPOUT=dropout is not None,
                            IS_SPLIT=num_splits > 1, INPUT_PRECISION=configs.input_precision(q.dtype),
                            KV_CACHE=cfg.kv_cache, SPLIT_PHASES=cfg.split_phases, USE_EXP2=cfg.exp2,
                            GROUP_ORDER=cfg.group_order_code, STRIDE_UNIT=unit, KV_TMA=kv_tma,
                            **cfg.launch_args(),
                        ), descriptor_key))


def _launch_forward(plan: _ForwardPlan, q, k, v, out, lse, prob: AttnProblem, meta, alibi_slopes, dropout) -> None:
    if plan.num_splits == 1:
        out_target, lse_target = out, lse
    else:
        out_target = torch.empty((plan.num_splits,) + tuple(out.shape), dtype=torch.float32, device=q.device)
        lse_target = torch.empty((plan.num_splits,) + tuple(lse.shape), dtype=torch.float32, device=q.device)
    # The tensors in the order of the kernel's pointer arguments (``_forward_plan``'s args).
    args = plan.args.fill((q, k, v, out_target, lse_target, *seq_pointers(q, meta),
                           alibi_slopes if alibi_slopes is not None else lse))
    if dropout is not None:
        args[-1] = int(dropout[1])  # the seed, the last argument (``dropout_args``)
    if plan.kv_box is not None:
        # (batch, keys, heads, d) descriptors; varlen: one batch entry of all the tokens.
        args[1], args[2] = (TensorDescriptor.from_tensor(x.unsqueeze(0) if prob.is_varlen else x, plan.kv_box)
                            for x in (k, v))
    plan.launch(plan.grid, args)
    if plan.num_splits > 1:
        combine_splits(out_target, lse_target, out, lse, prob)


def combine_splits(
    out_partial: torch.Tensor, lse_partial: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, prob: AttnProblem
) -> None:
    """Merge split-KV partials (num_splits, *out.shape) / (num_splits, *lse.shape) into out / lse."""
    num_splits = out_partial.shape[0]
    if prob.is_varlen:  # (S, total, h, d) / (S, h, total): one "batch" of all tokens
        rows, batch = out.shape[0], 1
        p_strides = (out_partial.stride(0), 0, out_partial.stride(1), out_partial.stride(2))
        q_strides = (lse_partial.stride(0), 0, lse_partial.stride(1))
        o_strides = (0, out.stride(0), out.stride(1))
        l_strides = (0, lse.stride(0))
    else:  # (S, b, s, h, d) / (S, b, h, s)
        rows, batch = out.shape[1], out.shape[0]
        p_strides = out_partial.stride()[:4]
        q_strides = lse_partial.stride()[:3]
        o_strides = out.stride()[:3]
        l_strides = lse.stride()[:2]
    block_r = 16
    if prob.nheads > configs.MAX_GRID_YZ:
        raise ValueError(f"nheads: got {prob.nheads}; the kernels take at most {configs.MAX_GRID_YZ} per call")
    grid = (batch * cdiv(rows, block_r), prob.nheads, 1)
    unit = strides_unit((*p_strides, *o_strides))
    ints = (num_splits, rows, *(s // unit for s in p_strides), *q_strides, *(s // unit for s in o_strides), *l_strides)
    constexprs = dict(HEADDIM=prob.headdim, BLOCK_D=prob.block_d, BLOCK_R=block_r,
                      MAX_SPLITS=max(2, next_power_of_2(num_splits)), STRIDE_UNIT=unit)
    # Every non-tensor argument is in the key, so a decode loop's combine skips Triton's binding.
    key = (out_partial.dtype, lse_partial.dtype, out.dtype, lse.dtype, ints, prob.headdim, unit)
    cached_launch(_combine_splits_kernel, key, grid, (out_partial, lse_partial, out, lse, *ints), constexprs, pointers=4)
