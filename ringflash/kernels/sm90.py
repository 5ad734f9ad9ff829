"""FlashAttention forward for Hopper (sm_90) in Gluon, and its host launcher.

The portable forward (``kernels.fwd``) leaves the schedule to Triton's compiler. This
family writes it out, as FA3 does within one warpgroup pair:

* Q, K and V arrive by TMA (one 4-D descriptor per tensor over (batch, seqlen, heads, d),
  so rows past a sequence's end are zero-filled and never stored), K/V through a ring of
  ``STAGES`` shared-memory buffers, each with its own mbarrier, refilled as soon as the
  MMAs that read it have finished;
* both GEMMs are warpgroup MMAs (wgmma): S = Q K^T from shared memory, O += P V with P
  from registers;
* the loop is software pipelined: block j's S = Q K_j^T and block j-1's O += P V are issued
  together, and block j's softmax runs while the P V MMA is still in flight.

Scope (``supports``): dense (batch, seqlen, heads, d) bf16/fp16 calls, d = 64 or 128,
causal (bottom-right) or full, GQA/MQA, positive softmax scale; no window, softcap, ALiBi,
dropout or varlen. Everything else stays on the portable kernels, and so does every call
unless ``RINGFLASH_BACKEND`` asks for this family (``kernels.dispatch``).

Writes the same out and lse as ``kernels.fwd.attention_forward``, so the backward is shared.
"""

from __future__ import annotations

import math

import torch

from . import configs
from .problem import LOG2E, AttnProblem

try:  # Gluon ships with Triton >= 3.5; without it (or its Hopper module) this family is absent.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed Triton
    gluon = None
else:
    # Triton 3.6 (the GPU image) names the TMA copies async_copy_*; later releases renamed
    # them async_load / async_store and removed the old names.
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global

AVAILABLE = gluon is not None

