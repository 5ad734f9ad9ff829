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

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from . import configs
from .common import (
    alibi_bias, cdiv, check_device, contiguous_strides, finish_output, in_elements, interpreter_output, interpreting,
    kernel_operand,
    scaled_scores, softcap_mode,
    next_power_of_2, visible,
)
from .fwd import combine_splits
from .launch import PlanTable, cached_launch, int_class
from .problem import AttnProblem, dense_strides, strides_unit


@triton.jit
def _decode_kernel(
    Q, K, V, Out, Lse,
    BlockTable, CacheRows, KStart, KEnd, KLenBase, QStarts, QEnds, Alibi,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh, stride_osplit,
    stride_lb, stride_lh, stride_lsplit,
    stride_table_b, stride_alibi_b, stride_alibi_h,
    seqlen_q, total_q, nheads_k, group, num_splits, page_size, capacity, num_blocks, min_k_len, k_len_offset,
    qk_scale_log2, softcap_in, softcap_out, window_left, window_right,
    HEADDIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGED: tl.constexpr, HAS_CACHE_ROWS: tl.constexpr, VARLEN_Q: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    HAS_K_START: tl.constexpr, HAS_K_END: tl.constexpr, HAS_K_LEN_BASE: tl.constexpr, PAGE_ALIGNED: tl.constexpr,
    STRIDE_UNIT: tl.constexpr,
):
    """Grid (batch * nheads_k * m_blocks, num_splits), m_blocks = cdiv(seqlen_q * group,
    BLOCK_M), the query block fastest (so the programs reading one K/V head run together);
    batch x heads stay on axis 0, whose limit is 2**31 - 1 (axes 1 and 2 stop at 65535).
    Scores in log2 units. Writes out/lse of its packed rows, or with num_splits > 1 the float32 partials of
    its key split (Out (split, batch, seqlen_q, nheads, d), Lse (split, batch, nheads, seqlen_q)).
    With VARLEN_Q, sequence b owns query rows [QStarts[b], QEnds[b]) of q (total_q, nheads,
    d) (batch strides 0, lse (nheads, total_q)) and ``seqlen_q`` is their longest.
    Sequence b's keys (``KeyRanges``): slots from KStart[b] (0 without HAS_K_START), as many
    as KEnd[b] + k_len_offset - KLenBase[b] (each pointer term 0 when its flag is off).
    PAGE_ALIGNED (paged, no KStart, page_size a multiple of BLOCK_N): every key block lies
    in one page (key blocks start at multiples of BLOCK_N). The q, cache and out strides
    (not the split ones) come in units of STRIDE_UNIT elements (``problem.strides_unit``)."""
    stride_qb, stride_qs, stride_qh = in_elements(stride_qb, stride_qs, stride_qh, STRIDE_UNIT)
    stride_kb, stride_ks, stride_kh = in_elements(stride_kb, stride_ks, stride_kh, STRIDE_UNIT)
    stride_vb, stride_vs, stride_vh = in_elements(stride_vb, stride_vs, stride_vh, STRIDE_UNIT)
    stride_ob, stride_os, stride_oh = in_elements(stride_ob, stride_os, stride_oh, STRIDE_UNIT)
    m_blocks = tl.cdiv(seqlen_q * group, BLOCK_M)
    pid_m = tl.program_id(0) % m_blocks
    b = tl.program_id(0) // m_blocks // nheads_k
    hk = tl.program_id(0) // m_blocks % nheads_k
    split = tl.program_id(1)
    # Device-side values are clamped into the cache, never followed out of it; a sequence
    # whose values were out of range gets NaN (out and lse) instead of a plausible answer.
    raw_start = b.to(tl.int64) * 0
    if HAS_K_START:
        raw_start += tl.load(KStart + b)
    raw_len = raw_start * 0 + k_len_offset  # int64: a length near 2**31 plus new keys does not wrap
    if HAS_K_END:
        raw_len += tl.load(KEnd + b)
    if HAS_K_LEN_BASE:
        raw_len -= tl.load(KLenBase + b)
    k_start = tl.minimum(tl.maximum(raw_start, 0), capacity).to(tl.int32)
    sk = tl.minimum(tl.maximum(raw_len, 0), capacity - k_start).to(tl.int32)
    invalid = tl.where((raw_start < 0) | (raw_len < min_k_len) | (raw_start + raw_len > capacity), 1, 0)
    if VARLEN_Q:  # clamped likewise (the caller checks the metadata and reports NaN)
        q_row0 = tl.minimum(tl.maximum(tl.load(QStarts + b), 0), total_q)
        sq = tl.minimum(tl.minimum(tl.maximum(tl.load(QEnds + b), q_row0), total_q) - q_row0, seqlen_q)
    else:
        q_row0 = b * 0
        sq = b * 0 + seqlen_q
    diag = sk - sq

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pos = rows // group  # query position of each packed row
    head = hk * group + rows % group
    row_ok = pos < sq
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEADDIM
    q_row = (q_row0 + pos).to(tl.int64)  # the row of q, out and lse within the batch entry
    q = tl.load(Q + b.to(tl.int64) * stride_qb + q_row[:, None] * stride_qs
                + head[:, None].to(tl.int64) * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Alibi + b.to(tl.int64) * stride_alibi_b + head * stride_alibi_h, mask=row_ok, other=0.0)
        slope = slope[:, None] * 1.4426950408889634

    # Keys any row of this tile may see, then this split's share of them.
    first_pos = (pid_m * BLOCK_M) // group
    last_pos = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // group, sq - 1)
    n_hi = tl.where(first_pos < sq, sk, 0)  # a tile past a short sequence's queries has no work
    if HAS_RIGHT:
        n_hi = tl.maximum(tl.minimum(n_hi, last_pos + diag + window_right + 1), 0)
    n_lo = 0
    if HAS_LEFT:
        n_lo = tl.maximum(first_pos + diag - window_left, 0) // BLOCK_N * BLOCK_N
    blocks_per_split = tl.cdiv(tl.cdiv(tl.maximum(n_hi - n_lo, 0), BLOCK_N), num_splits)
    lo = n_lo + split * blocks_per_split * BLOCK_N
    hi = tl.minimum(lo + blocks_per_split * BLOCK_N, n_hi)

    if HAS_CACHE_ROWS:
        raw_row = tl.load(CacheRows + b)
        invalid = tl.maximum(invalid, tl.where((raw_row < 0) | (raw_row >= num_blocks), 1, 0))
        cache_row = tl.minimum(tl.maximum(raw_row, 0), num_blocks - 1).to(tl.int64)
    else:
        cache_row = b.to(tl.int64)
    k_base = K + hk.to(tl.int64) * stride_kh
    v_base = V + hk.to(tl.int64) * stride_vh
    offs_n = tl.arange(0, BLOCK_N)
    if PAGED:  # every page of the sequence, not only this split's: NaN for the whole sequence
        for p0 in range(k_start // page_size, tl.cdiv(k_start + sk, page_size), BLOCK_N):
            pages = p0 + offs_n
            entry = tl.load(BlockTable + b.to(tl.int64) * stride_table_b + pages,
                            mask=pages < tl.cdiv(k_start + sk, page_size), other=0)
            invalid = tl.maximum(invalid, tl.max(tl.where((entry < 0) | (entry >= num_blocks), 1, 0), 0))
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        key = n0 + offs_n
        key_ok = key < sk
        slot = k_start + key  # index within the sequence's cache row (int32: capacity < 2**31)
        if PAGE_ALIGNED:
            # The block's keys lie in one page: one scalar table read, no division per key
            # (a division by the runtime page size is a long integer routine per element).
            block = tl.load(BlockTable + b.to(tl.int64) * stride_table_b + n0 // page_size)
            block = tl.minimum(tl.maximum(block, 0), num_blocks - 1).to(tl.int64)  # checked above
            in_page = (n0 % page_size + offs_n).to(tl.int64)
            k_rows = block * stride_kb + in_page * stride_ks
            v_rows = block * stride_vb + in_page * stride_vs
        elif PAGED:
            block = tl.load(BlockTable + b.to(tl.int64) * stride_table_b + slot // page_size, mask=key_ok, other=0)
            block = tl.minimum(tl.maximum(block, 0), num_blocks - 1)  # checked above
            in_page = (slot % page_size).to(tl.int64)
            k_rows = block.to(tl.int64) * stride_kb + in_page * stride_ks
            v_rows = block.to(tl.int64) * stride_vb + in_page * stride_vs
        else:
            k_rows = cache_row * stride_kb + slot.to(tl.int64) * stride_ks
            v_rows = cache_row * stride_vb + slot.to(tl.int64) * stride_vs
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
    invalid_rows = (tl.zeros([BLOCK_M], dtype=tl.int32) + invalid) > 0
    out = tl.where(invalid_rows[:, None], float("nan"), out)
    lse = tl.where(invalid_rows, float("nan"), lse)
    o_ptrs = (Out + split.to(tl.int64) * stride_osplit + b.to(tl.int64) * stride_ob
              + q_row[:, None] * stride_os + head[:, None].to(tl.int64) * stride_oh + offs_d[None, :])
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    l_ptrs = (Lse + split.to(tl.int64) * stride_lsplit + b.to(tl.int64) * stride_lb
              + head.to(tl.int64) * stride_lh + q_row)
    tl.store(l_ptrs, lse, mask=row_ok)


def choose_decode_splits(device: torch.device, programs: int, max_keys: int, block_n: int) -> int:
    """The split-KV fan-out of a decode launch of ``programs`` programs over ``max_keys`` keys."""
    if device.type != "cuda" or interpreting():
        return 1
    return decode_splits_for(configs.sm_count(device), programs, -(-max(max_keys, 1) // block_n))


def decode_splits_for(sms: int, programs: int, key_blocks: int) -> int:
    """Split the keys so that the launch has at least two programs per SM (fewer left the
    memory system idle: b=8 sk=8k ran 75 us at 2 per SM, 70 us at 3-4; run 35), keeping at
    least four key blocks per split, and among those fan-outs take the one whose busiest
    SM finishes first: ceil(programs x splits / sms) programs in a row, each reading
    ceil(key_blocks / splits) blocks plus a fixed cost (``configs.DECODE_PROGRAM_BLOCKS``);
    ties go to fewer splits. The first rule alone took 5 splits at b=8 sk=8k (72 us), where
    this takes 6 (70 us; FA2: 74 us; ``scripts/probe_decode_splits.py``, runs 35 and 36)."""
    if programs <= 0 or programs >= sms:
        return 1
    most = max(1, min(key_blocks // 4, configs.MAX_DECODE_SPLITS))
    fewest = min(-(-2 * sms // programs), most)

    def busiest(s: int) -> int:
        return -(-programs * s // sms) * (-(-key_blocks // s) + configs.DECODE_PROGRAM_BLOCKS)
    return min(range(fewest, most + 1), key=lambda s: (busiest(s), s))


@dataclass(frozen=True)
class KeyRanges:
    """Where each sequence's keys lie in its cache row, read by the kernel from the caller's
    own tensors: slots ``starts[b] ..`` (0 without ``starts``), ``ends[b] + offset -
    len_base[b]`` of them (a missing tensor counts 0). Every form a caller has is one of
    these without a single elementwise op on the host (each would be a kernel launch):

    * the whole row: ``KeyRanges(offset=seqlen_cache)``;
    * ``cache_seqlens`` (tensor or int) plus ``seqlen_new`` new keys after ``cache_leftpad``:
      ``KeyRanges(leftpad, cache_seqlens, seqlen_new, leftpad)``;
    * packed keys, sequence b at ``cu_seqlens_k[b] .. cu_seqlens_k[b+1]``:
      ``KeyRanges(cu, cu[1:], 0, cu)``, or with ``seqused_k``: ``KeyRanges(cu, seqused_k)``.

    Tensors are int32 (batch,) (or longer: the first batch entries are read); the sums are
    64-bit in the kernel."""
    starts: Optional[torch.Tensor] = None
    ends: Optional[torch.Tensor] = None
    offset: int = 0
    len_base: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class _DecodePlan:
    """One decode call's launches but for its tensors and two per-call integers, worked out
    once per key (``_plan_key``): shapes, split count, grid, strides and constexprs. A decode
    loop calls with the same shapes at every step, so a step's host work is its allocations
    and launches."""
    out_shape: tuple
    lse_shape: tuple
    splits: int
    grid: tuple
    int_args: tuple  # the kernel's strides .. num_blocks
    scalar_args: tuple  # qk_scale_log2 .. window_right
    constexprs: dict
    empty: bool


def _plan_key(q, k_cache, v_cache, keys: KeyRanges, max_keys: int, prob: AttnProblem, cache_rows, block_table,
              alibi_slopes, num_splits: int, q_bounds, min_k_len: int) -> tuple:
    """What a plan and its compiled kernels depend on: each shape, stride and dtype the
    host reads, the options, and Triton's classes of the two per-call integers."""
    return (
        q.get_device(), q.shape, q.stride(), q.dtype, k_cache.shape, k_cache.stride(), k_cache.dtype,
        v_cache.stride(), v_cache.dtype, prob, max_keys, num_splits, int_class(min_k_len), int_class(keys.offset),
        configs.input_precision(q.dtype),  # fp32 follows torch's matmul precision, which may change between calls
        # Index tensors are read with unit stride from entry b on: their dtypes only.
        *(None if t is None else t.dtype for t in (keys.starts, keys.ends, keys.len_base, cache_rows)),
        None if block_table is None else (block_table.dtype, block_table.shape[1], block_table.stride(0)),
        None if alibi_slopes is None else (alibi_slopes.dtype, alibi_slopes.shape[0], alibi_slopes.stride()),
        None if q_bounds is None else (q_bounds[0].shape[0], q_bounds[0].dtype, q_bounds[1].dtype),
    )


def _make_plan(q, k_cache, v_cache, keys: KeyRanges, max_keys: int, prob: AttnProblem, cache_rows, block_table,
               alibi_slopes, num_splits: int, q_bounds) -> _DecodePlan:
    varlen_q = q_bounds is not None
    if varlen_q:
        total_q, nheads, d = q.shape
        batch, seqlen_q = q_bounds[0].shape[0], prob.max_seqlen_q
        lse_shape: tuple = (nheads, total_q)
    else:
        batch, seqlen_q, nheads, d = q.shape
        total_q = seqlen_q
        lse_shape = (batch, nheads, seqlen_q)
    out_shape = tuple(q.shape)
    nheads_k = k_cache.shape[2]
    group = nheads // nheads_k
    if interpreting():
        block_m, block_n, warps, stages = 16, 16, 4, 1
    else:
        block_m = 16 if seqlen_q * group <= 16 else 64
        block_n, warps, stages = (64 if d <= 128 else 32), 4, 2
    m_blocks = cdiv(seqlen_q * group, block_m)
    empty = q.numel() == 0 or batch == 0 or seqlen_q == 0
    if empty:  # nothing is launched (and no program to split)
        splits = 1
    else:
        splits = num_splits if num_splits > 0 else choose_decode_splits(q.device, m_blocks * batch * nheads_k,
                                                                         max_keys, block_n)
    splits = max(1, min(splits, configs.MAX_DECODE_SPLITS))
    # The strides of the buffers decode_forward allocates: torch.empty's contiguous ones,
    # with a leading split axis for the float32 partials.
    split_axis = (splits,) if splits > 1 else ()
    out_strides = contiguous_strides(split_axis + out_shape)
    lse_strides = contiguous_strides(split_axis + lse_shape)
    split_strides = (out_strides[0], lse_strides[0]) if splits > 1 else (0, 0)
    out_strides, lse_strides = out_strides[len(split_axis):], lse_strides[len(split_axis):]
    q_strides = dense_strides(q, varlen_q)
    if varlen_q:  # no batch axis: (token, head) strides, batch strides 0
        o_strides = (0, out_strides[0], out_strides[1])
        l_strides = (0, lse_strides[0])
    else:
        o_strides = out_strides[:3]
        l_strides = lse_strides[:2]
    paged = block_table is not None
    row_strides = (*q_strides, *k_cache.stride()[:3], *v_cache.stride()[:3], *o_strides)
    unit = strides_unit(row_strides)
    int_args = (
        *(s // unit for s in row_strides), split_strides[0],
        *l_strides, split_strides[1],
        block_table.stride(0) if paged else 0,
        (alibi_slopes.stride(0) if alibi_slopes.shape[0] > 1 else 0) if alibi_slopes is not None else 0,
        alibi_slopes.stride(1) if alibi_slopes is not None else 0,
        seqlen_q, total_q, nheads_k, group, splits, k_cache.shape[1] if paged else 1,
        cache_capacity(k_cache, block_table), k_cache.shape[0],
    )
    constexprs = dict(
        HEADDIM=d, BLOCK_D=prob.block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        PAGED=paged, HAS_CACHE_ROWS=cache_rows is not None, VARLEN_Q=varlen_q, HAS_LEFT=prob.has_left,
        HAS_RIGHT=prob.has_right, HAS_SOFTCAP=softcap_mode(prob.softcap, q.dtype), HAS_ALIBI=alibi_slopes is not None,
        INPUT_PRECISION=configs.input_precision(q.dtype), HAS_K_START=keys.starts is not None,
        HAS_K_END=keys.ends is not None, HAS_K_LEN_BASE=keys.len_base is not None,
        PAGE_ALIGNED=paged and keys.starts is None and k_cache.shape[1] % block_n == 0, STRIDE_UNIT=unit,
        num_warps=warps, num_stages=stages,
    )
    return _DecodePlan(
        out_shape=out_shape, lse_shape=lse_shape, splits=splits, grid=(batch * nheads_k * m_blocks, splits, 1),
        int_args=int_args, scalar_args=(*prob.scalar_args(), prob.window_left, prob.window_right),
        constexprs=constexprs, empty=empty,
    )


#: Plans by key (``_plan_key``).
_PLANS = PlanTable()


def decode_forward(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    keys: KeyRanges,
    max_keys: int,
    prob: AttnProblem,
    cache_rows: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    num_splits: int = 0,
    q_bounds: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    min_k_len: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (batch, seqlen_q, nheads, d) against a KV cache (see the module doc).

    ``keys``: the first cache slot and the number of keys of each sequence (``KeyRanges``);
    ``max_keys`` bounds the number (it sizes the split-KV heuristic only). ``prob``
    carries the scale, mask, window and softcap options (``max_seqlen_k`` unused).
    ``alibi_slopes``: float32 (1 or batch, nheads). ``num_splits``: 0 chooses.
    ``q_bounds``: varlen queries, (starts, ends) int32 (batch,) rows of q (total_q, nheads,
    d), at most ``prob.max_seqlen_q`` each (``prob`` is then a varlen problem). Returns out
    like q and lse (batch, nheads, seqlen_q), or (nheads, total_q) with ``q_bounds``, float32.
    Device-side values out of range are clamped into the cache, never followed, and the
    sequence's out and lse are NaN: a start below 0, fewer than ``min_k_len`` keys, keys past the
    row's (or the block table's) slots, a ``cache_rows`` entry or (paged) a block-table
    entry of one of its pages outside the cache. No host sync; the host work of a call
    with the shapes of an earlier one is its allocations and two launches (``_DecodePlan``)."""
    check_device(q)
    # The kernel reads these with unit stride: a strided view (a column of a bigger table,
    # ``cache_leftpad[::2]``) is copied, never read wrongly.
    k_start, k_end, k_len_base, cache_rows, block_table = (
        _unit_stride(t) for t in (keys.starts, keys.ends, keys.len_base, cache_rows, block_table))
    keys = KeyRanges(k_start, k_end, keys.offset, k_len_base)
    varlen_q = q_bounds is not None
    if varlen_q:
        q_bounds = (_unit_stride(q_bounds[0]), _unit_stride(q_bounds[1]))
    out_dtype = q.dtype  # the interpreter computes bf16 in float32 (kernel_operand); out stays bf16
    q = kernel_operand(q, 0 if varlen_q else 1)
    k_cache, v_cache = kernel_operand(k_cache, 1), kernel_operand(v_cache, 1)
    key = _plan_key(q, k_cache, v_cache, keys, max_keys, prob, cache_rows, block_table, alibi_slopes, num_splits,
                    q_bounds, min_k_len)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS.keep(key, _make_plan(q, k_cache, v_cache, keys, max_keys, prob, cache_rows, block_table,
                                           alibi_slopes, num_splits, q_bounds))
    device = q.device
    out = torch.empty(plan.out_shape, dtype=out_dtype, device=device)
    lse = torch.empty(plan.lse_shape, dtype=torch.float32, device=device)
    if plan.empty:
        lse.fill_(float("-inf"))
        out.zero_()
        return out, lse
    if plan.splits == 1:
        out_target, lse_target = interpreter_output(out), lse
    else:
        out_target = torch.empty((plan.splits,) + plan.out_shape, dtype=torch.float32, device=device)
        lse_target = torch.empty((plan.splits,) + plan.lse_shape, dtype=torch.float32, device=device)
    q_starts, q_ends = q_bounds if varlen_q else (lse, lse)
    cached_launch(_decode_kernel, key, plan.grid, (
        q, k_cache, v_cache, out_target, lse_target,
        *(t if t is not None else lse for t in (block_table, cache_rows, k_start, k_end, k_len_base)),
        q_starts, q_ends, alibi_slopes if alibi_slopes is not None else lse,
        *plan.int_args, min_k_len, keys.offset, *plan.scalar_args), plan.constexprs, pointers=13)
    if plan.splits > 1:
        combine_splits(out_target, lse_target, out, lse, prob)
    else:
        finish_output(out, out_target)
    return out, lse


def _unit_stride(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` with unit stride along its last dim (a copy only when it has another)."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def cache_capacity(k_cache: torch.Tensor, block_table: Optional[torch.Tensor]) -> int:
    """Slots of one sequence's cache row: seqlen_cache, or max_blocks x page_size when paged."""
    return block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]


@triton.jit
def _append_kernel(
    Cache, New, Slots, BlockTable, CacheRows,
    stride_cb, stride_cs, stride_ch, stride_nb, stride_ns, stride_nh, stride_table_b,
    seqlen_new, nheads_k, page_size, capacity, num_blocks,
    HEADDIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGED: tl.constexpr, HAS_CACHE_ROWS: tl.constexpr,
):
    """Grid (batch * seqlen_new,): new token t of sequence b goes to slot Slots[b, t] of its
    cache row (or block-table page). A slot outside the row, a row outside the cache or a
    page entry outside it writes nothing (masked stores: no other slot is touched)."""
    b = tl.program_id(0) // seqlen_new
    t = tl.program_id(0) % seqlen_new
    slot = tl.load(Slots + b.to(tl.int64) * seqlen_new + t)
    ok = (slot >= 0) & (slot < capacity)
    slot = tl.minimum(tl.maximum(slot, 0), capacity - 1).to(tl.int64)
    if PAGED:
        # Masked: with no slot at all (a block table of 0 columns) the clamp above leaves
        # slot -1, and the table has no entry to read (an illegal address, not a dropped write).
        row = tl.load(BlockTable + b.to(tl.int64) * stride_table_b + slot // page_size, mask=ok, other=0)
        slot = slot % page_size
    elif HAS_CACHE_ROWS:
        row = tl.load(CacheRows + b)
    else:
        row = b
    ok = ok & (row >= 0) & (row < num_blocks)
    row = tl.minimum(tl.maximum(row, 0), num_blocks - 1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    src = New + b.to(tl.int64) * stride_nb + t.to(tl.int64) * stride_ns
    dst = Cache + row * stride_cb + slot * stride_cs
    heads_written = tl.where(ok, nheads_k, 0)  # a dropped write stores no head
    for h0 in range(0, nheads_k, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask = (offs_h[:, None] < nheads_k) & (offs_d[None, :] < HEADDIM)
        x = tl.load(src + offs_h[:, None] * stride_nh + offs_d[None, :], mask=mask, other=0)
        tl.store(dst + offs_h[:, None] * stride_ch + offs_d[None, :], x,
                 mask=(offs_h[:, None] < heads_written) & (offs_d[None, :] < HEADDIM))


def append_to_cache(cache: torch.Tensor, new: torch.Tensor, slots: torch.Tensor,
                    block_table: Optional[torch.Tensor] = None, cache_rows: Optional[torch.Tensor] = None) -> None:
    """Write new (batch, seqlen_new, nheads_k, d) into ``cache`` in place at the int32/int64
    slots (batch, seqlen_new) of each sequence's row (``cache_rows[b]`` or b; with a
    ``block_table``, slot s is page ``block_table[b, s // page_size]`` at ``s % page_size``).
    Writes whose slot, row or page lies outside the cache are dropped, on the device (no
    host sync, and no clamped write that could land on another sequence's slot)."""
    batch, seqlen_new, nheads_k, d = new.shape
    if batch == 0 or seqlen_new == 0:
        return
    check_device(cache, "k_cache")
    block_table, cache_rows = _unit_stride(block_table), _unit_stride(cache_rows)
    if cache.stride(-1) != 1:
        raise ValueError(f"k_cache/v_cache: strides {tuple(cache.stride())}; expected unit stride on the head dim "
                         "(the cache is written in place)")
    new = new.to(cache.dtype)
    new = new.contiguous() if new.stride(-1) != 1 else new
    # A bit copy: integer views keep the interpreter away from its bf16 arithmetic.
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[cache.element_size()]
    cache, new = cache.view(bits), new.view(bits)
    slots = slots.to(torch.int32).contiguous()
    paged = block_table is not None
    dummy = slots
    block_d = max(16, next_power_of_2(d))
    _append_kernel[(batch * seqlen_new,)](
        cache, new, slots, block_table if paged else dummy, cache_rows if cache_rows is not None else dummy,
        cache.stride(0), cache.stride(1), cache.stride(2), new.stride(0), new.stride(1), new.stride(2),
        block_table.stride(0) if paged else 0,
        seqlen_new, nheads_k, cache.shape[1] if paged else 1, cache_capacity(cache, block_table), cache.shape[0],
        HEADDIM=d, BLOCK_H=min(next_power_of_2(nheads_k), max(1, 4096 // block_d)), BLOCK_D=block_d,
        PAGED=paged, HAS_CACHE_ROWS=cache_rows is not None,
    )
