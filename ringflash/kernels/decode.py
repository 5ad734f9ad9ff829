"""Attention of a few query positions against a long KV cache (decoding, serving, RL
rollouts): the forward-only kernel family behind ``flash_attn_with_kvcache``.

Two things make decoding different from training attention:

* Few query rows. One query position gives a tile of one row, so the query heads of each
  GQA group are packed into the row dimension (flash-attn's seqlen_q x ngroups swap):
  packed row ``r`` is query position ``r // group`` of query head ``hk * group + r % group``,
  and all of them share the one K/V head they read.
* Few programs. batch x KV heads is often far below the number of SMs, so the key range is
  split across programs (split-KV) and the float32 partial results are merged through their
  lse by the forward's combine kernel (``fwd.combine_splits``).

The cache is either contiguous, ``(batch_cache, seqlen_cache, nheads_k, d)`` with an optional
``cache_rows`` (flash-attn's ``cache_batch_idx``), or paged, ``(num_blocks, page_size,
nheads_k, d)`` with a ``block_table`` (batch, max_blocks) of block indices. Sequence ``b``
uses keys ``k_start[b] .. k_start[b] + k_len[b] - 1`` of its cache row (``k_start`` is
flash-attn's ``cache_leftpad``). Causal masks, windows, softcap and ALiBi are aligned to
the bottom right of those ``k_len[b]`` keys, as everywhere in ringflash.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import configs
from .common import (
    alibi_bias, check_device, finish_output, interpreter_output, interpreting, kernel_operand, scaled_scores,
    visible,
)
from .fwd import combine_splits
from .problem import AttnProblem


@triton.jit
def _decode_kernel(
    Q, K, V, Out, Lse,
    BlockTable, CacheRows, KStart, KLen, Alibi,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh, stride_osplit,
    stride_lb, stride_lh, stride_lsplit,
    stride_table_b, stride_alibi_b, stride_alibi_h,
    seqlen_q, nheads_k, group, num_splits, page_size, capacity,
    qk_scale_log2, softcap_in, softcap_out, window_left, window_right,
    HEADDIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGED: tl.constexpr, HAS_CACHE_ROWS: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Grid (cdiv(seqlen_q * group, BLOCK_M), batch * nheads_k, num_splits). Scores in log2
    units. Writes out/lse of its packed rows, or with num_splits > 1 the float32 partials of
    its key split (Out (split, batch, seqlen_q, nheads, d), Lse (split, batch, nheads, seqlen_q))."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // nheads_k
    hk = tl.program_id(1) % nheads_k
    split = tl.program_id(2)
    # Clamped into the row's (or the block table's) slots: a length past them is reported by
    # the caller (NaN), never read out of bounds.
    k_start = tl.minimum(tl.maximum(tl.load(KStart + b), 0), capacity)
    sk = tl.minimum(tl.maximum(tl.load(KLen + b), 0), capacity - k_start)
    diag = sk - seqlen_q

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pos = rows // group  # query position of each packed row
    head = hk * group + rows % group
    row_ok = pos < seqlen_q
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEADDIM
    q = tl.load(Q + b.to(tl.int64) * stride_qb + pos[:, None].to(tl.int64) * stride_qs
                + head[:, None].to(tl.int64) * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Alibi + b.to(tl.int64) * stride_alibi_b + head * stride_alibi_h, mask=row_ok, other=0.0)
        slope = slope[:, None] * 1.4426950408889634

    # Keys any row of this tile may see, then this split's share of them.
    first_pos = (pid_m * BLOCK_M) // group
    last_pos = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // group, seqlen_q - 1)
    n_hi = sk
    if HAS_RIGHT:
        n_hi = tl.maximum(tl.minimum(sk, last_pos + diag + window_right + 1), 0)
    n_lo = 0
    if HAS_LEFT:
        n_lo = tl.maximum(first_pos + diag - window_left, 0) // BLOCK_N * BLOCK_N
    blocks_per_split = tl.cdiv(tl.cdiv(tl.maximum(n_hi - n_lo, 0), BLOCK_N), num_splits)
    lo = n_lo + split * blocks_per_split * BLOCK_N
    hi = tl.minimum(lo + blocks_per_split * BLOCK_N, n_hi)

    if HAS_CACHE_ROWS:
        cache_row = tl.load(CacheRows + b).to(tl.int64)
    else:
        cache_row = b.to(tl.int64)
    k_base = K + hk.to(tl.int64) * stride_kh
    v_base = V + hk.to(tl.int64) * stride_vh
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        key = n0 + offs_n
        key_ok = key < sk
        slot = (k_start + key).to(tl.int64)  # index within the sequence's cache row
        if PAGED:
            block = tl.load(BlockTable + b.to(tl.int64) * stride_table_b + slot // page_size, mask=key_ok, other=0)
            k_rows = block.to(tl.int64) * stride_kb + (slot % page_size) * stride_ks
            v_rows = block.to(tl.int64) * stride_vb + (slot % page_size) * stride_vs
        else:
            k_rows = cache_row * stride_kb + slot * stride_ks
            v_rows = cache_row * stride_vb + slot * stride_vs
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + k_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        s = scaled_scores(tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION), qk_scale_log2, softcap_in,
                          softcap_out, HAS_SOFTCAP)
        if HAS_ALIBI:
            s += alibi_bias(pos[:, None], key[None, :], diag, slope)
        s = tl.where(visible(pos[:, None], key[None, :], diag, sk, window_left, window_right, HAS_LEFT, HAS_RIGHT),
                     s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + v_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    o_ptrs = (Out + split.to(tl.int64) * stride_osplit + b.to(tl.int64) * stride_ob
              + pos[:, None].to(tl.int64) * stride_os + head[:, None].to(tl.int64) * stride_oh + offs_d[None, :])
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    l_ptrs = (Lse + split.to(tl.int64) * stride_lsplit + b.to(tl.int64) * stride_lb
              + head.to(tl.int64) * stride_lh + pos)
    tl.store(l_ptrs, lse, mask=row_ok)


def choose_decode_splits(device: torch.device, programs: int, max_keys: int, block_n: int) -> int:
    """Split the keys until the launch has about two programs per SM, keeping at least four
    key blocks per split (the same rule as the training forward's split-KV)."""
    if device.type != "cuda" or interpreting():
        return 1
    sms = configs.sm_count(device)
    if programs >= sms:
        return 1
    key_blocks = -(-max(max_keys, 1) // block_n)
    return max(1, min(-(-2 * sms // programs), key_blocks // 4, configs.MAX_SPLITS))


def decode_forward(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_start: torch.Tensor,
    k_len: torch.Tensor,
    max_keys: int,
    prob: AttnProblem,
    cache_rows: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    num_splits: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (batch, seqlen_q, nheads, d) against a KV cache (see the module doc).

    ``k_start``/``k_len``: int32 (batch,), the first cache slot and the number of keys of each
    sequence; ``max_keys`` bounds k_len (it sizes the split-KV heuristic only). ``prob``
    carries the scale, mask, window and softcap options (``max_seqlen_k`` unused).
    ``alibi_slopes``: float32 (1 or batch, nheads). ``num_splits``: 0 chooses. Returns out
    like q and lse (batch, nheads, seqlen_q) float32."""
    check_device(q)
    batch, seqlen_q, nheads, d = q.shape
    nheads_k = k_cache.shape[2]
    group = nheads // nheads_k
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, nheads, seqlen_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse
    q = kernel_operand(q, 1)
    k_cache, v_cache = kernel_operand(k_cache, 1), kernel_operand(v_cache, 1)
    if interpreting():
        block_m, block_n, warps, stages = 16, 16, 4, 1
    else:
        block_m = 16 if seqlen_q * group <= 16 else 64
        block_n, warps, stages = (64 if d <= 128 else 32), 4, 2
    m_blocks = triton.cdiv(seqlen_q * group, block_m)
    splits = num_splits if num_splits > 0 else choose_decode_splits(q.device, m_blocks * batch * nheads_k, max_keys,
                                                                     block_n)
    splits = max(1, min(splits, configs.MAX_SPLITS))
    if splits == 1:
        out_target, lse_target, split_strides = interpreter_output(out), lse, (0, 0)
    else:
        out_target = torch.empty((splits,) + tuple(q.shape), dtype=torch.float32, device=q.device)
        lse_target = torch.empty((splits,) + tuple(lse.shape), dtype=torch.float32, device=q.device)
        split_strides = (out_target.stride(0), lse_target.stride(0))
    out_view = out_target if splits == 1 else out_target[0]
    lse_view = lse_target if splits == 1 else lse_target[0]
    paged = block_table is not None
    alibi = alibi_slopes if alibi_slopes is not None else lse
    _decode_kernel[(m_blocks, batch * nheads_k, splits)](
        q, k_cache, v_cache, out_target, lse_target,
        block_table if paged else k_len, cache_rows if cache_rows is not None else k_len, k_start, k_len, alibi,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out_view.stride(0), out_view.stride(1), out_view.stride(2), split_strides[0],
        lse_view.stride(0), lse_view.stride(1), split_strides[1],
        block_table.stride(0) if paged else 0,
        (alibi_slopes.stride(0) if alibi_slopes.shape[0] > 1 else 0) if alibi_slopes is not None else 0,
        alibi_slopes.stride(1) if alibi_slopes is not None else 0,
        seqlen_q, nheads_k, group, splits, k_cache.shape[1] if paged else 1,
        block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1],
        *prob.scalar_args(), prob.window_left, prob.window_right,
        HEADDIM=d, BLOCK_D=prob.block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        PAGED=paged, HAS_CACHE_ROWS=cache_rows is not None, HAS_LEFT=prob.has_left, HAS_RIGHT=prob.has_right,
        HAS_SOFTCAP=prob.softcap > 0, HAS_ALIBI=alibi_slopes is not None,
        INPUT_PRECISION=configs.input_precision(q.dtype), num_warps=warps, num_stages=stages,
    )
    if splits > 1:
        combine_splits(out_target, lse_target, out, lse, prob)
    else:
        finish_output(out, out_target)
    return out, lse
