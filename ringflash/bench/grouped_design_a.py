"""Design (a) of grouped attention, kept for measurement only (``ringflash bench grouped``):
one program takes the same query-block index of both groups (G = 2), holds both query
tiles and both accumulators, and applies each K/V tile it loads to both groups (seed 000).
Forward only, causal, no window or softcap: enough to compare it with the library's design
(b), where each (group, query block) is its own program and groups share K/V through L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..kernels.common import key_block_ranges, sequence_bounds, visible
from ..kernels.problem import SeqMeta, dense_strides, lse_strides, seqlen_args


@triton.jit
def _online_softmax_step(acc, l_i, m_i, q, k, v, m_idx, n_idx, diag, sk, qk_scale_log2):
    s = tl.dot(q, tl.trans(k)) * qk_scale_log2
    s = tl.where(visible(m_idx[:, None], n_idx[None, :], diag, sk, 0, 0, False, True), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def _store(Out, Lse, acc, l_i, m_i, q_start, m0, sq, h, stride_os, stride_oh, stride_lh,
           HEADDIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    rows = (q_start + offs_m).to(tl.int64)
    ok = offs_m < sq
    tl.store(Out + rows[:, None] * stride_os + h.to(tl.int64) * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=ok[:, None] & (offs_d[None, :] < HEADDIM))
    tl.store(Lse + h.to(tl.int64) * stride_lh + rows, lse, mask=ok)


@triton.jit
def _design_a_fwd_kernel(
    Q, K, V, Out, Lse,
    QStarts, QEnds, stride_qmeta_g, CuSeqlensK, SequsedK, Diag, stride_used_g,
    seqlen_q, seqlen_k, total_q, total_k,
    stride_qs, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_os, stride_oh, stride_lh,
    kv_group, num_m_blocks, qk_scale_log2,
    HEADDIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    m_block = num_m_blocks - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    hk = h // kv_group
    qs0, sq0, k_start, sk0, sk_full, diag0 = sequence_bounds(
        b, 0, QStarts, QEnds, stride_qmeta_g, CuSeqlensK, SequsedK, Diag, stride_used_g,
        seqlen_q, seqlen_k, total_q, total_k, True, True, False)
    qs1, sq1, _, sk1, _, diag1 = sequence_bounds(
        b, 1, QStarts, QEnds, stride_qmeta_g, CuSeqlensK, SequsedK, Diag, stride_used_g,
        seqlen_q, seqlen_k, total_q, total_k, True, True, False)
    m0 = m_block * BLOCK_M
    if (m0 >= sq0) & (m0 >= sq1):
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEADDIM
    q0 = tl.load(Q + (qs0 + offs_m)[:, None].to(tl.int64) * stride_qs + h * stride_qh + offs_d[None, :],
                 mask=(offs_m < sq0)[:, None] & d_ok, other=0.0)
    q1 = tl.load(Q + (qs1 + offs_m)[:, None].to(tl.int64) * stride_qs + h * stride_qh + offs_d[None, :],
                 mask=(offs_m < sq1)[:, None] & d_ok, other=0.0)
    _, _, _, hi0 = key_block_ranges(m0, sq0, sk0, diag0, 0, 0, BLOCK_M, BLOCK_N, False, True)
    _, _, _, hi1 = key_block_ranges(m0, sq1, sk1, diag1, 0, 0, BLOCK_M, BLOCK_N, False, True)
    hi0 = tl.where(m0 < sq0, hi0, 0)
    hi1 = tl.where(m0 < sq1, hi1, 0)
    acc0 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l0 = tl.zeros([BLOCK_M], dtype=tl.float32)
    l1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    mi0 = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    mi1 = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    k_base = K + k_start.to(tl.int64) * stride_ks + hk * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vs + hk * stride_vh
    for n0 in range(0, tl.maximum(hi0, hi1), BLOCK_N):
        n_idx = n0 + offs_n
        kv_mask = (n_idx[:, None] < sk_full) & d_ok
        k = tl.load(k_base + n_idx[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + n_idx[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        if n0 < hi0:  # the tile just loaded serves group 0 ...
            acc0, l0, mi0 = _online_softmax_step(acc0, l0, mi0, q0, k, v, offs_m, n_idx, diag0, sk0, qk_scale_log2)
        if n0 < hi1:  # ... and group 1, without a second load
            acc1, l1, mi1 = _online_softmax_step(acc1, l1, mi1, q1, k, v, offs_m, n_idx, diag1, sk1, qk_scale_log2)
    _store(Out, Lse, acc0, l0, mi0, qs0, m0, sq0, h, stride_os, stride_oh, stride_lh, HEADDIM, BLOCK_M, BLOCK_D)
    _store(Out, Lse, acc1, l1, mi1, qs1, m0, sq1, h, stride_os, stride_oh, stride_lh, HEADDIM, BLOCK_M, BLOCK_D)


def design_a_forward(q, k, v, meta: SeqMeta, max_seqlen_q: int, softmax_scale: float,
                     block_m: int = 64, block_n: int = 64, num_warps: int = 4, num_stages: int = 2):
    """Causal grouped forward of two groups in design (a). Returns (out, lse) like the library's."""
    if meta.num_groups != 2 or meta.seqused_k is None:
        raise ValueError("design (a) prototype: expected exactly two groups with seqused_k")
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    num_m_blocks = triton.cdiv(max_seqlen_q, block_m)
    _, q_s, q_h = dense_strides(q, True)
    _design_a_fwd_kernel[(num_m_blocks, q.shape[1], meta.batch)](
        q, k, v, out, lse, *seqlen_args(q, k, meta),
        q_s, q_h, k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        lse_strides(lse, True)[1], q.shape[1] // k.shape[1], num_m_blocks, softmax_scale * 1.4426950408889634,
        HEADDIM=q.shape[2], BLOCK_D=max(16, triton.next_power_of_2(q.shape[2])), BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse
