"""FlashAttention for Hopper (sm_90) in Gluon: a forward, a backward (dK/dV and dQ
kernels, or the atomic 5-GEMM one), and their host launchers.

The portable forward (``kernels.fwd``) leaves the schedule to Triton's compiler. This
family writes it out, as FA3 does within one warpgroup pair:

* Q, K and V arrive by TMA (one 4-D descriptor per tensor over (batch, seqlen, heads, d),
  so in dense calls rows past a sequence's end are zero-filled and never stored), K/V
  through a ring of ``STAGES`` shared-memory buffers, each with its own mbarrier, refilled
  as soon as the MMAs that read it have finished;
* both GEMMs are warpgroup MMAs (wgmma): S = Q K^T from shared memory, O += P V with P
  from registers;
* the loop is software pipelined: block j's S = Q K_j^T and block j-1's O += P V are issued
  together, and block j's softmax runs while the P V MMA is still in flight.

Scope (``supports``): bf16/fp16 calls, dense (batch, seqlen, heads, d) or plain varlen
(under ``RINGFLASH_SM90_VARLEN=1`` only: ``configs.sm90_varlen_enabled``), d = 40 to 128
in steps of 8 (tiles of 64 or 128 columns, the missing ones zero-filled by TMA; also
d = 136 to 256 on 256-column tiles, without dropout or softcap, the backward's dK/dV
consumers splitting d instead of the keys: ``_dkdv_half_rows``),
causal (bottom-right) or full, GQA/MQA, positive softmax scale, dropout
(the portable kernels' mask, entry for entry, from the Philox words of
``dropout_mask.dropout_keys``, each four entries' draw mixed once by inline PTX:
``_dropout_factor``), softcap (the GPU's tanh instruction, as the portable kernels use for
16-bit inputs: ``_capped``); no window or ALiBi. Everything else stays on the portable
kernels. The dispatcher
(``kernels.dispatch``) takes this family where it measured faster (``preferred``), or for
every call in scope with ``RINGFLASH_BACKEND=sm90``.

Writes the same out and lse as ``kernels.fwd.attention_forward``, so either backward
takes either forward's results.

Varlen programs read their sequence's keys and values through descriptors made in the
kernel over that sequence alone (TMA zero-fills past its end, as the portable kernels'
masked loads do), so no row of another sequence enters the P V product. Their query tiles
may still cover the next sequence's rows: those rows' results are never stored.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from . import configs
from .problem import AttnProblem, dropout_args, dropout_threshold, meta_signature
from .common import TANH_APPROX_PTX, contiguous_strides, grad_buffer, tma_readable
from .launch import PlannedLaunch, PlanTable, descriptor_key

#: Oldest Triton whose Gluon API these kernels are written against (3.6, the GPU image's;
#: 3.9 compiles them too). Gluon's API changes between releases (3.5's warp_specialize
#: took other arguments), so older releases keep the portable kernels.
MIN_TRITON = (3, 6)

try:  # Gluon ships with Triton >= 3.5; without it (or its Hopper module) this family is absent.
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < MIN_TRITON:
        raise ImportError(f"Triton {triton.__version__} is older than {MIN_TRITON}")
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
    _tma_reduce_add = getattr(tma, "async_atomic_add", None)
    if _tma_reduce_add is None:
        from triton._C.libtriton import ir as _ir
        from triton.experimental.gluon.language._core import builtin as _gluon_builtin

        @_gluon_builtin
        def _tma_reduce_add(tensor_desc, coord, src, _semantic=None):
            """An asynchronous TMA add of shared memory ``src`` into the box of ``tensor_desc``
            at ``coord`` (cp.reduce.async.bulk.tensor ... .add), completed (its shared memory
            read) by ``tma.store_wait`` as TMA stores are. Later releases name it
            ``tma.async_atomic_add``; Triton 3.6's Gluon builder has the operation
            (``create_async_tma_reduce``) but no Python wrapper for it."""
            coord = _semantic._convert_to_ir_values(coord, require_i64=False)
            _semantic.builder.create_async_tma_reduce(_ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord,
                                                      src.handle)

AVAILABLE = gluon is not None

def _dropout_asm(key_major: bool, packed: bool = False) -> str:
    """PTX for ``_dropout_factor``: eight entries of a thread's wgmma accumulator registers
    per call (``pack=8``: registers 8 i .. 8 i + 7, consecutive in the layout's register
    order). In an m64nNk16 accumulator, register r of a thread holds column 2 (lane % 4) +
    (r % 2) + 8 (r // 4) and row lane / 4 + 8 ((r // 2) % 2) of its warp's 16 rows, so
    registers {0, 2, 4, 6} are two rows 8 apart by two columns 8 apart: one draw of
    ``common.dropout_keep`` (its queries i, i + 8 and keys j, j + 8), and {1, 3, 5, 7} the
    next column's draw. Register r takes byte 2 s + t of its draw, s the query half and t
    the key half: s = (r // 2) % 2 and t = r // 4 in the query-major tiles (queries are
    rows), the other way round in the key-major ones. Each draw is mixed once; its four
    bytes are compared with the threshold at once (bit 7 of each byte: x | 0x80 minus the
    threshold's low 7 bits carries no borrow across bytes and leaves bit 7 set where the low
    7 bits are at least the threshold's, and one LOP3 folds in bit 7 of x and of the
    threshold), and PRMT spreads a byte's bit 7 over a register-wide mask for the AND with
    the entry's kept value. Operands: $0-7 the results, $8-15 query-pair words, $16-23
    key-pair words, $24-31 the threshold in each byte, $32-39 each entry's kept value (a
    scalar's, or the entry's own probability). With the loops' words, the mask adds
    5.7-7.5 SASS instructions per entry to dK/dV's loop and 5.0 to dQ's, against 11.2-12.4 and
    10.6 for a draw per key pair (``scripts/dropout_sass.py``).

    ``packed`` (query-major only): the kept values are 16-bit, two entries to a register
    (entries 2 k and 2 k + 1, adjacent columns: one from each draw, the same byte of both),
    so one PRMT builds both halves' mask and one AND applies it: $0-3 the results, $4-11
    and $12-19 the words, $20-27 the threshold, $28-31 the kept pairs. The forward masks
    its probabilities after rounding them to 16 bits for the P V product, one PRMT and AND
    per two entries where the float32 mask took one each per entry: 4.6 added instructions
    per entry in its loop instead of 5.0. (A mixer of two lo ^ hi rounds of a 32 x 32 ->
    64-bit product, an IMAD.WIDE and a LOP3 each, took the forward to 4.1 but made the
    backward kernels spill: the product's register pair.)"""
    assert not (packed and key_major)
    outputs = 4 if packed else 8
    words_q, words_k, threshold, kept = outputs, outputs + 8, outputs + 16, outputs + 24
    lines = ["{", ".reg .b32 x, a0, a1, lo, hi, m;",
             f"and.b32 lo, ${threshold}, 0x7f7f7f7f;",  # the threshold's low 7 bits, in each byte
             f"and.b32 hi, ${threshold}, 0x80808080;"]  # and its bit 7
    for first in (0, 1):  # the draws of registers {0, 2, 4, 6} and {1, 3, 5, 7}
        lines.append(f"xor.b32 x, ${words_q + first}, ${words_k + first};")
        lines += ["mul.lo.s32 x, x, -1640531535;",  # 0x9E3779B1
                  "shr.b32 m, x, 15;",
                  "xor.b32 x, x, m;",
                  "mul.lo.s32 x, x, -2048144777;",  # 0x85EBCA77
                  "shr.b32 m, x, 16;",
                  "xor.b32 x, x, m;"]
        lines += [f"or.b32 a{first}, x, 0x80808080;",
                  f"sub.u32 a{first}, a{first}, lo;",  # bit 7 of each byte: x's low 7 bits >= the threshold's
                  f"lop3.b32 a{first}, x, a{first}, hi, 0xD4;"]  # threshold >= 128: x's bit 7 and that; else: either
        # Each draw's entries at once where they fit alone (one draw's bits live at a time).
        for reg in range(first, 8, 2) if not packed else ():
            half_q, half_k = ((reg // 4), (reg // 2) % 2) if key_major else ((reg // 2) % 2, reg // 4)
            byte = 2 * half_q + half_k
            lines += [f"prmt.b32 m, a{first}, 0, {hex(0x1111 * (8 + byte))};",  # bit 7 of the byte, everywhere
                      f"and.b32 ${reg}, ${kept + reg}, m;"]
    for pair in range(4) if packed else ():  # the low half from draw 0's byte, the high half from draw 1's
        byte = 2 * (pair % 2) + pair // 2  # query half (2 pair) // 2 % 2, key half (2 pair) // 4
        lines += [f"prmt.b32 m, a0, a1, {hex(0x0011 * (8 + byte) + 0x1100 * (12 + byte))};",
                  f"and.b32 ${pair}, ${kept + pair}, m;"]
    return "\n".join(lines + ["}"])


# constexpr: a Gluon kernel reads no other global.
_DROPOUT_CONSTRAINTS = triton.language.constexpr(",".join(["=r"] * 8 + ["r"] * 32))
_DROPOUT_CONSTRAINTS_PACKED = triton.language.constexpr(",".join(["=r"] * 4 + ["r"] * 28))
_DROPOUT_ASM_QUERY_MAJOR = triton.language.constexpr(_dropout_asm(False))
_DROPOUT_ASM_KEY_MAJOR = triton.language.constexpr(_dropout_asm(True))
_DROPOUT_ASM_PACKED = triton.language.constexpr(_dropout_asm(False, packed=True))

#: Adds four float32 values to four consecutive, 16-byte-aligned floats ($8: the offset of
#: the first, in floats, from the base $4) with one vector reduction (sm_90, PTX 8.1);
#: the four outputs are placeholders that inline assembly must have.
_RED_ADD_V4_PTX = triton.language.constexpr(
    "{ .reg .b64 addr; mad.wide.s32 addr, $8, 4, $4; "
    "red.relaxed.gpu.global.add.v4.f32 [addr], {$12, $13, $14, $15}; "
    "mov.b32 $0, 0; mov.b32 $1, 0; mov.b32 $2, 0; mov.b32 $3, 0; }")


_GL_DTYPES = {}
if AVAILABLE:
    _GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}

    @gluon.jit
    def _tanh_approx(x):
        """The GPU's tanh instruction (``common.tanh_approx``'s, as the portable kernels use
        for 16-bit inputs; these kernels take 16-bit inputs only)."""
        return gl.inline_asm_elementwise(TANH_APPROX_PTX, "=r,r", [x], dtype=gl.float32, is_pure=True,
                                         pack=1)

    @gluon.jit
    def _let_dependent_launch_start():
        """This program lets a programmatic dependent launch (the next kernel in the stream,
        launched with ``launch_pdl``) start once every program of this one has begun or ended
        (PTX ``griddepcontrol.launch_dependents``; nothing without such a launch)."""
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)

    @gluon.jit
    def _wait_for_prior_launch():
        """Waits until the launch this one depends on programmatically has finished and its
        writes are visible (PTX ``griddepcontrol.wait``; returns at once otherwise)."""
        gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _capped(s, softcap_in, HAS_SOFTCAP: gl.constexpr):
        """Raw scores q.k -> the scores the softmax scales by ``qk_scale_log2``: unchanged,
        or with softcap tanh(q.k * softcap_in) (softcap_in = softmax_scale / softcap; the
        host then passes qk_scale_log2 = softcap * log2(e), so the capped scores cost no
        multiply beyond the tanh's argument)."""
        if HAS_SOFTCAP:
            s = _tanh_approx(s * softcap_in)
        return s

    @gluon.jit
    def _capped_grad(p, t, HAS_SOFTCAP: gl.constexpr):
        """dS's weight on dP - delta: P, or with softcap P (1 - t^2) (``t``: the capped
        scores, tanh's output; the chain rule through softcap * tanh(q.k * scale / softcap)
        leaves the scale, which dK and dQ take at the end)."""
        if HAS_SOFTCAP:
            p = p * (1.0 - t * t)
        return p

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
    def _varlen_sequence(QStarts, QEnds, CuSeqlensK, seq):
        """(first query row, queries, first key row, keys) of sequence ``seq`` of a plain
        varlen batch."""
        q_base = gl.load(QStarts + seq)
        k_base = gl.load(CuSeqlensK + seq)
        return q_base, gl.load(QEnds + seq) - q_base, k_base, gl.load(CuSeqlensK + seq + 1) - k_base

    @gluon.jit
    def _sequence_descriptor(Ptr, row0, rows, heads, headdim, stride_s, stride_h, like):
        """A descriptor with ``like``'s box and layout over rows [row0, row0 + rows) of a
        packed (total, heads, headdim) tensor: TMA zero-fills reads past them and clips
        writes there, where the packed tensor's descriptor would reach the next sequence.
        Its batch dimension has size 1 (stride unused). An empty sequence gets one row (a
        descriptor has no empty dimension) that lies inside the tensor even when the
        sequence starts at its end: row0 - 1 (the loaders may read it, nothing counts it,
        and nothing is stored there)."""
        start = row0 - ((rows == 0) & (row0 > 0)).to(gl.int32)
        return tma.make_tensor_descriptor(
            Ptr + start.to(gl.int64) * stride_s, [1, gl.maximum(rows, 1), heads, headdim],
            [stride_s, stride_s, stride_h, 1], like.block_type.shape, like.layout)

    @gluon.jit
    def _packed_descriptor(Ptr, row0, rows, heads, headdim, like):
        """``_sequence_descriptor`` over a contiguous packed (total, heads, headdim) tensor
        (the backward's Q, dO, dQ, K, V, dK and dV)."""
        return _sequence_descriptor(Ptr, row0, rows, heads, headdim, heads * headdim, headdim, like)

    @gluon.jit
    def _sequence_descriptors(QPtr, DOPtr, KPtr, VPtr, q_row, seqlen_q, k_row, seqlen_k, nheads_k, kv_group, headdim,
                              q_like, do_like, k_like, v_like):
        """The backward loaders' four descriptors over one sequence of contiguous packed
        (total, heads, headdim) tensors: Q and dO (``nheads_k x kv_group`` heads), K and V."""
        nheads = nheads_k * kv_group
        q_desc = _packed_descriptor(QPtr, q_row, seqlen_q, nheads, headdim, q_like)
        do_desc = _packed_descriptor(DOPtr, q_row, seqlen_q, nheads, headdim, do_like)
        k_desc = _packed_descriptor(KPtr, k_row, seqlen_k, nheads_k, headdim, k_like)
        v_desc = _packed_descriptor(VPtr, k_row, seqlen_k, nheads_k, headdim, v_like)
        return q_desc, do_desc, k_desc, v_desc

    @gluon.jit
    def _program_ids(HEADS_FIRST: gl.constexpr):
        """(block, head, sequence, sequences) of this program: the grid is (blocks, heads,
        batch), or with HEADS_FIRST (heads, batch, blocks), every head and sequence of a
        block launched before the next block (``configs.sm90_heads_first``)."""
        if HEADS_FIRST:
            block = gl.program_id(2)
            head = gl.program_id(0)
            seq = gl.program_id(1)
            seqs = gl.num_programs(1)
        else:
            block = gl.program_id(0)
            head = gl.program_id(1)
            seq = gl.program_id(2)
            seqs = gl.num_programs(2)
        return block, head, seq, seqs

    @gluon.jit
    def _dropout_keys_at(DropKeys, key_index, HAS_DROPOUT: gl.constexpr):
        """The sequence and head's two Philox words at ``DropKeys + key_index``
        (``dropout_mask.dropout_keys``): the keys of ``common.dropout_keep``'s query-pair and
        key-pair words; zeros without dropout (the pointer is then a dummy, never read)."""
        if HAS_DROPOUT:
            key_q = gl.load(DropKeys + key_index).to(gl.uint32, bitcast=True)
            key_k = gl.load(DropKeys + key_index + 1).to(gl.uint32, bitcast=True)
        else:
            key_q = gl.cast(0, gl.uint32)
            key_k = gl.cast(0, gl.uint32)
        return key_q, key_k

    @gluon.jit
    def _pair_word_base(offsets, MULTIPLIER: gl.constexpr):
        """The loop-invariant part of ``_pair_words`` for positions start + ``offsets``: the
        offsets' pair indices times the multiplier."""
        return ((offsets // 16) * 8 + offsets % 8).to(gl.uint32) * MULTIPLIER

    @gluon.jit
    def _pair_words(base, start, key, MULTIPLIER: gl.constexpr):
        """``common._position_word`` of the pairs of positions start + offsets (``base`` from
        ``_pair_word_base``; ``start`` a multiple of 16, whose pair index is start / 2): one
        add, a shift and an xor per word in a loop, where working the pair index out per
        position cost twice that (the dK/dV kernel's 16 query words per thread per step)."""
        x = base + (gl.cast(start // 2, gl.uint32) * MULTIPLIER + key)
        return x ^ (x >> 16)

    @gluon.jit
    def _dropout_factor(query_words, key_words, threshold, kept, KEY_MAJOR: gl.constexpr):
        """The keep mask of ``common.dropout_keep`` (HAS_DROPOUT 2), applied: ``kept`` (a float,
        or a tile of the same shape: the probabilities themselves) where the entry is kept,
        0.0 where dropped; ``query_words`` and ``key_words`` (``_pair_words``: two vectors
        sliced from one tile layout), (queries, keys) or with KEY_MAJOR (keys, queries).
        Queries i, i + 8 and keys j, j + 8 share a draw (its four bytes): inline PTX
        (``_DROPOUT_ASM_*``) gets eight of a thread's accumulator registers at a time, two
        draws' entries, and mixes each draw once. A draw per key pair (its two 16-bit
        halves) cost ~8 added instructions per entry in the forward and ~11 in each backward
        kernel (``scripts/dropout_sass.py``), and dropout 1.41x the attention on an H200
        (run 39)."""
        # The threshold (at most 255: ``supports``) in each byte, for the draws' four bytes.
        threshold_bytes = gl.cast(threshold, gl.uint32) * 0x01010101
        if KEY_MAJOR:
            return gl.inline_asm_elementwise(_DROPOUT_ASM_KEY_MAJOR, _DROPOUT_CONSTRAINTS,
                                             [query_words[None, :], key_words[:, None], threshold_bytes, kept],
                                             dtype=gl.float32, is_pure=True, pack=8)
        else:
            return gl.inline_asm_elementwise(_DROPOUT_ASM_QUERY_MAJOR, _DROPOUT_CONSTRAINTS,
                                             [query_words[:, None], key_words[None, :], threshold_bytes, kept],
                                             dtype=gl.float32, is_pure=True, pack=8)

    @gluon.jit
    def _p_operand(p, query_words, key_base, key_k, n0, threshold, dtype: gl.constexpr, p_layout: gl.constexpr,
                   HAS_DROPOUT: gl.constexpr):
        """The P V product's A operand: a (query rows x keys n0..) float32 probability tile
        rounded to the operand's dtype in ``p_layout``; with HAS_DROPOUT, dropped entries
        zeroed (``key_base``: ``_pair_word_base`` of the tile's key offsets). The mask goes
        on the operand itself, two 16-bit entries per PRMT and AND (``_dropout_asm``'s packed
        form; the accumulator's and the operand's layouts place each element in the same
        thread and register, so the words' pairing holds; ``gl.to_linear_layout`` gives both
        the same register bases). Masked before the conversion it cost one of each per
        float32 entry (``scripts/dropout_sass.py``)."""
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        if HAS_DROPOUT:
            threshold_bytes = gl.cast(threshold, gl.uint32) * 0x01010101
            words_q = gl.convert_layout(query_words, gl.SliceLayout(1, p_layout))
            words_k = gl.convert_layout(_pair_words(key_base, n0, key_k, 0x85EBCA6B), gl.SliceLayout(0, p_layout))
            p_op = gl.inline_asm_elementwise(_DROPOUT_ASM_PACKED, _DROPOUT_CONSTRAINTS_PACKED,
                                             [words_q[:, None], words_k[None, :], threshold_bytes, p_op],
                                             dtype=p_op.dtype, is_pure=True, pack=8)
        return p_op

    @gluon.jit
    def _load_pair(a_desc, b_desc, a_bufs, b_bufs, a_bars, b_bars, slot, b, row0, head, pred):
        """Start the TMA loads of rows [row0, row0 + box) of sequence ``b``, head ``head``, of
        two tensors (K and V, or Q and dO) into ring slot ``slot``, each on its own barrier."""
        mbarrier.expect(a_bars.index(slot), a_desc.block_type.nbytes, pred=pred)
        _tma_load(a_desc, [b, row0, head, 0], a_bars.index(slot), a_bufs.index(slot), pred=pred)
        mbarrier.expect(b_bars.index(slot), b_desc.block_type.nbytes, pred=pred)
        _tma_load(b_desc, [b, row0, head, 0], b_bars.index(slot), b_bufs.index(slot), pred=pred)

    @gluon.jit
    def _load_kv(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, block, b, k_base, hk, n_blocks,
                 BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        """Start the TMA loads of key block ``block`` into its ring slot (skipped past the
        last); the sequence's keys start at row ``k_base`` of batch entry ``b`` (varlen: 0,
        of the sequence's own descriptors)."""
        _load_pair(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, block % STAGES, b, k_base + block * BLOCK_N, hk,
                   block < n_blocks)

    @gluon.jit
    def _attend_rows(
        q_rows, k_bufs, v_bufs, q_bar, k_bars, v_bars, kv_free, turns,
        k_desc, v_desc, o_desc, Lse, DropKeys, key_index, dropout_threshold, dropout_scale,
        Out, stride_os, stride_oh, headdim, q_base, k_base,
        b, h, hk, r0, n_blocks, seqlen_q, seqlen_k, stride_lb, stride_lh, qk_scale_log2, softcap_in,
        HEADDIM: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
        CAUSAL: gl.constexpr, WARPS: gl.constexpr, REFILL: gl.constexpr, PINGPONG: gl.constexpr,
        TURN: gl.constexpr, HAS_DROPOUT: gl.constexpr, IS_VARLEN: gl.constexpr, HAS_SOFTCAP: gl.constexpr,
    ):
        """Query rows [r0, r0 + ROWS) of one head against key blocks [0, n_blocks), by the
        WARPS warps running it (a multiple of 4: one warpgroup per 64 rows); writes their out
        and lse.

        ``q_rows``: the rows' (1, ROWS, 1, d) box in shared memory, loaded by whoever signals
        ``q_bar``; block j's K and V come in ring slot j % STAGES, signalled by ``k_bars`` /
        ``v_bars``. With REFILL this code refills a slot itself once it is done with it (the
        whole CTA runs it); otherwise it arrives on ``kv_free`` for a loader partition. With
        PINGPONG two consumers take turns (``turns``, TURN = 0 or 1) to issue their MMAs, so
        that one's softmax runs while the other's MMAs occupy the tensor cores (FA3). With
        HAS_DROPOUT the P V product sees the kept probabilities (the row sums all of them)
        and out is scaled by 1 / (1 - p) at the end, as in ``kernels.fwd``.

        Rows and keys are positions within the sequence, whose queries start at row
        ``q_base`` and keys at ``k_base`` of batch entry ``b`` of the descriptors. Varlen
        (IS_VARLEN; one packed entry) stores out by masked pointer stores to ``Out``: a TMA
        box past the sequence's end would overwrite the next sequence's rows."""
        dtype: gl.constexpr = k_desc.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, HEADDIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        q_tile = q_rows.reshape([ROWS, HEADDIM])

        # From block n_full on, some of these rows' keys are masked.
        diag = seqlen_k - seqlen_q
        if CAUSAL:
            n_full = gl.maximum(gl.minimum(seqlen_k, r0 + diag + 1), 0) // BLOCK_N
        else:
            n_full = seqlen_k // BLOCK_N
        rows = r0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
        # Dropout's words: the rows' (fixed), and the loop-invariant part of the keys'.
        key_q, key_k = _dropout_keys_at(DropKeys, key_index, HAS_DROPOUT)
        query_words = _pair_words(_pair_word_base(rows - r0, 0x9E3779B1), r0, key_q, 0x9E3779B1)
        key_base = _pair_word_base(gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout)), 0x85EBCA6B)
        m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([ROWS], gl.float32, layout=gl.SliceLayout(1, s_layout))
        acc = gl.zeros([ROWS, HEADDIM], gl.float32, layout=o_layout)
        s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
        turn_phase = 0
        mbarrier.wait(q_bar, 0)

        if n_blocks > 0:
            # Block 0 alone: its S, then its softmax (nothing to overlap yet).
            if PINGPONG:
                mbarrier.wait(turns.index(TURN), turn_phase)
                turn_phase ^= 1
            mbarrier.wait(k_bars.index(0), 0)
            k_tile = k_bufs.index(0).reshape([BLOCK_N, HEADDIM])
            s = warpgroup_mma(q_tile, k_tile.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            if PINGPONG:
                mbarrier.arrive(turns.index(1 - TURN))
            s = _capped(warpgroup_mma_wait(num_outstanding=0, deps=(s, )), softcap_in, HAS_SOFTCAP)
            if n_full <= 0:
                s = _causal_mask(s, 0, rows, diag, seqlen_k, BLOCK_N, CAUSAL, s_layout)
            p, m_i, l_i, alpha = _online_softmax(s, m_i, l_i, qk_scale_log2)
            p_op = _p_operand(p, query_words, key_base, key_k, 0, dropout_threshold, dtype, p_layout, HAS_DROPOUT)

            for j in range(1, n_blocks):
                slot = j % STAGES
                prev = (j - 1) % STAGES
                if PINGPONG:
                    mbarrier.wait(turns.index(TURN), turn_phase)
                    turn_phase ^= 1
                mbarrier.wait(k_bars.index(slot), (j // STAGES) & 1)
                k_tile = k_bufs.index(slot).reshape([BLOCK_N, HEADDIM])
                s_tok = warpgroup_mma(q_tile, k_tile.permute((1, 0)), s_zero, use_acc=False, is_async=True)
                mbarrier.wait(v_bars.index(prev), ((j - 1) // STAGES) & 1)
                v_tile = v_bufs.index(prev).reshape([BLOCK_N, HEADDIM])
                acc_tok = warpgroup_mma(p_op, v_tile, acc, is_async=True)
                if PINGPONG:
                    mbarrier.arrive(turns.index(1 - TURN))
                # S_j is the older group: waiting down to one outstanding leaves P V running.
                s = _capped(warpgroup_mma_wait(num_outstanding=1, deps=(s_tok, )), softcap_in, HAS_SOFTCAP)
                if j >= n_full:
                    s = _causal_mask(s, j * BLOCK_N, rows, diag, seqlen_k, BLOCK_N, CAUSAL, s_layout)
                p, m_i, l_i, alpha = _online_softmax(s, m_i, l_i, qk_scale_log2)
                acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc_tok, p_op))
                acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
                p_op = _p_operand(p, query_words, key_base, key_k, j * BLOCK_N, dropout_threshold, dtype, p_layout,
                                  HAS_DROPOUT)
                # Block j-1's slot is free: both MMAs that read it are done.
                if REFILL:
                    _load_kv(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, j - 1 + STAGES, b, k_base, hk, n_blocks,
                             BLOCK_N, STAGES)
                else:
                    mbarrier.arrive(kv_free.index(prev))

            last = n_blocks - 1
            if PINGPONG:
                mbarrier.wait(turns.index(TURN), turn_phase)
                turn_phase ^= 1
            mbarrier.wait(v_bars.index(last % STAGES), (last // STAGES) & 1)
            v_tile = v_bufs.index(last % STAGES).reshape([BLOCK_N, HEADDIM])
            acc_tok = warpgroup_mma(p_op, v_tile, acc, is_async=True)
            if PINGPONG:
                mbarrier.arrive(turns.index(1 - TURN))
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc_tok, p_op))[0]

        empty = l_i == 0.0
        l_safe = gl.where(empty, 1.0, l_i)
        out = acc / gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout))[:, None]
        if HAS_DROPOUT:
            out = out * dropout_scale
        lse = (gl.where(empty, 0.0, m_i * qk_scale_log2) + gl.log2(l_safe)) * 0.6931471805599453
        lse = gl.where(empty, float("-inf"), lse)
        gl.store(Lse + b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh + q_base + rows, lse,
                 mask=rows < seqlen_q)
        if IS_VARLEN:
            o_rows = r0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_layout))
            dims = gl.arange(0, HEADDIM, layout=gl.SliceLayout(0, o_layout))
            o_base = Out + h.to(gl.int64) * stride_oh + q_base.to(gl.int64) * stride_os
            gl.store(o_base + o_rows[:, None].to(gl.int64) * stride_os + dims[None, :], out.to(dtype),
                     mask=(o_rows[:, None] < seqlen_q) & (dims[None, :] < headdim))
        else:
            # The rows' Q buffer is free (every MMA that read it has finished): stage out there.
            q_tile.store(out.to(dtype))
            fence_async_shared()
            _tma_store(o_desc, [b, q_base + r0, h, 0], q_rows)
            tma.store_wait(pendings=0)

    @gluon.jit
    def _load_all(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bar, k_bars, v_bars, kv_free,
                  b, h, hk, m0, q_base, k_base, n_blocks, KPtr, VPtr, seq_k_row, seqlen_k, nheads_k, headdim,
                  stride_ks, stride_kh, stride_vs, stride_vh, ROWS: gl.constexpr, BLOCK_N: gl.constexpr,
                  PARTS: gl.constexpr, STAGES: gl.constexpr, IS_VARLEN: gl.constexpr):
        """The loader partition: Q's PARTS boxes of ROWS rows once, then every key block, each
        into its ring slot once both consumers have released the block that held it
        (``kv_free``)."""
        if IS_VARLEN:
            k_desc = _sequence_descriptor(KPtr, seq_k_row, seqlen_k, nheads_k, headdim, stride_ks, stride_kh, k_desc)
            v_desc = _sequence_descriptor(VPtr, seq_k_row, seqlen_k, nheads_k, headdim, stride_vs, stride_vh, v_desc)
        mbarrier.expect(q_bar, PARTS * q_desc.block_type.nbytes)
        for i in gl.static_range(PARTS):
            _tma_load(q_desc, [b, q_base + m0 + i * ROWS, h, 0], q_bar, q_bufs.index(i))
        for i in range(n_blocks):
            mbarrier.wait(kv_free.index(i % STAGES), ((i // STAGES) + 1) & 1, pred=i >= STAGES)
            _load_kv(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, i, b, k_base, hk, n_blocks, BLOCK_N, STAGES)

    @gluon.jit
    def _fwd_sm90_kernel(
        q_desc, k_desc, v_desc, o_desc, Lse, DropKeys, Out, QStarts, QEnds, CuSeqlensK, KPtr, VPtr,
        seqlen_q, seqlen_k, kv_group, num_m_blocks, nheads_k, stride_ks, stride_kh, stride_vs, stride_vh,
        stride_lb, stride_lh, stride_keys_b, stride_os, stride_oh, headdim,
        qk_scale_log2, softcap_in, dropout_threshold, dropout_scale,
        HEADDIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
        CAUSAL: gl.constexpr, SPECIALIZED: gl.constexpr, PINGPONG: gl.constexpr, HAS_DROPOUT: gl.constexpr,
        IS_VARLEN: gl.constexpr, HEADS_FIRST: gl.constexpr, HAS_SOFTCAP: gl.constexpr, num_warps: gl.constexpr,
    ):
        """Grid (query blocks, heads, batch), or with HEADS_FIRST (heads, batch, query
        blocks) (``configs.sm90_heads_first``); causal programs start from the last query
        block (the longest) so the short ones fill the tail. Writes out through ``o_desc`` and lse
        (float32 (batch, heads, seqlen_q), natural log; -inf and out = 0 for a row that sees
        no key).

        Without SPECIALIZED, the CTA's ``num_warps`` warps run the BLOCK_M rows together and
        issue the loads themselves. With it, ``num_warps`` = 4: this warpgroup and a second
        one each take BLOCK_M / 2 rows, and one more warp issues every load (FA3's producer /
        consumer split), optionally with PINGPONG.

        IS_VARLEN: one packed batch entry (the descriptors' batch is 1), sequence b's queries
        at rows QStarts[b] .. QEnds[b] and keys at CuSeqlensK[b] .. CuSeqlensK[b + 1];
        ``seqlen_q`` (the longest, which sizes the grid) and ``seqlen_k`` become the
        sequence's. Its keys and values are read through descriptors made in the kernel over
        that sequence alone (``KPtr``/``VPtr`` (total_k, nheads_k, d) with the given strides),
        so TMA zero-fills a tile's rows past its end: over the packed tensor they would hold
        the next sequence's, whose NaN or Inf would reach this output through 0 x NaN in P V.
        The warps that issue the loads make them (the loader partition, or with SPECIALIZED
        off every warp), so that the thread reading a descriptor through TMA is one that
        fenced it (``configs.sm90_varlen_enabled``: run 47's fault)."""
        pid, h, seq, _ = _program_ids(HEADS_FIRST)
        m_block = num_m_blocks - 1 - pid if CAUSAL else pid
        m0 = m_block * BLOCK_M
        hk = h // kv_group
        key_index = seq * stride_keys_b + 2 * h  # this (sequence, head)'s dropout words
        zero = seq * 0  # an int32 scalar: both branches below must give the same types
        seq_k_row = zero
        if IS_VARLEN:
            b = zero
            q_base, seqlen_q, k_base, seqlen_k = _varlen_sequence(QStarts, QEnds, CuSeqlensK, seq)
            seq_k_row = k_base
            if not SPECIALIZED:
                k_desc = _sequence_descriptor(KPtr, k_base, seqlen_k, nheads_k, headdim, stride_ks, stride_kh, k_desc)
                v_desc = _sequence_descriptor(VPtr, k_base, seqlen_k, nheads_k, headdim, stride_vs, stride_vh, v_desc)
            k_base = zero  # rows of the sequence's own descriptors
        else:
            b = seq
            q_base = zero
            k_base = zero
        dtype: gl.constexpr = q_desc.dtype

        # Q in PARTS boxes of ROWS rows, one per consumer (a reshape of a slice is not allowed).
        PARTS: gl.constexpr = 2 if SPECIALIZED else 1
        ROWS: gl.constexpr = BLOCK_M // PARTS
        q_bufs = gl.allocate_shared_memory(dtype, [PARTS, 1, ROWS, 1, HEADDIM], q_desc.layout)
        k_bufs = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_N, 1, HEADDIM], k_desc.layout)
        v_bufs = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_N, 1, HEADDIM], v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        kv_free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_bars.index(i), count=1)
            mbarrier.init(v_bars.index(i), count=1)
            mbarrier.init(kv_free.index(i), count=2)  # both consumers release each slot
        for i in gl.static_range(2):
            mbarrier.init(turns.index(i), count=1)

        # Key blocks this query block sees: [0, n_blocks).
        if CAUSAL:
            n_end = gl.minimum(seqlen_k, m0 + BLOCK_M + seqlen_k - seqlen_q)
        else:
            n_end = seqlen_k
        n_blocks = gl.cdiv(gl.maximum(n_end, 0), BLOCK_N)
        # A varlen program past its sequence's queries runs no key block and stores nothing
        # (rows past the sequence are masked): no early return, which the warp-specialized
        # region's worker warps would not see.
        if m0 >= seqlen_q:
            n_blocks = 0

        if SPECIALIZED:
            if PINGPONG:
                mbarrier.arrive(turns.index(0))  # consumer 0 issues first
            gl.warp_specialize([
                (_attend_rows, (q_bufs.index(0), k_bufs, v_bufs, q_bar, k_bars, v_bars, kv_free, turns,
                                k_desc, v_desc, o_desc, Lse, DropKeys, key_index, dropout_threshold, dropout_scale,
                                Out, stride_os, stride_oh, headdim, q_base, k_base, b, h, hk, m0, n_blocks,
                                seqlen_q, seqlen_k, stride_lb, stride_lh, qk_scale_log2, softcap_in,
                                HEADDIM, ROWS, BLOCK_N, STAGES, CAUSAL, 4, False, PINGPONG, 0, HAS_DROPOUT, IS_VARLEN,
                                HAS_SOFTCAP)),
                (_attend_rows, (q_bufs.index(1), k_bufs, v_bufs, q_bar, k_bars, v_bars, kv_free, turns,
                                k_desc, v_desc, o_desc, Lse, DropKeys, key_index, dropout_threshold, dropout_scale,
                                Out, stride_os, stride_oh, headdim, q_base, k_base, b, h, hk, m0 + ROWS, n_blocks,
                                seqlen_q, seqlen_k, stride_lb, stride_lh, qk_scale_log2, softcap_in,
                                HEADDIM, ROWS, BLOCK_N, STAGES, CAUSAL, 4, False, PINGPONG, 1, HAS_DROPOUT, IS_VARLEN,
                                HAS_SOFTCAP)),
                (_load_all, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bar, k_bars, v_bars, kv_free,
                             b, h, hk, m0, q_base, k_base, n_blocks, KPtr, VPtr, seq_k_row, seqlen_k, nheads_k,
                             headdim, stride_ks, stride_kh, stride_vs, stride_vh, ROWS, BLOCK_N, PARTS, STAGES,
                             IS_VARLEN)),
            ], [4, 1], [240, 24])
        else:
            mbarrier.expect(q_bar, q_desc.block_type.nbytes)
            _tma_load(q_desc, [b, q_base + m0, h, 0], q_bar, q_bufs.index(0))
            for i in gl.static_range(STAGES):
                _load_kv(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, i, b, k_base, hk, n_blocks, BLOCK_N, STAGES)
            _attend_rows(q_bufs.index(0), k_bufs, v_bufs, q_bar, k_bars, v_bars, kv_free, turns,
                         k_desc, v_desc, o_desc, Lse, DropKeys, key_index, dropout_threshold, dropout_scale,
                         Out, stride_os, stride_oh, headdim, q_base, k_base, b, h, hk, m0, n_blocks,
                         seqlen_q, seqlen_k, stride_lb, stride_lh, qk_scale_log2, softcap_in,
                         HEADDIM, BLOCK_M, BLOCK_N, STAGES, CAUSAL, num_warps, True, False, 0, HAS_DROPOUT, IS_VARLEN,
                         HAS_SOFTCAP)

        mbarrier.invalidate(q_bar)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(k_bars.index(i))
            mbarrier.invalidate(v_bars.index(i))
            mbarrier.invalidate(kv_free.index(i))
        for i in gl.static_range(2):
            mbarrier.invalidate(turns.index(i))


    # --- backward: dK/dV and dQ, each a loader warp and two consumer warpgroups ------------
    #
    # The deterministic two-kernel backward of ``kernels.bwd`` (no atomics), laid out as the
    # forward: the rows a CTA owns (keys for dK/dV, queries for dQ) stay in shared memory,
    # the other side streams through a TMA ring. Scores are recomputed from lse2 (lse in
    # log2 units) and delta = rowsum(dO * O) of ``bwd.prepare_backward``.

    @gluon.jit
    def _add_dq_tile(dq_base, row0, col0, dq, stride_row_block, HEADDIM: gl.constexpr):
        """Adds a warpgroup MMA's float32 tile ``dq`` (rows from ``row0``, a multiple of 16;
        columns from ``col0``) into the tiled dQ accumulator of ``dq_accumulator_shape`` at
        ``dq_base``, four entries per vector reduction (``red.global.add.v4.f32``). The
        accumulator holds each 16-row block's four registers of a thread (rows r and r + 8,
        columns c and c + 1) side by side, so one instruction adds them, with no masks:
        Triton's atomics added two (F32x2). Halving the reductions left the 5-GEMM
        backward's speed where it was (run 46: 0.70-0.81x the 7-GEMM pair; run 39,
        0.68-0.87x), so they are not what limits it."""
        layout: gl.constexpr = dq.type.layout
        rows = gl.arange(0, dq.shape[0], layout=gl.SliceLayout(1, layout))
        cols = col0 + gl.arange(0, dq.shape[1], layout=gl.SliceLayout(0, layout))
        row_offsets = (row0 // 16 + rows // 16) * stride_row_block + (rows % 8) * (2 * HEADDIM) + (rows // 8 % 2) * 2
        col_offsets = (cols // 8) * 16 + (cols // 2 % 4) * 4 + cols % 2
        offsets = row_offsets[:, None] + col_offsets[None, :]
        # The base as a tensor of one value: the assembly reads each pack's first offset.
        base = dq_base + gl.zeros(dq.shape, gl.int32, layout=layout)
        gl.inline_asm_elementwise(_RED_ADD_V4_PTX, "=r,=r,=r,=r,l,l,l,l,r,r,r,r,r,r,r,r",
                                  [base, offsets, dq.to(gl.int32, bitcast=True)], dtype=gl.int32, is_pure=False,
                                  pack=4)

    @gluon.jit
    def _load_rows_with_stats(desc, stats_desc, bufs, stats_bufs, bars, slot, b, row0, head, stats_row0):
        """Start the TMA loads of rows [row0, row0 + box) of sequence ``b``, head ``head``, of
        Q (or dO) and of their lse2 (or delta) entries, from flat index ``stats_row0`` +
        ``row0`` of the flat row-statistics descriptor, into ring slot ``slot``, both on one
        barrier. The statistics' box runs on into the next head's or sequence's rows past
        the sequence (``_row_stats`` masks them)."""
        bar = bars.index(slot)
        mbarrier.expect(bar, desc.block_type.nbytes + stats_desc.block_type.nbytes)
        _tma_load(desc, [b, row0, head, 0], bar, bufs.index(slot))
        _tma_load(stats_desc, [stats_row0 + row0], bar, stats_bufs.index(slot))

    @gluon.jit
    def _row_stats(stats_bufs, Stats, slot, head_row, rows, seqlen_q, other, layout: gl.constexpr,
                   STATS_TMA: gl.constexpr):
        """A step's lse2 or delta entries for query rows ``rows`` (in ``layout``, a slice of
        the score tiles'), ``other`` for rows past seqlen_q: with STATS_TMA from ring slot
        ``slot`` (``_load_rows_with_stats``), else loaded from ``Stats`` + ``head_row``."""
        if STATS_TMA:
            x = gl.where(rows < seqlen_q, stats_bufs.index(slot).load(layout), other)
        else:
            x = gl.load(Stats + head_row + rows, mask=rows < seqlen_q, other=other)
        return x

    @gluon.jit
    def _dkdv_step(i, h_first, m_start, m_blocks, BLOCK_M: gl.constexpr, STAGES: gl.constexpr):
        """Step ``i`` of a dK/dV consumer: its ring slot and phase, query head and first
        query row (the loader's order: each head's query blocks from ``m_start`` in turn)."""
        return i % STAGES, (i // STAGES) & 1, h_first + i // m_blocks, (m_start + i % m_blocks) * BLOCK_M

    @gluon.jit
    def _store_rows(tile, acc, desc, b, row0, head):
        """acc -> ``tile``'s shared memory (free: the caller has waited for every MMA that read it) -> TMA
        store of rows [row0, row0 + box) (rows past the sequence are clipped)."""
        tile.reshape(acc.shape).store(acc.to(desc.dtype))
        fence_async_shared()
        _tma_store(desc, [b, row0, head, 0], tile)
        tma.store_wait(pendings=0)

    @gluon.jit
    def _fixed_and_ring(fixed_a_desc, fixed_b_desc, ring_a_desc, ring_b_desc, PARTS: gl.constexpr,
                        FIXED_ROWS: gl.constexpr, RING_ROWS: gl.constexpr, HEADDIM: gl.constexpr,
                        STAGES: gl.constexpr):
        """A backward CTA's shared memory: two tensors' rows it owns (PARTS boxes of
        FIXED_ROWS, one per consumer, or one both share, all on one barrier), and a ring of
        STAGES slots of RING_ROWS rows of the two it streams (a barrier per slot and tensor,
        and one that both consumer warpgroups arrive on to free the slot)."""
        dtype: gl.constexpr = fixed_a_desc.dtype
        fixed_a = gl.allocate_shared_memory(dtype, [PARTS, 1, FIXED_ROWS, 1, HEADDIM], fixed_a_desc.layout)
        fixed_b = gl.allocate_shared_memory(dtype, [PARTS, 1, FIXED_ROWS, 1, HEADDIM], fixed_b_desc.layout)
        ring_a = gl.allocate_shared_memory(dtype, [STAGES, 1, RING_ROWS, 1, HEADDIM], ring_a_desc.layout)
        ring_b = gl.allocate_shared_memory(dtype, [STAGES, 1, RING_ROWS, 1, HEADDIM], ring_b_desc.layout)
        fixed_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        a_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        b_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        free_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(fixed_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(a_bars.index(i), count=1)
            mbarrier.init(b_bars.index(i), count=1)
            mbarrier.init(free_bars.index(i), count=2)
        return fixed_a, fixed_b, ring_a, ring_b, fixed_bar, a_bars, b_bars, free_bars

    @gluon.jit
    def _invalidate_ring(fixed_bar, a_bars, b_bars, free_bars, STAGES: gl.constexpr):
        mbarrier.invalidate(fixed_bar)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(a_bars.index(i))
            mbarrier.invalidate(b_bars.index(i))
            mbarrier.invalidate(free_bars.index(i))

    @gluon.jit
    def _dkdv_rows(
        k_part, v_part, fixed_bar, q_bufs, do_bufs, q_bars, do_bars, free_bars, dk_desc, dv_desc,
        lse_bufs, delta_bufs, Lse2, Delta, stats_row0, stride_lh, DropKeys, stride_keys_b, dropout_threshold,
        dropout_scale, ds_buf, ds_other, k_other, ds_bars, DQAcc, dq_stage, stride_dqb, stride_dqs, stride_dqh,
        b, hk, n0, cta_last_key, h_first, m_start, m_blocks, n_steps, seqlen_q, seqlen_k,
        qk_scale_log2, softmax_scale, softcap_in, b_out, DKPtr, DVPtr, k_row, nheads_k, headdim,
        HEADDIM: gl.constexpr, ROWS: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
        CAUSAL: gl.constexpr, WARPS: gl.constexpr, HAS_DROPOUT: gl.constexpr, ATOMIC_DQ: gl.constexpr,
        IS_VARLEN: gl.constexpr, PART: gl.constexpr, HAS_SOFTCAP: gl.constexpr, STATS_TMA: gl.constexpr,
    ):
        """dK and dV of keys [n0, n0 + ROWS) of KV head ``hk``: the sum over query heads
        ``h_first``.. (its group's, or a slice of them) and the query blocks from ``m_start``
        (``n_steps`` = heads x ``m_blocks`` steps, in the loader's order), in key-major
        tiles: S^T = K Q^T, P^T = exp2(S^T - lse2), dV += P^T dO, dP^T = V dO^T,
        dS^T = P^T (dP^T - delta), dK += dS^T Q (scaled at the end). Releases each Q/dO slot on ``free_bars``. With
        HAS_DROPOUT, dV takes the kept probabilities and dP counts only where kept, both
        scaled by 1 / (1 - p) entry by entry through the PTX mask's factor. With ATOMIC_DQ,
        also column half PART of the CTA's share of dQ = dS K (scaled, both consumers' keys), added into the float32
        ``DQAcc`` by atomics: each dS^T goes through shared memory (``ds_buf``, this
        consumer's, and ``ds_other`` beside the other's keys ``k_other``) to be read
        transposed as the MMA's left operand: the 5-GEMM backward, no dQ kernel. dK and dV go
        to batch index ``b_out`` of their descriptors (``b``, or a slice's partial)."""
        dtype: gl.constexpr = dk_desc.dtype
        st_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, BLOCK_M, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, HEADDIM, 16])
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        k_tile = k_part.reshape([ROWS, HEADDIM])
        v_tile = v_part.reshape([ROWS, HEADDIM])
        keys = n0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, st_layout))
        # Dropout's words, loop-invariant parts: the keys' (fixed positions; each query head
        # has its own Philox words) and the query blocks'.
        key_base = _pair_word_base(keys - n0, 0x85EBCA6B)
        query_base = _pair_word_base(gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, st_layout)), 0x9E3779B1)
        diag = seqlen_k - seqlen_q
        dk = gl.zeros([ROWS, HEADDIM], gl.float32, layout=acc_layout)
        dv = gl.zeros([ROWS, HEADDIM], gl.float32, layout=acc_layout)
        st_zero = gl.zeros([ROWS, BLOCK_M], gl.float32, layout=st_layout)
        HALF_D: gl.constexpr = HEADDIM // 2
        DQ_COLS: gl.constexpr = HEADDIM // 4
        dq_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, DQ_COLS, 16])
        dq_zero = gl.zeros([BLOCK_M, DQ_COLS], gl.float32, layout=dq_layout)
        dq_half_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, HALF_D, 16])
        dq_half_zero = gl.zeros([BLOCK_M, HALF_D], gl.float32, layout=dq_half_layout)
        mbarrier.wait(fixed_bar, 0)
        for i in range(n_steps):
            slot, phase, h, m0 = _dkdv_step(i, h_first, m_start, m_blocks, BLOCK_M, STAGES)
            mbarrier.wait(q_bars.index(slot), phase)
            q_tile = q_bufs.index(slot).reshape([BLOCK_M, HEADDIM])
            st = warpgroup_mma(k_tile, q_tile.permute((1, 0)), st_zero, use_acc=False, is_async=True)
            mbarrier.wait(do_bars.index(slot), phase)
            do_tile = do_bufs.index(slot).reshape([BLOCK_M, HEADDIM])
            dpt = warpgroup_mma(v_tile, do_tile.permute((1, 0)), st_zero, use_acc=False, is_async=True)
            # Rows past seqlen_q: lse2 = +inf gives P = 0 there (their Q and dO are zero-filled).
            # With STATS_TMA lse2 and delta came with Q and dO (``_load_rows_with_stats``): as
            # global loads here they were 32% of the consumers' stall samples (run 53, d=128).
            cols = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, st_layout))
            head_row = stats_row0.to(gl.int64) + h.to(gl.int64) * stride_lh
            lse2 = _row_stats(lse_bufs, Lse2, slot, head_row, cols, seqlen_q, float("inf"),
                              gl.SliceLayout(0, st_layout), STATS_TMA)
            delta = _row_stats(delta_bufs, Delta, slot, head_row, cols, seqlen_q, 0.0, gl.SliceLayout(0, st_layout),
                               STATS_TMA)
            st = _capped(warpgroup_mma_wait(num_outstanding=1, deps=(st, )), softcap_in, HAS_SOFTCAP)
            pt = gl.exp2(st * qk_scale_log2 - lse2[None, :])
            # dS's weight (P itself without softcap: the masks below are then one select, the
            # same expression twice) at once, so the capped scores die before the masks'
            # branches: held across them, beside dP in flight, dK and dV, they spilled.
            pg = _capped_grad(pt, st, HAS_SOFTCAP)
            # A query block whose first row does not see the CTA's last key holds masked
            # entries (rows that see no key at all, lse2 = -inf, among them).
            if CAUSAL:
                if m0 + diag < cta_last_key:
                    pt = gl.where(keys[:, None] <= cols[None, :] + diag, pt, 0.0)
                    pg = gl.where(keys[:, None] <= cols[None, :] + diag, pg, 0.0)
            if ATOMIC_DQ:
                # Keys past seqlen_k (K and V zero-filled) get P = exp2(-lse2), which overflows
                # (in float32, or as fp16 dS) for a row whose scores are all far below 0; their
                # dS then meets K's zero rows in the dQ MMA: inf x 0 = NaN in that row's dQ.
                # (Without ATOMIC_DQ those keys' rows of dK and dV are clipped, and stay apart.)
                if n0 + ROWS > seqlen_k:
                    pt = gl.where(keys[:, None] < seqlen_k, pt, 0.0)
                    pg = gl.where(keys[:, None] < seqlen_k, pg, 0.0)
            if HAS_DROPOUT:
                # The PTX mask as a factor, 1 / (1 - p) or 0, spent on dV's and dS's operands at
                # once after waiting for dP too: held across that wait beside P it spilled.
                key_q, key_k = _dropout_keys_at(DropKeys, b * stride_keys_b + 2 * h, HAS_DROPOUT)
                factor = _dropout_factor(_pair_words(query_base, m0, key_q, 0x9E3779B1),
                                         _pair_words(key_base, n0, key_k, 0x85EBCA6B), dropout_threshold,
                                         dropout_scale, True)
                dpt = warpgroup_mma_wait(num_outstanding=0, deps=(dpt, ))
                pt_op = gl.convert_layout((pt * factor).to(dtype), op_layout)
                dst = pg * (dpt * factor - delta[None, :])
                dv_tok = warpgroup_mma(pt_op, do_tile, dv, is_async=True)
            else:
                pt_op = gl.convert_layout(pt.to(dtype), op_layout)
                dv_tok = warpgroup_mma(pt_op, do_tile, dv, is_async=True)
                dpt = warpgroup_mma_wait(num_outstanding=1, deps=(dpt, ))
                dst = pg * (dpt - delta[None, :])
            ds16 = dst.to(dtype)
            ds_op = gl.convert_layout(ds16, op_layout)
            dk_tok = warpgroup_mma(ds_op, q_tile, dk, is_async=True)
            dv, dk, pt_op, ds_op = warpgroup_mma_wait(num_outstanding=0, deps=(dv_tok, dk_tok, pt_op, ds_op))
            if ATOMIC_DQ:
                # The query block's dQ over both consumers' keys, dS K = dS_0 K_0 + dS_1 K_1: each
                # consumer stages its dS^T, waits for the other's, and adds its own column half
                # PART of d (the whole tile beside dK and dV spilled). One float32
                # atomic per dQ element per 128 keys: each consumer adding its own keys' share
                # (both halves) took twice as many and ran at 0.62-0.75x the deterministic pair
                # (run 38). ds_bars[0]: both tiles staged; [1]: both read (before restaging).
                mbarrier.wait(ds_bars.index(1), (i - 1) & 1, pred=i > 0)
                ds_buf.store(ds16)
                fence_async_shared()
                mbarrier.arrive(ds_bars.index(0))
                mbarrier.wait(ds_bars.index(0), i & 1)
                if ATOMIC_DQ == 2:
                    tma.store_wait(pendings=0)  # the previous step's TMA adds have read their staging tiles
                    # The half by one 64-column MMA chain over both consumers' keys (32
                    # registers of dQ), split in registers into the two quarters that the
                    # 128-byte swizzle's boxes hold, staged and added by the TMA unit,
                    # asynchronously: no reduction instructions in the consumer, and rows
                    # past seqlen_q clipped by the descriptor (their dQ is zero: P = 0 there).
                    # Run 51: 1.02-1.16x the reductions' kernel; two 32-column chains in
                    # flight at once instead ran 0.94-1.03x this one.
                    dq = warpgroup_mma(ds_buf.permute((1, 0)), k_tile.slice(PART * HALF_D, HALF_D, dim=1),
                                       dq_half_zero, use_acc=False, is_async=True)
                    dq = warpgroup_mma(ds_other.permute((1, 0)),
                                       k_other.reshape([ROWS, HEADDIM]).slice(PART * HALF_D, HALF_D, dim=1), dq,
                                       is_async=True)
                    dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq, ))
                    dq0, dq1 = gl.split(dq.reshape([BLOCK_M, 2, DQ_COLS]).permute((0, 2, 1)))
                    dq_stage.index(2 * PART).reshape([BLOCK_M, DQ_COLS]).store(dq0 * softmax_scale)
                    dq_stage.index(2 * PART + 1).reshape([BLOCK_M, DQ_COLS]).store(dq1 * softmax_scale)
                    fence_async_shared()
                    for quarter in gl.static_range(2):
                        _tma_reduce_add(DQAcc, [b, m0, h, PART * HALF_D + quarter * DQ_COLS],
                                        dq_stage.index(2 * PART + quarter))
                else:
                    # 32-bit offsets from the (sequence, head) base: the launcher keeps them in range.
                    dq_base = DQAcc + b.to(gl.int64) * stride_dqb + h.to(gl.int64) * stride_dqh
                    # The half in two quarters of d: 16 registers of dQ at a time beside dK and dV.
                    for quarter in gl.static_range(2):
                        dq = warpgroup_mma(ds_buf.permute((1, 0)),
                                           k_tile.slice(PART * HALF_D + quarter * DQ_COLS, DQ_COLS, dim=1), dq_zero,
                                           use_acc=False)
                        dq = warpgroup_mma(ds_other.permute((1, 0)), k_other.reshape([ROWS, HEADDIM]).slice(
                            PART * HALF_D + quarter * DQ_COLS, DQ_COLS, dim=1), dq)
                        _add_dq_tile(dq_base, m0, PART * HALF_D + quarter * DQ_COLS, dq * softmax_scale,
                                     stride_dqs, HEADDIM)
                mbarrier.arrive(ds_bars.index(1))
            mbarrier.arrive(free_bars.index(slot))
        if ATOMIC_DQ:
            # dK is staged through this consumer's K tile, which the other consumer's dQ MMAs
            # read as ``k_other``: wait until both have read the last step's tiles. Without
            # this wait a consumer that finished first overwrote K under the other's last dQ
            # (run 42: one 64-key share of dQ wrong, now and then).
            mbarrier.wait(ds_bars.index(1), (n_steps - 1) & 1, pred=n_steps > 0)
        if ATOMIC_DQ == 2:
            tma.store_wait(pendings=0)  # the last step's dQ adds, before the staging tiles go
        # Keys past seqlen_k are clipped by the descriptors. Under IS_VARLEN a consumer with
        # none stores nothing: its sequence's descriptor has at least one row, which for an
        # empty sequence is the next one's. The consumer makes its sequence's descriptors
        # itself, so that the warps whose TMA stores read them are the ones that fenced them.
        if IS_VARLEN:
            dk_desc = _packed_descriptor(DKPtr, k_row, seqlen_k, nheads_k, headdim, dk_desc)
            dv_desc = _packed_descriptor(DVPtr, k_row, seqlen_k, nheads_k, headdim, dv_desc)
            if n0 < seqlen_k:
                _store_rows(k_part, dk * softmax_scale, dk_desc, b_out, n0, hk)
                _store_rows(v_part, dv, dv_desc, b_out, n0, hk)
        else:
            _store_rows(k_part, dk * softmax_scale, dk_desc, b_out, n0, hk)
            _store_rows(v_part, dv, dv_desc, b_out, n0, hk)

    @gluon.jit
    def _dkdv_half_rows(
        k_part, v_part, fixed_bar, q_bufs, do_bufs, q_bars, do_bars, free_bars, pt_buf, p32_buf, dst_buf,
        turn_bars, dk_desc, dv_desc, lse_bufs, delta_bufs, Lse2, Delta, stats_row0, stride_lh, b, hk, n0,
        cta_last_key, h_first, m_start, m_blocks, n_steps, seqlen_q, seqlen_k, qk_scale_log2, softmax_scale, b_out,
        DKPtr, DVPtr, k_row, nheads_k, headdim,
        HEADDIM: gl.constexpr, ROWS: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
        CAUSAL: gl.constexpr, WARPS: gl.constexpr, ROLE: gl.constexpr, IS_VARLEN: gl.constexpr,
        STATS_TMA: gl.constexpr,
    ):
        """dK and dV of keys [n0, n0 + ROWS) for head dims past 128, where one warpgroup
        cannot hold both accumulators over the whole head dim (2 x 64 x 256 float32 is 256
        registers a thread): the two consumers share each step's scores instead of splitting
        the keys. ROLE 0 computes S^T = K Q^T and P^T = exp2(S^T - lse2), ROLE 1 dP^T = V dO^T
        and dS^T = P^T (dP^T - delta) from ROLE 0's P^T (float32, through ``p32_buf``); both
        tiles go through shared memory (``pt_buf``, ``dst_buf``, the inputs' dtype), and
        each consumer accumulates its column half ROLE of d: dV[:, half] += P^T dO[:, half],
        dK[:, half] += dS^T Q[:, half]. ``turn_bars``: [0] P^T staged, [1] dS^T staged, [2]
        both consumers' MMAs have read the step's tiles (before restaging), [3] both halves
        of dK and dV staged in K's and V's shared memory for the stores. The step order, the
        masks and lse2/delta are ``_dkdv_rows``'s (no dropout, softcap or atomic dQ here)."""
        dtype: gl.constexpr = dk_desc.dtype
        HALF: gl.constexpr = HEADDIM // 2
        st_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, BLOCK_M, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, HALF, 16])
        k_tile = k_part.reshape([ROWS, HEADDIM])
        v_tile = v_part.reshape([ROWS, HEADDIM])
        keys = n0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, st_layout))
        diag = seqlen_k - seqlen_q
        dk = gl.zeros([ROWS, HALF], gl.float32, layout=acc_layout)
        dv = gl.zeros([ROWS, HALF], gl.float32, layout=acc_layout)
        st_zero = gl.zeros([ROWS, BLOCK_M], gl.float32, layout=st_layout)
        mbarrier.wait(fixed_bar, 0)
        for i in range(n_steps):
            slot, phase, h, m0 = _dkdv_step(i, h_first, m_start, m_blocks, BLOCK_M, STAGES)
            cols = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, st_layout))
            head_row = stats_row0.to(gl.int64) + h.to(gl.int64) * stride_lh
            mbarrier.wait(q_bars.index(slot), phase)
            mbarrier.wait(do_bars.index(slot), phase)
            q_tile = q_bufs.index(slot).reshape([BLOCK_M, HEADDIM])
            do_tile = do_bufs.index(slot).reshape([BLOCK_M, HEADDIM])
            if ROLE == 0:
                st = warpgroup_mma(k_tile, q_tile.permute((1, 0)), st_zero, use_acc=False, is_async=True)
                # Rows past seqlen_q: lse2 = +inf gives P = 0 there (their Q and dO are zero-filled).
                lse2 = _row_stats(lse_bufs, Lse2, slot, head_row, cols, seqlen_q, float("inf"),
                                  gl.SliceLayout(0, st_layout), STATS_TMA)
                st = warpgroup_mma_wait(num_outstanding=0, deps=(st, ))
                pt = gl.exp2(st * qk_scale_log2 - lse2[None, :])
                if CAUSAL:
                    if m0 + diag < cta_last_key:
                        pt = gl.where(keys[:, None] <= cols[None, :] + diag, pt, 0.0)
                # The previous step's tiles have been read by both consumers' MMAs.
                mbarrier.wait(turn_bars.index(2), (i - 1) & 1, pred=i > 0)
                pt_buf.store(pt.to(dtype))
                p32_buf.store(pt)
                fence_async_shared()
                mbarrier.arrive(turn_bars.index(0))
            else:
                dpt = warpgroup_mma(v_tile, do_tile.permute((1, 0)), st_zero, use_acc=False, is_async=True)
                delta = _row_stats(delta_bufs, Delta, slot, head_row, cols, seqlen_q, 0.0,
                                   gl.SliceLayout(0, st_layout), STATS_TMA)
                dpt = warpgroup_mma_wait(num_outstanding=0, deps=(dpt, ))
                mbarrier.wait(turn_bars.index(0), i & 1)
                pt = p32_buf.load(st_layout)
                dst_buf.store((pt * (dpt - delta[None, :])).to(dtype))
                fence_async_shared()
                mbarrier.arrive(turn_bars.index(1))
            dv_tok = warpgroup_mma(pt_buf, do_tile.slice(ROLE * HALF, HALF, dim=1), dv, is_async=True)
            mbarrier.wait(turn_bars.index(1), i & 1)
            dk_tok = warpgroup_mma(dst_buf, q_tile.slice(ROLE * HALF, HALF, dim=1), dk, is_async=True)
            dv, dk = warpgroup_mma_wait(num_outstanding=0, deps=(dv_tok, dk_tok))
            mbarrier.arrive(turn_bars.index(2))
            mbarrier.arrive(free_bars.index(slot))
        # K and V stage the results once both consumers' last MMAs (which read them) are done.
        mbarrier.wait(turn_bars.index(2), (n_steps - 1) & 1, pred=n_steps > 0)
        k_tile.slice(ROLE * HALF, HALF, dim=1).store((dk * softmax_scale).to(dtype))
        v_tile.slice(ROLE * HALF, HALF, dim=1).store(dv.to(dtype))
        fence_async_shared()
        mbarrier.arrive(turn_bars.index(3))
        mbarrier.wait(turn_bars.index(3), 0)
        # Keys past seqlen_k are clipped by the descriptors; a program with none (varlen)
        # stores nothing (as in ``_dkdv_rows``, which also says why each consumer makes its
        # varlen descriptor). One consumer stores dK, the other dV.
        if IS_VARLEN:
            if ROLE == 0:
                dk_desc = _packed_descriptor(DKPtr, k_row, seqlen_k, nheads_k, headdim, dk_desc)
            else:
                dv_desc = _packed_descriptor(DVPtr, k_row, seqlen_k, nheads_k, headdim, dv_desc)
        if n0 < seqlen_k:
            if ROLE == 0:
                _tma_store(dk_desc, [b_out, n0, hk, 0], k_part)
            else:
                _tma_store(dv_desc, [b_out, n0, hk, 0], v_part)
            tma.store_wait(pendings=0)

    @gluon.jit
    def _load_dkdv(k_desc, v_desc, q_desc, do_desc, lse_desc, delta_desc, k_parts, v_parts, fixed_bar, q_bufs,
                   do_bufs, lse_bufs, delta_bufs, q_bars, do_bars, free_bars, b, hk, n0, h_first, m_start, m_blocks,
                   n_steps, stats_row0, stride_lh, QPtr, DOPtr, KPtr, VPtr, q_row, seqlen_q, k_row, seqlen_k,
                   nheads_k, kv_group, headdim, ROWS: gl.constexpr, BLOCK_M: gl.constexpr, PARTS: gl.constexpr,
                   STAGES: gl.constexpr, IS_VARLEN: gl.constexpr, STATS_TMA: gl.constexpr):
        """The dK/dV loader: each consumer's K and V rows once, then Q and dO of every step,
        with STATS_TMA also their lse2 and delta (query head h's start at flat index
        ``stats_row0`` + h ``stride_lh``). IS_VARLEN: Q, K, V and dO through descriptors over
        the sequence's rows that it makes itself."""
        if IS_VARLEN:
            q_desc, do_desc, k_desc, v_desc = _sequence_descriptors(
                QPtr, DOPtr, KPtr, VPtr, q_row, seqlen_q, k_row, seqlen_k, nheads_k, kv_group, headdim,
                q_desc, do_desc, k_desc, v_desc)
        mbarrier.expect(fixed_bar, PARTS * (k_desc.block_type.nbytes + v_desc.block_type.nbytes))
        for p in gl.static_range(PARTS):
            _tma_load(k_desc, [b, n0 + p * ROWS, hk, 0], fixed_bar, k_parts.index(p))
            _tma_load(v_desc, [b, n0 + p * ROWS, hk, 0], fixed_bar, v_parts.index(p))
        for i in range(n_steps):
            slot = i % STAGES
            mbarrier.wait(free_bars.index(slot), ((i // STAGES) + 1) & 1, pred=i >= STAGES)
            head = h_first + i // m_blocks
            row0 = (m_start + i % m_blocks) * BLOCK_M
            if STATS_TMA:
                head_stats = stats_row0 + head * stride_lh
                _load_rows_with_stats(q_desc, lse_desc, q_bufs, lse_bufs, q_bars, slot, b, row0, head, head_stats)
                _load_rows_with_stats(do_desc, delta_desc, do_bufs, delta_bufs, do_bars, slot, b, row0, head,
                                      head_stats)
            else:
                _load_pair(q_desc, do_desc, q_bufs, do_bufs, q_bars, do_bars, slot, b, row0, head, True)

    @gluon.jit
    def _bwd_dkdv_sm90_kernel(
        q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, Lse2, Delta, lse_desc, delta_desc, DropKeys, DQAcc,
        QStarts, QEnds, CuSeqlensK, QPtr, KPtr, VPtr, DOPtr, DKPtr, DVPtr, nheads_k,
        seqlen_q, seqlen_k, kv_group, stride_lb, stride_lh, stride_keys_b, stride_dqb, stride_dqs, stride_dqh, headdim,
        qk_scale_log2, softmax_scale, softcap_in, dropout_threshold, dropout_scale, head_splits,
        HEADDIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
        CAUSAL: gl.constexpr, HAS_DROPOUT: gl.constexpr, ATOMIC_DQ: gl.constexpr, IS_VARLEN: gl.constexpr,
        HEADS_FIRST: gl.constexpr, HAS_SOFTCAP: gl.constexpr, SPLIT_D: gl.constexpr, STATS_TMA: gl.constexpr,
        OVERLAP_DQ: gl.constexpr, num_warps: gl.constexpr,
    ):
        """Grid (key blocks of BLOCK_N, KV heads x ``head_splits``, batch), or with HEADS_FIRST
        (KV heads x ``head_splits``, batch, key blocks); ``num_warps`` = 4.
        Two consumer warpgroups own BLOCK_N / 2 keys each (with SPLIT_D, for head dims past
        128, all BLOCK_N keys together and a column half of d each: ``_dkdv_half_rows``; no
        dropout, softcap or atomic dQ); one loader warp streams the query
        blocks of every query head of the group, or with ``head_splits`` > 1 of this
        program's slice of them. Writes dK, dV (the inputs' dtype); with ``head_splits`` > 1
        (dense only) each slice's partial sums instead, through descriptors over
        (head_splits x batch, seqlen_k, nheads_k, d) at batch index slice x batch + b.

        IS_VARLEN: sequence b of a plain varlen batch (``_varlen_sequence``; contiguous
        packed tensors at ``QPtr`` .. ``DVPtr``, lse2/delta (nheads, total_q)); ``seqlen_q``
        and ``seqlen_k`` (the longest, which size the grid) become the sequence's.
        lse2 and delta at ``Lse2``/``Delta`` (strides ``stride_lb``, ``stride_lh``), and with
        STATS_TMA read through ``lse_desc``/``delta_desc``, flat (1-D) descriptors over them
        with boxes of BLOCK_M (``_row_stats_template``; a box must start 16-byte aligned).
        OVERLAP_DQ: the dQ kernel that follows is a programmatic dependent launch, free to
        start once every program here has (``configs.sm90_backward_overlap``)."""
        if OVERLAP_DQ:
            _let_dependent_launch_start()
        n_block, head_slot, b, batch = _program_ids(HEADS_FIRST)  # head slots: KV heads x splits
        hk = head_slot // head_splits
        heads = kv_group // head_splits  # this program's query heads, from h_first on
        h_first = hk * kv_group + (head_slot % head_splits) * heads
        n0 = n_block * BLOCK_N
        q_base = b * 0
        k_base = b * 0
        # Where sequence b's lse2/delta rows start in the flat statistics (32-bit: lse2 has
        # d times fewer elements than Q, so fewer than 2**31 on any GPU's memory).
        stats_row0 = b * stride_lb
        if IS_VARLEN:
            # The sequence's descriptors are made by the partitions that use them (the
            # loader's four, each consumer's dK/dV): ``_sequence_descriptor``.
            q_base, seqlen_q, k_base, seqlen_k = _varlen_sequence(QStarts, QEnds, CuSeqlensK, b)
            # This sequence's rows of lse2/delta and its dropout words; every descriptor's
            # batch index is then 0.
            stats_row0 = q_base
            DropKeys = DropKeys + b * stride_keys_b
            b = b * 0
        # Where dK and dV go: a slice's partial sums at batch index slice x batch + b.
        b_out = (head_slot % head_splits) * batch + b
        PARTS: gl.constexpr = 1 if SPLIT_D else 2
        ROWS: gl.constexpr = BLOCK_N // PARTS
        k_parts, v_parts, q_bufs, do_bufs, fixed_bar, q_bars, do_bars, free_bars = _fixed_and_ring(
            k_desc, v_desc, q_desc, do_desc, PARTS, ROWS, BLOCK_M, HEADDIM, STAGES)
        lse_bufs = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], lse_desc.layout)
        delta_bufs = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], delta_desc.layout)
        # Query blocks that see any of these keys: key n is seen from query n - diag on.
        diag = seqlen_k - seqlen_q
        m_blocks_total = gl.cdiv(seqlen_q, BLOCK_M)
        if CAUSAL:
            m_start = gl.minimum(gl.maximum(n0 - diag, 0) // BLOCK_M, m_blocks_total)
        else:
            m_start = 0
        m_blocks = m_blocks_total - m_start
        if IS_VARLEN:
            if n0 >= seqlen_k:  # a program past its sequence's keys: no step
                m_blocks = 0
        n_steps = heads * m_blocks
        cta_last_key = gl.minimum(n0 + BLOCK_N, seqlen_k) - 1
        if SPLIT_D:
            _bwd_dkdv_split_d(k_parts, v_parts, q_bufs, do_bufs, fixed_bar, q_bars, do_bars, free_bars, k_desc, v_desc,
                              q_desc, do_desc, dk_desc, dv_desc, lse_desc, delta_desc, lse_bufs, delta_bufs, Lse2,
                              Delta, b, hk, n0, cta_last_key, h_first, m_start, m_blocks, n_steps, seqlen_q, seqlen_k,
                              stats_row0, stride_lh, qk_scale_log2, softmax_scale, b_out, QPtr, DOPtr, KPtr, VPtr,
                              DKPtr, DVPtr, q_base, k_base, nheads_k, kv_group, headdim, HEADDIM, ROWS, BLOCK_M,
                              STAGES, CAUSAL, IS_VARLEN, STATS_TMA)
        else:
            _bwd_dkdv_key_halves(k_parts, v_parts, q_bufs, do_bufs, fixed_bar, q_bars, do_bars, free_bars, k_desc,
                                 v_desc, q_desc, do_desc, dk_desc, dv_desc, lse_desc, delta_desc, lse_bufs,
                                 delta_bufs, Lse2, Delta, DropKeys, stride_keys_b, dropout_threshold, dropout_scale,
                                 DQAcc, stride_dqb, stride_dqs, stride_dqh, b, hk, n0, cta_last_key, h_first, m_start,
                                 m_blocks, n_steps, seqlen_q, seqlen_k, stats_row0, stride_lh, qk_scale_log2,
                                 softmax_scale, softcap_in, b_out, QPtr, DOPtr, KPtr, VPtr, DKPtr, DVPtr, q_base,
                                 k_base, nheads_k, kv_group, headdim, HEADDIM, ROWS, BLOCK_M, STAGES, CAUSAL,
                                 HAS_DROPOUT, ATOMIC_DQ, IS_VARLEN, HAS_SOFTCAP, STATS_TMA)
        _invalidate_ring(fixed_bar, q_bars, do_bars, free_bars, STAGES)

    @gluon.jit
    def _bwd_dkdv_split_d(k_parts, v_parts, q_bufs, do_bufs, fixed_bar, q_bars, do_bars, free_bars, k_desc, v_desc,
                          q_desc, do_desc, dk_desc, dv_desc, lse_desc, delta_desc, lse_bufs, delta_bufs, Lse2, Delta,
                          b, hk, n0, cta_last_key, h_first, m_start, m_blocks, n_steps, seqlen_q, seqlen_k,
                          stats_row0, stride_lh, qk_scale_log2, softmax_scale, b_out, QPtr, DOPtr, KPtr, VPtr, DKPtr,
                          DVPtr, q_row, k_row, nheads_k, kv_group, headdim, HEADDIM: gl.constexpr, ROWS: gl.constexpr,
                          BLOCK_M: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, IS_VARLEN: gl.constexpr,
                          STATS_TMA: gl.constexpr):
        """The SPLIT_D program of ``_bwd_dkdv_sm90_kernel``: the score tiles' shared memory
        and barriers, then the two ``_dkdv_half_rows`` consumers and the loader."""
        dtype: gl.constexpr = q_desc.dtype
        pt_buf = gl.allocate_shared_memory(dtype, [ROWS, BLOCK_M],
                                           gl.NVMMASharedLayout.get_default_for([ROWS, BLOCK_M], dtype))
        dst_buf = gl.allocate_shared_memory(dtype, [ROWS, BLOCK_M],
                                            gl.NVMMASharedLayout.get_default_for([ROWS, BLOCK_M], dtype))
        # Float32 P^T for the other consumer's dS^T (the 16-bit tile would round it): pairs
        # of columns, as the accumulator's threads hold them, swizzled across the rows.
        p32_buf = gl.allocate_shared_memory(gl.float32, [ROWS, BLOCK_M], gl.SwizzledSharedLayout(2, 1, 8, [1, 0]))
        turn_bars = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())
        mbarrier.init(turn_bars.index(0), count=1)
        mbarrier.init(turn_bars.index(1), count=1)
        mbarrier.init(turn_bars.index(2), count=2)
        mbarrier.init(turn_bars.index(3), count=2)
        gl.warp_specialize([
            (_dkdv_half_rows, (k_parts.index(0), v_parts.index(0), fixed_bar, q_bufs, do_bufs, q_bars, do_bars,
                               free_bars, pt_buf, p32_buf, dst_buf, turn_bars, dk_desc, dv_desc, lse_bufs, delta_bufs,
                               Lse2, Delta, stats_row0, stride_lh, b, hk, n0, cta_last_key, h_first, m_start,
                               m_blocks, n_steps, seqlen_q, seqlen_k, qk_scale_log2, softmax_scale, b_out, DKPtr,
                               DVPtr, k_row, nheads_k, headdim, HEADDIM, ROWS, BLOCK_M, STAGES, CAUSAL, 4, 0,
                               IS_VARLEN, STATS_TMA)),
            (_dkdv_half_rows, (k_parts.index(0), v_parts.index(0), fixed_bar, q_bufs, do_bufs, q_bars, do_bars,
                               free_bars, pt_buf, p32_buf, dst_buf, turn_bars, dk_desc, dv_desc, lse_bufs, delta_bufs,
                               Lse2, Delta, stats_row0, stride_lh, b, hk, n0, cta_last_key, h_first, m_start,
                               m_blocks, n_steps, seqlen_q, seqlen_k, qk_scale_log2, softmax_scale, b_out, DKPtr,
                               DVPtr, k_row, nheads_k, headdim, HEADDIM, ROWS, BLOCK_M, STAGES, CAUSAL, 4, 1,
                               IS_VARLEN, STATS_TMA)),
            (_load_dkdv, (k_desc, v_desc, q_desc, do_desc, lse_desc, delta_desc, k_parts, v_parts, fixed_bar,
                          q_bufs, do_bufs, lse_bufs, delta_bufs, q_bars, do_bars, free_bars, b, hk, n0, h_first,
                          m_start, m_blocks, n_steps, stats_row0, stride_lh, QPtr, DOPtr, KPtr, VPtr, q_row,
                          seqlen_q, k_row, seqlen_k, nheads_k, kv_group, headdim, ROWS, BLOCK_M, 1, STAGES,
                          IS_VARLEN, STATS_TMA)),
        ], [4, 1], [240, 24])
        for i in gl.static_range(4):
            mbarrier.invalidate(turn_bars.index(i))

    @gluon.jit
    def _bwd_dkdv_key_halves(k_parts, v_parts, q_bufs, do_bufs, fixed_bar, q_bars, do_bars, free_bars, k_desc,
                             v_desc, q_desc, do_desc, dk_desc, dv_desc, lse_desc, delta_desc, lse_bufs, delta_bufs,
                             Lse2, Delta, DropKeys, stride_keys_b, dropout_threshold, dropout_scale, DQAcc,
                             stride_dqb, stride_dqs, stride_dqh, b, hk, n0, cta_last_key, h_first, m_start, m_blocks,
                             n_steps, seqlen_q, seqlen_k, stats_row0, stride_lh, qk_scale_log2, softmax_scale,
                             softcap_in, b_out, QPtr, DOPtr, KPtr, VPtr, DKPtr, DVPtr, q_row, k_row, nheads_k,
                             kv_group, headdim, HEADDIM: gl.constexpr, ROWS: gl.constexpr, BLOCK_M: gl.constexpr,
                             STAGES: gl.constexpr, CAUSAL: gl.constexpr, HAS_DROPOUT: gl.constexpr,
                             ATOMIC_DQ: gl.constexpr, IS_VARLEN: gl.constexpr, HAS_SOFTCAP: gl.constexpr,
                             STATS_TMA: gl.constexpr):
        """The default program of ``_bwd_dkdv_sm90_kernel``: two ``_dkdv_rows`` consumers of
        ROWS keys each (and the atomic dQ's staging tiles), and the loader."""
        PARTS: gl.constexpr = 2
        # Each consumer's dS^T tile for the atomic dQ (a (1, 16)-element stub without it).
        DS_ROWS: gl.constexpr = ROWS if ATOMIC_DQ else 16
        DS_COLS: gl.constexpr = BLOCK_M if ATOMIC_DQ else 16
        ds_bufs = gl.allocate_shared_memory(q_desc.dtype, [PARTS, DS_ROWS, DS_COLS],
                                            gl.NVMMASharedLayout.get_default_for([DS_ROWS, DS_COLS], q_desc.dtype))
        ds_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(ds_bars.index(i), count=PARTS)  # both consumers arrive
        # ATOMIC_DQ == 2: each consumer's two float32 dQ quarters (consumer c's at 2 c and
        # 2 c + 1), staged for the TMA adds (``DQAcc`` is then a descriptor over the (batch,
        # rows, nheads, HEADDIM) accumulator).
        if ATOMIC_DQ == 2:
            dq_stages = gl.allocate_shared_memory(gl.float32, [2 * PARTS, 1, BLOCK_M, 1, HEADDIM // 4], DQAcc.layout)
        else:
            dq_stages = ds_bufs  # unused
        gl.warp_specialize([
            (_dkdv_rows, (k_parts.index(0), v_parts.index(0), fixed_bar, q_bufs, do_bufs, q_bars, do_bars, free_bars,
                          dk_desc, dv_desc, lse_bufs, delta_bufs, Lse2, Delta, stats_row0, stride_lh, DropKeys,
                          stride_keys_b, dropout_threshold, dropout_scale,
                          ds_bufs.index(0), ds_bufs.index(1), k_parts.index(1), ds_bars, DQAcc, dq_stages,
                          stride_dqb, stride_dqs, stride_dqh,
                          b, hk, n0, cta_last_key, h_first, m_start, m_blocks, n_steps, seqlen_q, seqlen_k,
                          qk_scale_log2, softmax_scale, softcap_in, b_out,
                          DKPtr, DVPtr, k_row, nheads_k, headdim,
                          HEADDIM, ROWS, BLOCK_M, STAGES, CAUSAL, 4, HAS_DROPOUT, ATOMIC_DQ, IS_VARLEN, 0,
                          HAS_SOFTCAP, STATS_TMA)),
            (_dkdv_rows, (k_parts.index(1), v_parts.index(1), fixed_bar, q_bufs, do_bufs, q_bars, do_bars, free_bars,
                          dk_desc, dv_desc, lse_bufs, delta_bufs, Lse2, Delta, stats_row0, stride_lh, DropKeys,
                          stride_keys_b, dropout_threshold, dropout_scale,
                          ds_bufs.index(1), ds_bufs.index(0), k_parts.index(0), ds_bars, DQAcc, dq_stages,
                          stride_dqb, stride_dqs, stride_dqh,
                          b, hk, n0 + ROWS, cta_last_key, h_first, m_start, m_blocks, n_steps, seqlen_q,
                          seqlen_k, qk_scale_log2, softmax_scale, softcap_in, b_out,
                          DKPtr, DVPtr, k_row, nheads_k, headdim,
                          HEADDIM, ROWS, BLOCK_M, STAGES, CAUSAL, 4, HAS_DROPOUT, ATOMIC_DQ, IS_VARLEN, 1,
                          HAS_SOFTCAP, STATS_TMA)),
            (_load_dkdv, (k_desc, v_desc, q_desc, do_desc, lse_desc, delta_desc, k_parts, v_parts, fixed_bar,
                          q_bufs, do_bufs, lse_bufs, delta_bufs, q_bars, do_bars, free_bars, b, hk, n0, h_first,
                          m_start, m_blocks, n_steps, stats_row0, stride_lh, QPtr, DOPtr, KPtr, VPtr, q_row,
                          seqlen_q, k_row, seqlen_k, nheads_k, kv_group, headdim, ROWS, BLOCK_M, PARTS, STAGES,
                          IS_VARLEN, STATS_TMA)),
        ], [4, 1], [240, 24])
        for i in gl.static_range(2):
            mbarrier.invalidate(ds_bars.index(i))

    @gluon.jit
    def _dq_rows(
        q_part, do_part, fixed_bar, k_bufs, v_bufs, k_bars, v_bars, free_bars, dq_desc,
        Lse2, Delta, DropKeys, key_index, dropout_threshold, dropout_scale,
        b, h, r0, n_blocks, seqlen_q, seqlen_k, stride_lb, stride_lh, qk_scale_log2, softmax_scale, softcap_in,
        DQPtr, q_row, nheads, headdim,
        HEADDIM: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
        CAUSAL: gl.constexpr, WARPS: gl.constexpr, HAS_DROPOUT: gl.constexpr, IS_VARLEN: gl.constexpr,
        HAS_SOFTCAP: gl.constexpr,
    ):
        """dQ of query rows [r0, r0 + ROWS) of head ``h`` over key blocks [0, n_blocks):
        S = Q K^T, P = exp2(S - lse2), dP = dO V^T, dS = P (dP - delta), dQ += dS K (scaled
        at the end). Releases each K/V slot on ``free_bars``. With HAS_DROPOUT, dP counts
        only where kept, scaled by 1 / (1 - p). IS_VARLEN: dQ goes through a descriptor over
        the sequence's rows (from ``q_row`` of ``DQPtr``) that this consumer makes itself
        (``_sequence_descriptor``)."""
        dtype: gl.constexpr = dq_desc.dtype
        if IS_VARLEN:
            dq_desc = _packed_descriptor(DQPtr, q_row, seqlen_q, nheads, headdim, dq_desc)
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, BLOCK_N, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, HEADDIM, 16])
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        q_tile = q_part.reshape([ROWS, HEADDIM])
        do_tile = do_part.reshape([ROWS, HEADDIM])
        rows = r0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
        row_ptr = b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh + rows
        lse2 = gl.load(Lse2 + row_ptr, mask=rows < seqlen_q, other=float("inf"))
        delta = gl.load(Delta + row_ptr, mask=rows < seqlen_q, other=0.0)
        diag = seqlen_k - seqlen_q
        # From key block n_full on, some entries of these rows are masked (keys past
        # seqlen_k, zero-filled, included; rows that see no key, lse2 = -inf, as well).
        if CAUSAL:
            n_full = gl.maximum(gl.minimum(seqlen_k, r0 + diag + 1), 0) // BLOCK_N
        else:
            n_full = seqlen_k // BLOCK_N
        dq = gl.zeros([ROWS, HEADDIM], gl.float32, layout=acc_layout)
        s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
        # Dropout's words: the rows' (fixed), and the loop-invariant part of the keys'.
        key_q, key_k = _dropout_keys_at(DropKeys, key_index, HAS_DROPOUT)
        query_words = _pair_words(_pair_word_base(rows - r0, 0x9E3779B1), r0, key_q, 0x9E3779B1)
        key_base = _pair_word_base(gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout)), 0x85EBCA6B)
        mbarrier.wait(fixed_bar, 0)
        for j in range(n_blocks):
            slot = j % STAGES
            phase = (j // STAGES) & 1
            mbarrier.wait(k_bars.index(slot), phase)
            k_tile = k_bufs.index(slot).reshape([BLOCK_N, HEADDIM])
            s = warpgroup_mma(q_tile, k_tile.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            mbarrier.wait(v_bars.index(slot), phase)
            v_tile = v_bufs.index(slot).reshape([BLOCK_N, HEADDIM])
            dp = warpgroup_mma(do_tile, v_tile.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s = _capped(warpgroup_mma_wait(num_outstanding=1, deps=(s, )), softcap_in, HAS_SOFTCAP)
            # dS's weight at once: the capped scores die before the masks' branch.
            p = _capped_grad(gl.exp2(s * qk_scale_log2 - lse2[:, None]), s, HAS_SOFTCAP)
            if j >= n_full:
                cols = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
                keep = cols[None, :] < seqlen_k
                if CAUSAL:
                    keep = keep & (cols[None, :] <= rows[:, None] + diag)
                p = gl.where(keep, p, 0.0)
            dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp, ))
            if HAS_DROPOUT:
                key_words = _pair_words(key_base, j * BLOCK_N, key_k, 0x85EBCA6B)
                dp = dp * _dropout_factor(query_words, key_words, dropout_threshold, dropout_scale, False)
            ds_op = gl.convert_layout((p * (dp - delta[:, None])).to(dtype), op_layout)
            dq_tok = warpgroup_mma(ds_op, k_tile, dq, is_async=True)
            dq, ds_op = warpgroup_mma_wait(num_outstanding=0, deps=(dq_tok, ds_op))
            mbarrier.arrive(free_bars.index(slot))
        if IS_VARLEN:
            if r0 < seqlen_q:  # as in ``_dkdv_rows``
                _store_rows(q_part, dq * softmax_scale, dq_desc, b, r0, h)
        else:
            _store_rows(q_part, dq * softmax_scale, dq_desc, b, r0, h)

    @gluon.jit
    def _load_dq(q_desc, k_desc, v_desc, do_desc, q_parts, do_parts, fixed_bar, k_bufs, v_bufs, k_bars, v_bars,
                 free_bars, b, h, hk, m0, n_blocks, QPtr, DOPtr, KPtr, VPtr, q_row, seqlen_q, k_row, seqlen_k,
                 nheads_k, kv_group, headdim, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, PARTS: gl.constexpr,
                 STAGES: gl.constexpr, IS_VARLEN: gl.constexpr):
        """The dQ loader: each consumer's Q and dO rows once, then K and V of every key block.
        IS_VARLEN: through descriptors over the sequence's rows that it makes itself."""
        if IS_VARLEN:
            q_desc, do_desc, k_desc, v_desc = _sequence_descriptors(
                QPtr, DOPtr, KPtr, VPtr, q_row, seqlen_q, k_row, seqlen_k, nheads_k, kv_group, headdim,
                q_desc, do_desc, k_desc, v_desc)
        mbarrier.expect(fixed_bar, PARTS * (q_desc.block_type.nbytes + do_desc.block_type.nbytes))
        for p in gl.static_range(PARTS):
            _tma_load(q_desc, [b, m0 + p * ROWS, h, 0], fixed_bar, q_parts.index(p))
            _tma_load(do_desc, [b, m0 + p * ROWS, h, 0], fixed_bar, do_parts.index(p))
        for j in range(n_blocks):
            slot = j % STAGES
            mbarrier.wait(free_bars.index(slot), ((j // STAGES) + 1) & 1, pred=j >= STAGES)
            _load_pair(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, slot, b, j * BLOCK_N, hk, True)

    @gluon.jit
    def _bwd_dq_sm90_kernel(
        q_desc, k_desc, v_desc, do_desc, dq_desc, Lse2, Delta, DropKeys,
        QStarts, QEnds, CuSeqlensK, QPtr, KPtr, VPtr, DOPtr, DQPtr, nheads_k,
        seqlen_q, seqlen_k, kv_group, num_m_blocks, stride_lb, stride_lh, stride_keys_b, headdim, qk_scale_log2,
        softmax_scale, softcap_in, dropout_threshold, dropout_scale,
        HEADDIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
        CAUSAL: gl.constexpr, HAS_DROPOUT: gl.constexpr, IS_VARLEN: gl.constexpr, HEADS_FIRST: gl.constexpr,
        HAS_SOFTCAP: gl.constexpr, AFTER_DKDV: gl.constexpr, num_warps: gl.constexpr,
    ):
        """Grid (query blocks of BLOCK_M, heads, batch), the longest causal blocks first;
        ``num_warps`` = 4. Two consumer warpgroups own BLOCK_M / 2 query rows each; one loader
        warp streams the key blocks. Writes dQ (the inputs' dtype). IS_VARLEN as in
        ``_bwd_dkdv_sm90_kernel``. AFTER_DKDV: launched as a programmatic dependent launch of
        the dK/dV kernel (``configs.sm90_backward_overlap``); it reads nothing that kernel
        writes, and each program waits for that kernel before it exits, so that the stream's
        next work finds both kernels done."""
        pid, h, b, _ = _program_ids(HEADS_FIRST)
        m_block = num_m_blocks - 1 - pid if CAUSAL else pid
        m0 = m_block * BLOCK_M
        hk = h // kv_group
        key_index = b * stride_keys_b + 2 * h
        nheads = nheads_k * kv_group
        q_base = b * 0
        k_base = b * 0
        if IS_VARLEN:
            # The per-sequence descriptors are made by the partitions that use them (the
            # loader's, each consumer's dQ store): ``_sequence_descriptor``.
            q_base, seqlen_q, k_base, seqlen_k = _varlen_sequence(QStarts, QEnds, CuSeqlensK, b)
            Lse2 = Lse2 + q_base
            Delta = Delta + q_base
            b = b * 0
        PARTS: gl.constexpr = 2
        ROWS: gl.constexpr = BLOCK_M // PARTS
        q_parts, do_parts, k_bufs, v_bufs, fixed_bar, k_bars, v_bars, free_bars = _fixed_and_ring(
            q_desc, do_desc, k_desc, v_desc, PARTS, ROWS, BLOCK_N, HEADDIM, STAGES)

        if CAUSAL:
            n_end = gl.minimum(seqlen_k, m0 + BLOCK_M + seqlen_k - seqlen_q)
        else:
            n_end = seqlen_k
        n_blocks = gl.cdiv(gl.maximum(n_end, 0), BLOCK_N)
        if IS_VARLEN:
            if m0 >= seqlen_q:  # a program past its sequence's queries: no key block
                n_blocks = 0

        gl.warp_specialize([
            (_dq_rows, (q_parts.index(0), do_parts.index(0), fixed_bar, k_bufs, v_bufs, k_bars, v_bars, free_bars,
                        dq_desc, Lse2, Delta, DropKeys, key_index, dropout_threshold, dropout_scale,
                        b, h, m0, n_blocks, seqlen_q, seqlen_k, stride_lb, stride_lh,
                        qk_scale_log2, softmax_scale, softcap_in, DQPtr, q_base, nheads, headdim,
                        HEADDIM, ROWS, BLOCK_N, STAGES, CAUSAL, 4, HAS_DROPOUT, IS_VARLEN, HAS_SOFTCAP)),
            (_dq_rows, (q_parts.index(1), do_parts.index(1), fixed_bar, k_bufs, v_bufs, k_bars, v_bars, free_bars,
                        dq_desc, Lse2, Delta, DropKeys, key_index, dropout_threshold, dropout_scale,
                        b, h, m0 + ROWS, n_blocks, seqlen_q, seqlen_k, stride_lb, stride_lh,
                        qk_scale_log2, softmax_scale, softcap_in, DQPtr, q_base, nheads, headdim,
                        HEADDIM, ROWS, BLOCK_N, STAGES, CAUSAL, 4, HAS_DROPOUT, IS_VARLEN, HAS_SOFTCAP)),
            (_load_dq, (q_desc, k_desc, v_desc, do_desc, q_parts, do_parts, fixed_bar, k_bufs, v_bufs, k_bars, v_bars,
                        free_bars, b, h, hk, m0, n_blocks, QPtr, DOPtr, KPtr, VPtr, q_base, seqlen_q, k_base,
                        seqlen_k, nheads_k, kv_group, headdim, ROWS, BLOCK_N, PARTS, STAGES, IS_VARLEN)),
        ], [4, 1], [240, 24])

        _invalidate_ring(fixed_bar, k_bars, v_bars, free_bars, STAGES)
        if AFTER_DKDV:
            _wait_for_prior_launch()


#: Why the family turned itself off in this process (a kernel that failed to compile or
#: launch under the default backend), or None.
disabled_reason: Optional[str] = None


def run_or_disable(launch, *args, **kwargs):
    """``launch(*args)``; if it raises under the default backend, turn the family off for
    this process with a warning naming the error and return None, so the caller runs the
    portable kernels instead (a Gluon compiler or driver that these kernels do not suit
    must not stop training). Under ``RINGFLASH_BACKEND=sm90`` the error propagates."""
    global disabled_reason
    if configs.backend() == "sm90":
        return launch(*args, **kwargs)
    try:
        return launch(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - reported, then the portable kernels run
        disabled_reason = f"{type(exc).__name__}: {str(exc)[:500]}"
        warnings.warn(f"ringflash: the Gluon sm_90 kernels failed ({disabled_reason}); using the portable "
                      "Triton kernels for the rest of this process (RINGFLASH_BACKEND=sm90 raises instead)",
                      RuntimeWarning, stacklevel=3)
        return None


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prob: AttnProblem, meta, alibi_slopes,
             dropout) -> bool:
    """Whether this family computes the call (see the module docstring for the scope)."""
    if not AVAILABLE or disabled_reason is not None or q.device.type != "cuda" or \
            configs._capability(q.device) != (9, 0):
        return False
    if alibi_slopes is not None:
        return False
    # A dropout probability within 2**-9 of 1 rounds to the threshold 256, which the mask's
    # assembly cannot hold in a byte (the portable kernels drop everything).
    if dropout is not None and dropout_threshold(dropout[0]) >= 256:
        return False
    # Varlen: one group of sequences, bottom-right aligned, every key counted (not grouped
    # or context-parallel metadata, no seqused_k).
    if meta is not None and (meta.num_groups != 1 or meta.diag is not None or meta.seqused_k is not None):
        return False
    # And only under RINGFLASH_SM90_VARLEN=1 until run 47's fault is explained.
    if meta is not None and not configs.sm90_varlen_enabled():
        return False
    if meta is not None and _varlen_scratch_bytes(prob) > 1 << 28:
        return False
    # d = 40..128 in steps of 8 (16-byte rows for TMA); below 64 / 128 the tiles are padded
    # (``_block_d``): TMA zero-fills the missing columns and clips them on store. Also
    # d = 136..256 on 256-column tiles (the backward's dK/dV: ``SPLIT_D``), without dropout
    # or softcap.
    widest = 256 if dropout is None and prob.softcap == 0 else 128
    if q.dtype not in _GL_DTYPES or not (k.dtype == v.dtype == q.dtype) or \
            not (40 <= prob.headdim <= widest and prob.headdim % 8 == 0):
        return False
    if prob.has_left or not prob.softmax_scale > 0:
        return False
    if max(prob.batch, prob.nheads) > configs.MAX_GRID_YZ:  # grid axes 1 and 2
        return False
    if prob.has_right and not (prob.causal and prob.window_right == 0):
        return False
    # TMA: 16-byte aligned bases and strides, unit stride on d, no broadcast (stride 0) dims.
    return all(tma_readable(x) for x in (q, k, v))


def _varlen_scratch_bytes(prob: AttnProblem) -> int:
    """Global scratch that varlen programs' descriptors take (128 bytes each, for every
    program of the grid, which the longest sequence sizes), in the larger of the forward
    (2 per program) and the backward (up to 8 per dK/dV program: the loader's four and each
    consumer's dK and dV; 6 per dQ one: the loader's four and each consumer's dQ). Past 256 MB (a
    long sequence packed with thousands of short ones) ``supports`` leaves the call to the
    portable kernels."""
    q_programs = math.ceil(prob.max_seqlen_q / 128) * prob.nheads * prob.batch
    # dK/dV programs own 128 keys, or 64 past d=128 (``SPLIT_D``).
    keys_per_program = 64 if prob.headdim > 128 else 128
    k_programs = math.ceil(prob.max_seqlen_k / keys_per_program) * prob.nheads_k * prob.batch
    return 128 * max(2 * q_programs, 8 * k_programs + 6 * q_programs)


def preferred(prob: AttnProblem, dropout: Optional[tuple[float, int]] = None, kind: str = "fwd") -> bool:
    """Whether the default backend takes this family's ``kind`` ("fwd" or "bwd") for a call
    it ``supports``: where it measured faster than the portable kernel
    (``configs.sm90_min_seqlen_q``: measured at d = 64 to 256, runs 37-51; dropout at the
    head dims of ``configs.SM90_DROPOUT_HEADDIMS``; softcap where ``configs.SM90_SOFTCAP``;
    other dropout calls and varlen only with RINGFLASH_BACKEND=sm90, varlen also with
    RINGFLASH_SM90_VARLEN=1), unless a ``configs.override`` context forces the portable kernel's tiles for
    ``kind``."""
    if prob.is_varlen or (dropout is not None and prob.headdim not in configs.SM90_DROPOUT_HEADDIMS):
        return False
    if prob.softcap > 0 and not configs.SM90_SOFTCAP:
        return False
    return prob.max_seqlen_q >= configs.sm90_min_seqlen_q(prob.headdim) and not configs.portable_tiles_forced(kind)


def _block_d(headdim: int) -> int:
    """The tiles' head-dim width: 64, 128 or 256 (a power of two, as Gluon's tensor shapes
    are; 256 only without dropout or softcap, ``supports``)."""
    return 64 if headdim <= 64 else 128 if headdim <= 128 else 256


def _streamed_bytes(a: torch.Tensor, b: torch.Tensor) -> int:
    """Bytes of the two tensors a launch's programs stream in common (``configs.sm90_heads_first``)."""
    return a.numel() * a.element_size() + b.numel() * b.element_size()


@functools.lru_cache(maxsize=None)
def _box_layout(rows: int, block_d: int, dtype: torch.dtype) -> "gl.NVMMASharedLayout":
    """The shared-memory layout of a (1, rows, 1, block_d) box: a handful of distinct ones,
    made once (building one took about half of a descriptor's 11 us of host time, and a
    training step's backward makes 11 descriptors per call)."""
    return gl.NVMMASharedLayout.get_default_for([1, rows, 1, block_d], _GL_DTYPES[dtype])


class _AlignedBase:
    """Stands in for a tensor while a descriptor template is validated: the templates are
    made from shapes and strides alone, and every tensor a plan puts under one is 16-byte
    aligned (``supports`` checks the inputs; outputs and gradients are fresh allocations)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def data_ptr(self) -> int:
        return 0


def _descriptor_template(shape: tuple, strides: tuple, dtype: torch.dtype, rows: int) -> "TensorDescriptor":
    """A validated TMA descriptor over a (batch, seqlen, heads, d) tensor of this geometry
    moving (1, rows, 1, ``_block_d(d)``) boxes (columns past d read as zeros and are not
    written), with no base: ``_with_base`` gives it the call's tensor. Building and
    validating one took about 11 us of host time (CPU, Triton 3.6)."""
    block_d = _block_d(shape[-1])
    template = TensorDescriptor(_AlignedBase(dtype), list(shape), list(strides), [1, rows, 1, block_d],
                                _box_layout(rows, block_d, dtype))
    template.base = None  # a plan holds no tensor alive
    return template


def _with_base(template: "TensorDescriptor", x: torch.Tensor) -> "TensorDescriptor":
    """``template`` over ``x`` (which has the template's geometry): a copy, no validation."""
    descriptor = object.__new__(TensorDescriptor)
    descriptor.__dict__.update(template.__dict__, base=x)
    return descriptor


def _template_of(x: torch.Tensor, rows: int) -> "TensorDescriptor":
    return _descriptor_template(tuple(x.shape), x.stride(), x.dtype, rows)


def _row_stats_template(numel: int, rows: int) -> "TensorDescriptor":
    """A TMA descriptor template over a flat float32 tensor of ``numel`` entries (lse2 or
    delta, contiguous: ``bwd.prepare_backward``) moving boxes of ``rows`` (the dK/dV step's
    query rows; a box past the end reads zeros)."""
    template = TensorDescriptor(_AlignedBase(torch.float32), [numel], [1], [rows],
                                gl.NVMMASharedLayout.get_default_for([rows], gl.float32))
    template.base = None
    return template


#: How the CTA's warps split the work: "pipelined" (all warps run every row and issue the
#: loads), "specialized" (a loader warp and two consumer warpgroups) or "pingpong" (the
#: consumers also take turns at the tensor cores). Run 37 (scripts/probe_sm90.py, H200,
#: 12 cases): pingpong with three K/V stages was the fastest variant in every case, at
#: 1.31-1.41x the portable forward at d=128 and 1.14-1.24x at d=64 from seqlen 4k; the
#: pipelined one reached 0.74-1.13x.
VARIANTS = ("pipelined", "specialized", "pingpong")
DEFAULT_VARIANT = "pingpong"


def _dropout_mode(dropout: Optional[tuple[float, int]]) -> int:
    """The kernels' HAS_DROPOUT: 0 without dropout, 2 with it (the inline-PTX mask,
    ``_dropout_factor``; 1 was the Gluon-ops mask it replaced)."""
    return 0 if dropout is None else 2


def _dropout_keys(dropout: Optional[tuple[float, int]], batch: int, nheads: int, like: torch.Tensor) -> torch.Tensor:
    """The per-(sequence, head) Philox words of this call's mask (``dropout_mask.dropout_keys``);
    without dropout the kernels never read the pointer, and ``like`` stands in."""
    if dropout is None:
        return like
    from .dropout_mask import dropout_keys

    return dropout_keys(batch, nheads, dropout_args(dropout)[2], like.device)


#: Plans by call signature (``_forward_plan``, ``_backward_plan``): at batch 1 and 4k tokens
#: an H200 training step was bound by host time (run 39), which working each launch out
#: per call made larger than the kernels of a small call.
_PLANS = PlanTable()


def _score_scalars(prob: AttnProblem) -> tuple[float, float]:
    """(qk_scale_log2, softcap_in): the factor the kernels' softmax applies to its scores,
    in log2 units, and with softcap the raw scores' factor inside the tanh (``_capped``):
    softcap * tanh(q.k * scale / softcap) * log2(e) = tanh(q.k * softcap_in) * qk_scale_log2.
    Without softcap, softcap_in is unused (0). The portable kernels' ``scalar_args`` in log2
    units, with the outer softcap factor taking the scale's place."""
    qk_scale, softcap_in, softcap_out = prob.scalar_args()
    return (softcap_out if prob.softcap > 0 else qk_scale), softcap_in


@dataclass(frozen=True)
class _ForwardPlan:
    """``attention_forward_sm90``'s launch but for its tensors."""
    grid: tuple
    descriptors: tuple  # templates over q, k, v and out
    scalars: tuple  # the kernel's arguments after its pointers
    launch: PlannedLaunch


def _forward_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prob: AttnProblem, variant: str,
                  dropout: Optional[tuple[float, int]], meta) -> _ForwardPlan:
    key = ("fwd", q.shape, q.stride(), k.shape, k.stride(), v.stride(), q.dtype, q.device, prob, variant,
           None if dropout is None else dropout[0], meta_signature(meta), configs.override_key())
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    varlen = meta is not None
    nheads, headdim = q.shape[-2], q.shape[-1]
    cfg = configs.sm90_forward_config(_block_d(headdim), prob.causal)
    if cfg.num_stages < 2:
        # Block j's S MMA and block j-1's P V MMA run together: a ring of one slot would wait
        # for a load that waits for that slot (a hang).
        raise ValueError(f"sm90 forward config: got num_stages={cfg.num_stages}; expected at least 2")
    specialized = variant != "pipelined"
    num_m_blocks = math.ceil(prob.max_seqlen_q / cfg.block_m)
    heads_first = configs.sm90_heads_first(prob.causal, _streamed_bytes(k, v), num_m_blocks)
    rows = cfg.block_m // 2 if specialized else cfg.block_m  # per consumer
    threshold, scale, _ = dropout_args(dropout)
    keys_stride = 2 * nheads if dropout is not None else 0  # the keys' batch stride (read with dropout only)
    # The buffers the call allocates: out like q, lse (batch, nheads, seqlen_q) or varlen
    # (nheads, total_q), both contiguous.
    out_strides = contiguous_strides(tuple(q.shape))
    if varlen:  # one packed batch entry for the descriptors
        q4, k4, v4 = (x.unsqueeze(0) for x in (q, k, v))
        out4 = ((1,) + tuple(q.shape), (q.numel(),) + out_strides)
        lse_strides, out_tail = (0, q.shape[0]), out_strides[:2]
        seqlen_q, seqlen_k = prob.max_seqlen_q, prob.max_seqlen_k
    else:
        q4, k4, v4 = q, k, v
        out4 = (tuple(q.shape), out_strides)
        lse_strides, out_tail = (nheads * q.shape[1], q.shape[1]), out_strides[1:3]
        seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    return _PLANS.keep(key, _ForwardPlan(
        grid=(nheads, prob.batch, num_m_blocks) if heads_first else (num_m_blocks, nheads, prob.batch),
        descriptors=(_template_of(q4, rows), _template_of(k4, cfg.block_n), _template_of(v4, cfg.block_n),
                     _descriptor_template(*out4, q.dtype, rows)),
        scalars=(seqlen_q, seqlen_k, nheads // k.shape[-2], num_m_blocks, k.shape[-2], k.stride(-3), k.stride(-2),
                 v.stride(-3), v.stride(-2), *lse_strides, keys_stride, *out_tail, headdim,
                 *_score_scalars(prob), threshold, scale),
        launch=PlannedLaunch(_fwd_sm90_kernel, dict(
            HEADDIM=_block_d(headdim), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, STAGES=cfg.num_stages,
            CAUSAL=prob.causal, SPECIALIZED=specialized, PINGPONG=variant == "pingpong",
            HAS_DROPOUT=_dropout_mode(dropout), IS_VARLEN=varlen, HEADS_FIRST=heads_first,
            HAS_SOFTCAP=prob.softcap > 0,
            # Pipelined: a warp per 16 rows (the table's warps are the specialized variants').
            num_warps=4 if specialized else cfg.block_m // 16,
        ), descriptor_key),
    ))


def attention_forward_sm90(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prob: AttnProblem,
                           variant: Optional[str] = None, dropout: Optional[tuple[float, int]] = None,
                           meta=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense: q (batch, seqlen_q, nheads, d), k/v (batch, seqlen_k, nheads_k, d); varlen
    (``meta``, plain ``SeqMeta``): q (total_q, nheads, d), k/v (total_k, nheads_k, d); where
    ``supports``. ``dropout``: (probability, seed), the same mask as the portable kernels draw.

    Returns out (q's shape and dtype, contiguous) and lse (float32, natural log:
    (batch, nheads, seqlen_q) dense, (nheads, total_q) varlen). Causal is aligned
    bottom-right (key j visible to query i when j <= i + seqlen_k - seqlen_q, per sequence).
    The host work that depends only on the call's shapes and options is done once per
    signature (``_forward_plan``)."""
    varlen = meta is not None
    nheads = q.shape[-2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((nheads, q.shape[0]) if varlen else (q.shape[0], nheads, q.shape[1]), dtype=torch.float32,
                      device=q.device)
    if out.numel() == 0 or k.shape[-3] == 0:  # no rows, or no keys anywhere
        if out.numel():
            out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    variant = variant or DEFAULT_VARIANT
    if variant not in VARIANTS:
        raise ValueError(f"variant: got {variant!r}; expected one of {VARIANTS}")
    plan = _forward_plan(q, k, v, prob, variant, dropout, meta)
    keys = _dropout_keys(dropout, prob.batch, nheads, lse)
    tq, tk, tv, to = plan.descriptors
    if varlen:
        _ensure_scratch_allocator()  # the per-sequence K/V descriptors live in global scratch
        bases = tuple(x.unsqueeze(0) for x in (q, k, v, out))
        varlen_ptrs = (out, meta.q_starts[0], meta.q_ends[0], meta.cu_seqlens_k, k, v)
    else:
        bases = (q, k, v, out)
        # Read under IS_VARLEN only: None costs the launch nothing to specialize.
        varlen_ptrs = (None,) * 6
    plan.launch(plan.grid, (
        _with_base(tq, bases[0]), _with_base(tk, bases[1]), _with_base(tv, bases[2]), _with_base(to, bases[3]),
        lse, keys, *varlen_ptrs, *plan.scalars,
    ))
    return out, lse


def _scratch(size: int, alignment: int, stream: Optional[int]) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_scratch_allocator() -> None:
    """Register a torch allocator for the global scratch of device-made TMA descriptors
    (Triton asks for it at launch) unless the caller has registered one of their own."""
    try:  # Triton's own registry (3.6-3.9); where it moved, register ours
        from triton.runtime import _allocation

        unset = isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
    except (ImportError, AttributeError):
        unset = True
    if unset:
        triton.set_allocator(_scratch)


def _tma_operand(x: torch.Tensor) -> torch.Tensor:
    """``x``, or a contiguous, aligned copy where TMA cannot read it (a stride of 0, e.g. an
    expanded gradient, a stride not a multiple of 16 bytes, or a base off 16 bytes:
    ``contiguous()`` would return such a tensor as it is)."""
    return x if tma_readable(x) else x.clone(memory_format=torch.contiguous_format)


@dataclass(frozen=True)
class _BackwardPlan:
    """``attention_backward_sm90``'s launches but for their tensors."""
    atomic_dq: bool
    dq_writer: str  # the atomic dQ's adds (``configs.sm90_dq_writer``)
    dq_accumulator_shape: tuple  # the atomic dQ's float32 accumulator (``dq_accumulator_shape``)
    dq_accumulator_template: Optional["TensorDescriptor"]  # the "tma" writer's, over that accumulator
    head_splits: int
    partials_shape: tuple  # the float32-summed partial dK/dV of a head split: (2, splits x batch, ...)
    dkdv_grid: tuple
    dkdv_descriptors: tuple  # templates over q, k, v, dout, dk, dv (or the partials)
    row_stats_template: "TensorDescriptor"  # over lse2 and delta, flat (the dK/dV kernel's)
    dkdv_scalars: tuple
    dkdv_launch: PlannedLaunch
    dq_grid: tuple
    dq_descriptors: tuple  # templates over q, k, v, dout, dq
    dq_scalars: tuple
    dq_launch: PlannedLaunch


def dq_accumulator_shape(batch: int, seqlen_q: int, nheads: int, block_d: int, block_m: int,
                         writer: str = "red") -> tuple:
    """The atomic backward's float32 dQ accumulator. The "tma" writer's: (batch, rows,
    nheads, block_d), rows padded to ``block_m`` (TMA clips nothing inside it). The "red"
    writer's: (batch, row blocks of 16, nheads, 8, block_d / 8, 4, 2, 2),
    rows padded to the dK/dV step's ``block_m`` and columns to ``block_d`` (no masks in
    the kernel). Row 16 R + 8 hh + g, column 8 j + 2 t + e of a head sits at [R, g, j, t,
    hh, e]: the four entries a thread holds of a warpgroup MMA's 16-row block are side by
    side (``_add_dq_tile``)."""
    rows = math.ceil(seqlen_q / block_m) * block_m
    if writer != "red":
        return (batch, rows, nheads, block_d)
    return (batch, rows // 16, nheads, 8, block_d // 8, 4, 2, 2)


def dq_from_accumulator(acc: torch.Tensor, seqlen_q: int, headdim: int) -> torch.Tensor:
    """The (batch, seqlen_q, nheads, headdim) float32 dQ held in ``acc`` (``dq_accumulator_shape``,
    either writer's: the "tma" one's has four dimensions)."""
    if acc.dim() == 4:
        return acc[:, :seqlen_q, :, :headdim]
    batch, row_blocks, nheads, _, col_blocks = acc.shape[:5]
    rows = acc.permute(0, 1, 6, 3, 2, 4, 5, 7)  # (batch, R, hh, g, head, j, t, e)
    return rows.reshape(batch, row_blocks * 16, nheads, col_blocks * 8)[:, :seqlen_q, :, :headdim]


def _backward_plan(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, grads: tuple, prob: AttnProblem, dropout: Optional[tuple[float, int]],
                   atomic_dq: bool, meta) -> _BackwardPlan:
    """``grads``: the call's (dq, dk, dv) buffers, whose layouts follow from q's, k's and v's."""
    key = ("bwd", q.shape, q.stride(), k.shape, k.stride(), v.stride(), dout.stride(), out.stride(), lse.shape,
           q.dtype, q.device, prob, None if dropout is None else dropout[0], atomic_dq,
           configs.sm90_dq_writer() if atomic_dq else None, configs.sm90_backward_overlap(), meta_signature(meta),
           configs.override_key())
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    varlen = meta is not None
    nheads, headdim = q.shape[-2], q.shape[-1]
    nheads_k = k.shape[-2]
    kv_group = nheads // nheads_k
    qk_scale_log2, softcap_in = _score_scalars(prob)
    scalars = (qk_scale_log2, prob.softmax_scale, softcap_in)
    softcap = prob.softcap > 0
    block_d = _block_d(headdim)
    split_d = block_d > 128  # the dK/dV consumers split d, not the keys (``_dkdv_half_rows``)
    dkdv_cfg, dq_cfg = (configs.sm90_backward_config(kind, softcap, split_d) for kind in ("dkdv", "dq"))
    if split_d and (dropout is not None or softcap):
        # ``supports`` keeps such calls on the portable kernels; the SPLIT_D consumers have
        # neither, so a direct call must not get gradients without them.
        raise ValueError(f"headdim: got {headdim} with dropout or softcap; the Gluon backward takes d > 128 "
                         "only without either (the portable backward takes them)")
    if split_d and (dkdv_cfg.block_m, dkdv_cfg.block_n) != (64, 64):
        raise ValueError(f"sm90_dkdv: got {dkdv_cfg.block_m}x{dkdv_cfg.block_n} at d={headdim}; the SPLIT_D "
                         "dK/dV program takes 64x64 (its shared memory holds no more)")
    # K/V (and dK/dV) boxes: each consumer's rows, or with split_d all of the program's.
    key_rows = dkdv_cfg.block_n if split_d else dkdv_cfg.block_n // 2
    threshold, scale, _ = dropout_args(dropout)
    keys_stride = 2 * nheads if dropout is not None else 0  # the keys' batch stride (read with dropout only)
    lse_strides_all = contiguous_strides(tuple(lse.shape))  # delta's and lse2's (``prepare_backward``)
    if varlen:
        q4, k4, v4, do4, dq4, dk4, dv4 = (x.unsqueeze(0) for x in (q, k, v, dout, *grads))
        lse_strides = (0, lse_strides_all[0])
        seqlen_q, seqlen_k = prob.max_seqlen_q, prob.max_seqlen_k
        atomic_dq = False
    else:
        q4, k4, v4, do4, dq4, dk4, dv4 = q, k, v, dout, *grads
        lse_strides = lse_strides_all[:2]
        seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    # Its dQ MMA's rows are the dK/dV step's query rows: a warpgroup MMA needs 64 (softcap's
    # 32-row step takes the two-kernel path).
    atomic_dq = atomic_dq and dkdv_cfg.block_m % 64 == 0 and not split_d
    dq_writer = configs.sm90_dq_writer()
    # Dense only: a varlen launch's device-made descriptors live in scratch that the caching
    # allocator hands out again on the same stream once the launch call returns, which is safe
    # only while the next launch cannot run beside it.
    overlap = configs.sm90_backward_overlap() and not varlen
    acc_shape = dq_accumulator_shape(prob.batch, seqlen_q, nheads, block_d, dkdv_cfg.block_m, dq_writer)
    # The "red" writer's float32 accumulator is addressed with 32-bit offsets within a
    # (sequence, head): past 2**31 elements per sequence the two-kernel path runs.
    atomic_dq = atomic_dq and (dq_writer != "red" or math.prod(acc_shape[1:]) < 2**31)
    # (batch, row block, head) strides, in floats ("red"; the "tma" writer's descriptor has its own).
    dq_acc_strides = contiguous_strides(acc_shape)[:3] if atomic_dq and dq_writer == "red" else (0, 0, 0)
    acc_template = None
    if atomic_dq and dq_writer != "red":
        # Boxes of a quarter of the head dim (32 float32 columns at d=128: the 128-byte swizzle's width).
        box = [1, dkdv_cfg.block_m, 1, block_d // 4]
        acc_template = TensorDescriptor(_AlignedBase(torch.float32), list(acc_shape),
                                        list(contiguous_strides(acc_shape)), box,
                                        gl.NVMMASharedLayout.get_default_for(box, gl.float32))
        acc_template.base = None
    # An underfilled launch splits each group's query heads across programs (dense, two-kernel
    # backward only), each slice's partial dK/dV summed in float32 in a fixed order.
    key_blocks = math.ceil(seqlen_k / dkdv_cfg.block_n)
    head_splits = 1 if varlen or atomic_dq else \
        configs.sm90_dkdv_head_splits(key_blocks * nheads_k * prob.batch, kv_group, q.device)
    partials_shape = (2, head_splits * prob.batch) + tuple(k.shape[1:])
    if head_splits > 1:
        # In the inputs' dtype, as flash-attn's per-head dK/dV of a GQA backward: stored
        # through descriptors as dK and dV themselves are (no float32 tile in registers to
        # address: storing one that way spilled in the kernel's loop).
        partial = (partials_shape[1:], contiguous_strides(partials_shape)[1:], k.dtype)
        dk_template = dv_template = _descriptor_template(*partial, key_rows)
    else:
        dk_template, dv_template = _template_of(dk4, key_rows), _template_of(dv4, key_rows)
    dkdv_heads_first = configs.sm90_heads_first(prob.causal, _streamed_bytes(q, dout), key_blocks)
    num_m_blocks = math.ceil(seqlen_q / dq_cfg.block_m)
    dq_heads_first = configs.sm90_heads_first(prob.causal, _streamed_bytes(k, v), num_m_blocks)
    return _PLANS.keep(key, _BackwardPlan(
        atomic_dq=atomic_dq, dq_writer=dq_writer, dq_accumulator_shape=acc_shape,
        dq_accumulator_template=acc_template, head_splits=head_splits, partials_shape=partials_shape,
        row_stats_template=_row_stats_template(math.prod(lse.shape), dkdv_cfg.block_m),
        dkdv_grid=(nheads_k * head_splits, prob.batch, key_blocks) if dkdv_heads_first else
        (key_blocks, nheads_k * head_splits, prob.batch),
        dkdv_descriptors=(_template_of(q4, dkdv_cfg.block_m), _template_of(k4, key_rows),
                          _template_of(v4, key_rows), _template_of(do4, dkdv_cfg.block_m),
                          dk_template, dv_template),
        dkdv_scalars=(nheads_k, seqlen_q, seqlen_k, kv_group, *lse_strides, keys_stride, *dq_acc_strides, headdim,
                      *scalars, threshold, scale, head_splits),
        dkdv_launch=PlannedLaunch(_bwd_dkdv_sm90_kernel, dict(
            HEADDIM=block_d, BLOCK_M=dkdv_cfg.block_m, BLOCK_N=dkdv_cfg.block_n, STAGES=dkdv_cfg.num_stages,
            CAUSAL=prob.causal, HAS_DROPOUT=_dropout_mode(dropout),
            ATOMIC_DQ={"red": 1, "tma": 2}[dq_writer] if atomic_dq else 0, IS_VARLEN=varlen,
            HEADS_FIRST=dkdv_heads_first, HAS_SOFTCAP=prob.softcap > 0, SPLIT_D=split_d,
            # TMA for lse2/delta only where each (sequence, head)'s rows start 16-byte aligned:
            # run 54 found seqlen_q = 3001, where they do not, an illegal instruction, and a
            # varlen batch's sequences start anywhere. (4: the statistics' bytes per entry.)
            STATS_TMA=not varlen and all(stride * 4 % 16 == 0 for stride in lse_strides),
            OVERLAP_DQ=overlap and not atomic_dq, num_warps=4,
        ), descriptor_key),
        dq_grid=(nheads, prob.batch, num_m_blocks) if dq_heads_first else (num_m_blocks, nheads, prob.batch),
        dq_descriptors=(_template_of(q4, dq_cfg.block_m // 2), _template_of(k4, dq_cfg.block_n),
                        _template_of(v4, dq_cfg.block_n), _template_of(do4, dq_cfg.block_m // 2),
                        _template_of(dq4, dq_cfg.block_m // 2)),
        dq_scalars=(nheads_k, seqlen_q, seqlen_k, kv_group, num_m_blocks, *lse_strides, keys_stride, headdim,
                    *scalars, threshold, scale),
        dq_launch=PlannedLaunch(_bwd_dq_sm90_kernel, dict(
            HEADDIM=block_d, BLOCK_M=dq_cfg.block_m, BLOCK_N=dq_cfg.block_n, STAGES=dq_cfg.num_stages,
            CAUSAL=prob.causal, HAS_DROPOUT=_dropout_mode(dropout), IS_VARLEN=varlen, HEADS_FIRST=dq_heads_first,
            HAS_SOFTCAP=prob.softcap > 0, AFTER_DKDV=overlap, num_warps=4, launch_pdl=overlap,
        ), descriptor_key),
    ))


def attention_backward_sm90(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            out: torch.Tensor, lse: torch.Tensor, prob: AttnProblem,
                            dropout: Optional[tuple[float, int]] = None, atomic_dq: bool = False,
                            meta=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv), in the inputs' dtypes and layouts (``common.grad_buffer``), of
    a call ``supports`` takes. Dense: q/dout/out (batch, seqlen_q, nheads, d), k/v (batch, seqlen_k, nheads_k,
    d), lse float32 (batch, nheads, seqlen_q); plain varlen (``meta``): q/dout/out
    (total_q, nheads, d), k/v (total_k, nheads_k, d), lse (nheads, total_q); from either
    forward. Deterministic (no atomics): the dK/dV kernel sums over the query heads of each
    KV head itself, and a dQ kernel follows. With ``atomic_dq`` (dense calls whose dK/dV step is a multiple of
    64 query rows: not softcap's, ``configs.SM90_BACKWARD_SOFTCAP``) the dK/dV
    kernel also adds dQ into a float32 buffer by atomics (5 GEMMs instead of 7, no dQ
    kernel; the summation order then varies: not deterministic). The host work that
    depends only on the call's shapes and options is done once per signature
    (``_backward_plan``)."""
    varlen = meta is not None
    inputs = (q, k, v)
    if varlen:
        # The kernels make each sequence's descriptors from contiguous packed tensors.
        q, k, v, dout = (x.contiguous() for x in (q, k, v, dout))
    dq, dk, dv = _backward_sm90(dout, q, k, v, out, lse, prob, meta, dropout, atomic_dq)
    if varlen and not all(x.is_contiguous() for x in inputs):
        # Gradients laid out as the caller's inputs, as the custom op's fake promises (a
        # compiled graph checks the strides), and as the dense path writes them directly.
        return tuple(g if g.stride() == (b := grad_buffer(x, 0)).stride() else b.copy_(g)  # type: ignore[return-value]
                     for g, x in zip((dq, dk, dv), inputs))
    return dq, dk, dv


def _backward_sm90(dout, q, k, v, out, lse, prob, meta, dropout, atomic_dq):
    """``attention_backward_sm90`` on inputs the kernels can take as they are."""
    from .bwd import prepare_backward

    varlen = meta is not None
    # Laid out as the inputs where those are dense (``common.grad_buffer``): TMA reads the
    # inputs with those strides, so it writes the gradients with them too.
    dq, dk, dv = (grad_buffer(x, 0 if varlen else 1) for x in (q, k, v))
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    dout, out = _tma_operand(dout), _tma_operand(out)
    plan = _backward_plan(dout, q, k, v, out, lse, (dq, dk, dv), prob, dropout, atomic_dq, meta)
    delta, lse2 = prepare_backward(dout, out, lse, prob)
    keys = _dropout_keys(dropout, prob.batch, q.shape[-2], delta)
    # Without the atomic dQ the kernel never reads its accumulator: delta stands in.
    dq_acc = torch.zeros(plan.dq_accumulator_shape, dtype=torch.float32, device=q.device) if plan.atomic_dq \
        else delta
    dq_acc_arg = _with_base(plan.dq_accumulator_template, dq_acc) if plan.dq_accumulator_template is not None \
        else dq_acc
    if plan.head_splits > 1:
        partials = torch.empty(plan.partials_shape, dtype=k.dtype, device=k.device)
        dk_out, dv_out = partials
    else:
        dk_out, dv_out = dk, dv
    if varlen:
        _ensure_scratch_allocator()
        bases = tuple(x.unsqueeze(0) for x in (q, k, v, dout, dq, dk_out, dv_out))
        seq_ptrs = (meta.q_starts[0], meta.q_ends[0], meta.cu_seqlens_k)
        dkdv_ptrs, dq_ptrs = (*seq_ptrs, q, k, v, dout, dk, dv), (*seq_ptrs, q, k, v, dout, dq)
    else:
        bases = (q, k, v, dout, dq, dk_out, dv_out)
        dkdv_ptrs, dq_ptrs = (None,) * 9, (None,) * 8  # read under IS_VARLEN only
    t = plan.dkdv_descriptors
    plan.dkdv_launch(plan.dkdv_grid, (
        _with_base(t[0], bases[0]), _with_base(t[1], bases[1]), _with_base(t[2], bases[2]),
        _with_base(t[3], bases[3]), _with_base(t[4], bases[5]), _with_base(t[5], bases[6]),
        lse2, delta, _with_base(plan.row_stats_template, lse2.view(-1)),
        _with_base(plan.row_stats_template, delta.view(-1)), keys, dq_acc_arg,
        *dkdv_ptrs, *plan.dkdv_scalars,
    ))
    if plan.atomic_dq:
        dq.copy_(dq_from_accumulator(dq_acc, q.shape[1], q.shape[-1]))
    else:
        # Right after the dK/dV launch: with ``sm90_backward_overlap`` it is that launch's
        # programmatic dependent, which must directly follow it in the stream.
        t = plan.dq_descriptors
        plan.dq_launch(plan.dq_grid, (
            _with_base(t[0], bases[0]), _with_base(t[1], bases[1]), _with_base(t[2], bases[2]),
            _with_base(t[3], bases[3]), _with_base(t[4], bases[4]), lse2, delta, keys, *dq_ptrs, *plan.dq_scalars,
        ))
    if plan.head_splits > 1:  # dK's and dV's partials in one sum (one launch fewer per call)
        sums = partials.view(2, plan.head_splits, *k.shape).sum(1, dtype=torch.float32)
        dk.copy_(sums[0])
        dv.copy_(sums[1])
    return dq, dk, dv