_GL_DTYPES = {}
if AVAILABLE:
    _GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}

    @gluon.jit
    def _online_softmax(s, m_i, l_i, qk_scale_log2):
        """One key block's online-softmax step on raw scores ``s`` (masked entries -inf).

        The running max ``m_i`` stays in raw-score units so that each probability is one FMA
        and one exp2: p = exp2(s * scale - m * scale). A row that has seen only masked keys
        keeps max -inf and subtracts 0 instead. Returns (p, m_new, l_new, alpha)."""
        m_new = gl.maximum(m_i, gl.max(s, 1))
        m_scaled = gl.where(m_new == float("-inf"), 0.0, m_new * qk_scale_log2)
        p = gl.exp2(s * qk_scale_log2 - m_scaled[:, None])
        alpha = gl.exp2(m_i * qk_scale_log2 - m_scaled)
        l_new = l_i * alpha + gl.sum(p, 1)
        return p, m_new, l_new, alpha

    @gluon.jit
    def _causal_mask(s, n0, rows, diag, seqlen_k, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                     s_layout: gl.constexpr):
        """``s`` with the keys past seqlen_k, and under CAUSAL those right of each row's
        diagonal (key <= row + diag, diag = seqlen_k - seqlen_q), set to -inf."""
        cols = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        keep = cols[None, :] < seqlen_k
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None] + diag)
        return gl.where(keep, s, float("-inf"))

    @gluon.jit
    def _load_kv(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, block, b, hk, n_blocks,
                 BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        """Start the TMA loads of key block ``block`` into its ring slot (skipped past the last)."""
        slot = block % STAGES
        pred = block < n_blocks
        n0 = block * BLOCK_N
        mbarrier.expect(k_bars.index(slot), k_desc.block_type.nbytes, pred=pred)
        _tma_load(k_desc, [b, n0, hk, 0], k_bars.index(slot), k_bufs.index(slot), pred=pred)
        mbarrier.expect(v_bars.index(slot), v_desc.block_type.nbytes, pred=pred)
        _tma_load(v_desc, [b, n0, hk, 0], v_bars.index(slot), v_bufs.index(slot), pred=pred)

    @gluon.jit
    def _fwd_sm90_kernel(
        q_desc, k_desc, v_desc, o_desc, Lse,
        seqlen_q, seqlen_k, kv_group, num_m_blocks,
        stride_lb, stride_lh,
        qk_scale_log2,
        HEADDIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
        CAUSAL: gl.constexpr, num_warps: gl.constexpr,
    ):
        """Grid (query blocks, heads, batch); causal programs start from the last query block
        (the longest) so the short ones fill the tail. Writes out through ``o_desc`` and lse
        (float32 (batch, heads, seqlen_q), natural log; -inf and out = 0 for a row that sees
        no key)."""
        pid = gl.program_id(0)
        h = gl.program_id(1)
        b = gl.program_id(2)
        m_block = num_m_blocks - 1 - pid if CAUSAL else pid
        m0 = m_block * BLOCK_M
        hk = h // kv_group
        dtype: gl.constexpr = q_desc.dtype

        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEADDIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)

        # The TMA descriptors move (1, rows, 1, d) boxes; the MMAs read them as (rows, d).
        q_box = gl.allocate_shared_memory(dtype, [1, BLOCK_M, 1, HEADDIM], q_desc.layout)
        q_tile = q_box.reshape([BLOCK_M, HEADDIM])
        k_bufs = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_N, 1, HEADDIM], k_desc.layout)
        v_bufs = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_N, 1, HEADDIM], v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_bars.index(i), count=1)
            mbarrier.init(v_bars.index(i), count=1)

        # Key blocks this query block sees: [0, n_blocks); from n_full on they need the mask.
        diag = seqlen_k - seqlen_q
        if CAUSAL:
            n_end = gl.minimum(seqlen_k, m0 + BLOCK_M + diag)
            n_full = gl.maximum(gl.minimum(seqlen_k, m0 + diag + 1), 0) // BLOCK_N
        else:
            n_end = seqlen_k
            n_full = seqlen_k // BLOCK_N
        n_blocks = gl.cdiv(gl.maximum(n_end, 0), BLOCK_N)

        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        _tma_load(q_desc, [b, m0, h, 0], q_bar, q_box)
        for i in gl.static_range(STAGES):
            _load_kv(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, i, b, hk, n_blocks, BLOCK_N, STAGES)

        rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
        acc = gl.zeros([BLOCK_M, HEADDIM], gl.float32, layout=o_layout)
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
        mbarrier.wait(q_bar, 0)

        if n_blocks > 0:
            # Block 0 alone: its S, then its softmax (nothing to overlap yet).
            mbarrier.wait(k_bars.index(0), 0)
            k_tile = k_bufs.index(0).reshape([BLOCK_N, HEADDIM])
            s = warpgroup_mma(q_tile, k_tile.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
            if n_full <= 0:
                s = _causal_mask(s, 0, rows, diag, seqlen_k, BLOCK_N, CAUSAL, s_layout)
            p, m_i, l_i, alpha = _online_softmax(s, m_i, l_i, qk_scale_log2)
            p_op = gl.convert_layout(p.to(dtype), p_layout)

            for j in range(1, n_blocks):
                slot = j % STAGES
                prev = (j - 1) % STAGES
                mbarrier.wait(k_bars.index(slot), (j // STAGES) & 1)
                k_tile = k_bufs.index(slot).reshape([BLOCK_N, HEADDIM])
                s_tok = warpgroup_mma(q_tile, k_tile.permute((1, 0)), s_zero, use_acc=False, is_async=True)
                mbarrier.wait(v_bars.index(prev), ((j - 1) // STAGES) & 1)
                v_tile = v_bufs.index(prev).reshape([BLOCK_N, HEADDIM])
                acc_tok = warpgroup_mma(p_op, v_tile, acc, is_async=True)
                # S_j is the older group: waiting down to one outstanding leaves P V running.
                s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok, ))
                if j >= n_full:
                    s = _causal_mask(s, j * BLOCK_N, rows, diag, seqlen_k, BLOCK_N, CAUSAL, s_layout)
                p, m_i, l_i, alpha = _online_softmax(s, m_i, l_i, qk_scale_log2)
                acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc_tok, p_op))
                acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
                p_op = gl.convert_layout(p.to(dtype), p_layout)
                # Block j-1's slot is free: both MMAs that read it are done.
                _load_kv(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, j - 1 + STAGES, b, hk, n_blocks,
                         BLOCK_N, STAGES)

            last = n_blocks - 1
            mbarrier.wait(v_bars.index(last % STAGES), (last // STAGES) & 1)
            v_tile = v_bufs.index(last % STAGES).reshape([BLOCK_N, HEADDIM])
            acc_tok = warpgroup_mma(p_op, v_tile, acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc_tok, p_op))[0]

        mbarrier.invalidate(q_bar)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(k_bars.index(i))
            mbarrier.invalidate(v_bars.index(i))

        empty = l_i == 0.0
        l_safe = gl.where(empty, 1.0, l_i)
        out = acc / gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout))[:, None]
        lse = (gl.where(empty, 0.0, m_i * qk_scale_log2) + gl.log2(l_safe)) * 0.6931471805599453
        lse = gl.where(empty, float("-inf"), lse)
        gl.store(Lse + b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh + rows, lse, mask=rows < seqlen_q)
        # Q's buffer is free (every MMA that read it has finished): stage the output there.
        q_tile.store(out.to(dtype))
        fence_async_shared()
        _tma_store(o_desc, [b, m0, h, 0], q_box)
        tma.store_wait(pendings=0)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prob: AttnProblem, meta, alibi_slopes,
             dropout) -> bool:
    """Whether this family computes the call (see the module docstring for the scope)."""
    if not AVAILABLE or q.device.type != "cuda" or configs._capability(q.device) != (9, 0):
        return False
    if meta is not None or alibi_slopes is not None or dropout is not None:
        return False
    if q.dtype not in _GL_DTYPES or not (k.dtype == v.dtype == q.dtype) or prob.headdim not in (64, 128):
        return False
    if prob.has_left or prob.softcap > 0 or not prob.softmax_scale > 0:
        return False
    if prob.has_right and not (prob.causal and prob.window_right == 0):
        return False
    # TMA: 16-byte aligned bases and strides, unit stride on d.
    for x in (q, k, v):
        if x.stride(-1) != 1 or x.data_ptr() % 16 or any(s * x.element_size() % 16 for s in x.stride()[:-1]):
            return False
    return True


def _descriptor(x: torch.Tensor, rows: int) -> "TensorDescriptor":
    """A TMA descriptor over (batch, seqlen, heads, d) moving (1, rows, 1, d) boxes."""
    box = [1, rows, 1, x.shape[-1]]
    layout = gl.NVMMASharedLayout.get_default_for(box, _GL_DTYPES[x.dtype])
    return TensorDescriptor(x, list(x.shape), list(x.stride()), box, layout)


def attention_forward_sm90(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           prob: AttnProblem) -> tuple[torch.Tensor, torch.Tensor]:
    """q (batch, seqlen_q, nheads, d), k/v (batch, seqlen_k, nheads_k, d), where ``supports``.

    Returns out (q's shape and dtype, contiguous) and lse (float32 (batch, nheads, seqlen_q),
    natural log). Causal is aligned bottom-right (key j visible to query i when
    j <= i + seqlen_k - seqlen_q)."""
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k = k.shape[1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, nheads, seqlen_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse
    if seqlen_k == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    cfg = configs.sm90_forward_config(headdim, prob.causal)
    num_m_blocks = math.ceil(seqlen_q / cfg.block_m)
    grid = (num_m_blocks, nheads, batch)
    _fwd_sm90_kernel[grid](
        _descriptor(q, cfg.block_m), _descriptor(k, cfg.block_n), _descriptor(v, cfg.block_n),
        _descriptor(out, cfg.block_m), lse,
        seqlen_q, seqlen_k, nheads // k.shape[2], num_m_blocks, lse.stride(0), lse.stride(1),
        prob.softmax_scale * LOG2E,
        HEADDIM=headdim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, STAGES=cfg.num_stages,
        CAUSAL=prob.causal, num_warps=cfg.num_warps,
    )
    return out, lse
