"""Host-side description of one attention call, shared by the forward and backward
launchers: sizes and options (``AttnProblem``) and the sequence metadata of varlen and
grouped calls (``SeqMeta``).

Varlen geometry, in general form: G groups of B entries. Entry (g, b) attends the query
rows ``[q_starts[g, b], q_ends[g, b])`` of q to the first ``seqused_k[g, b]`` keys of
sequence b, ``k[cu_seqlens_k[b] : cu_seqlens_k[b + 1]]`` (all of them without
``seqused_k``). Under a causal mask or window, query row i of the entry sees key j iff
``j <= i + diag[g, b]`` (bounded by the window); without ``diag`` it is ``sk - sq``, the
bottom-right alignment. Each query row may belong to at most one entry of a call. Plain varlen is G = 1 with ``q_starts = cu_seqlens_q[:-1]`` and
``q_ends = cu_seqlens_q[1:]`` (views, no copy); grouped attention has G > 1 query groups
sharing one K/V buffer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from .common import LOG2E, next_power_of_2

#: Largest window (and diag offset) the kernels distinguish; sequences are shorter than this.
WINDOW_CAP = 1 << 29


@dataclass(frozen=True)
class SeqMeta:
    q_starts: torch.Tensor  # (G, B) int32
    q_ends: torch.Tensor  # (G, B) int32
    cu_seqlens_k: torch.Tensor  # (B + 1,) int32
    seqused_k: Optional[torch.Tensor]  # (G, B) int32, contiguous, or None
    diag: Optional[torch.Tensor] = None  # (G, B) int32, contiguous, or None

    @property
    def num_groups(self) -> int:
        return self.q_starts.shape[0]

    @property
    def batch(self) -> int:
        return self.cu_seqlens_k.shape[0] - 1

    @staticmethod
    def from_cu_seqlens(
        cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, seqused_k: Optional[torch.Tensor] = None
    ) -> "SeqMeta":
        """Plain varlen (one group), as views of the caller's tensors (copies where those are
        not contiguous: the kernels index them with unit stride)."""
        cu_seqlens_q = cu_seqlens_q.contiguous()
        return SeqMeta(
            cu_seqlens_q[:-1].unsqueeze(0), cu_seqlens_q[1:].unsqueeze(0), cu_seqlens_k,
            None if seqused_k is None else seqused_k.unsqueeze(0),
        )

    def __post_init__(self) -> None:
        # The kernels index every metadata tensor with unit stride along the batch, give
        # q_starts and q_ends one row stride, and SequsedK and Diag another: any other
        # layout (a strided view of a caller's tensor) is copied here, once per call,
        # rather than read wrongly. contiguous() of a contiguous tensor is free.
        starts, ends = self.q_starts, self.q_ends
        if starts.stride(-1) != 1 or ends.stride(-1) != 1 or starts.stride(0) != ends.stride(0):
            starts, ends = starts.contiguous(), ends.contiguous()
        object.__setattr__(self, "q_starts", starts)
        object.__setattr__(self, "q_ends", ends)
        object.__setattr__(self, "cu_seqlens_k", self.cu_seqlens_k.contiguous())
        for name in ("seqused_k", "diag"):
            t = getattr(self, name)
            if t is not None:
                object.__setattr__(self, name, t.contiguous())


@dataclass(frozen=True)
class AttnProblem:
    """Sizes and options. Dense: q (batch, seqlen_q, nheads, d), k/v (batch, seqlen_k,
    nheads_k, d). Varlen: q (total_q, nheads, d), k/v (total_k, nheads_k, d) with a SeqMeta;
    ``batch`` is then the number of key sequences and ``max_seqlen_q`` the longest query
    segment of any group."""

    batch: int
    nheads: int
    nheads_k: int
    headdim: int
    max_seqlen_q: int
    max_seqlen_k: int
    is_varlen: bool
    softmax_scale: float
    causal: bool
    window_left: int
    window_right: int
    softcap: float
    num_groups: int = 1

    @property
    def has_left(self) -> bool:
        return self.window_left >= 0

    @property
    def has_right(self) -> bool:
        return self.window_right >= 0

    @property
    def block_d(self) -> int:
        return max(16, next_power_of_2(self.headdim))

    def scalar_args(self, log2_units: bool = True) -> tuple:
        """(qk_scale, softcap_in, softcap_out): the score transform, in log2 units by default."""
        unit = LOG2E if log2_units else 1.0
        if self.softcap > 0:
            return self.softmax_scale * unit, self.softmax_scale / self.softcap, self.softcap * unit
        return self.softmax_scale * unit, 0.0, 0.0


def make_problem(
    q: torch.Tensor,
    k: torch.Tensor,
    meta: Optional[SeqMeta],
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
) -> AttnProblem:
    if causal:
        window_right = 0
    # Windows wider than any sequence are unbounded; capping them keeps the kernels'
    # index arithmetic inside int32 (diag offsets are capped likewise).
    window_left, window_right = (min(w, WINDOW_CAP) for w in (window_left, window_right))
    is_varlen = meta is not None
    if is_varlen:
        # No sequence is longer than its packed tensor: an oversized max_seqlen (allowed,
        # as in flash-attn) would only grow the launch grid (past CUDA's limit at 2**31).
        if q.dim() == 3:
            max_seqlen_q = min(max_seqlen_q, q.shape[0])
        if k.dim() == 3:
            max_seqlen_k = min(max_seqlen_k, k.shape[0])
    return AttnProblem(
        batch=meta.batch if is_varlen else q.shape[0], nheads=q.shape[-2], nheads_k=k.shape[-2],
        headdim=q.shape[-1], max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, is_varlen=is_varlen,
        softmax_scale=softmax_scale, causal=causal, window_left=window_left, window_right=window_right,
        softcap=softcap, num_groups=meta.num_groups if is_varlen else 1,
    )


def dense_strides(x: torch.Tensor, is_varlen: bool, unit: int = 1) -> tuple[int, int, int]:
    """(batch, token, head) strides, in units of ``unit`` elements (``stride_unit``);
    varlen tensors have no batch axis (stride 0)."""
    strides = (0, x.stride(0), x.stride(1)) if is_varlen else (x.stride(0), x.stride(1), x.stride(2))
    return tuple(s // unit for s in strides)


def stride_unit(*tensors: torch.Tensor, is_varlen: bool) -> int:
    """The largest power of two below 16 (2, 4 or 8) that divides every (batch, token, head)
    stride of ``tensors``, else 1 (see the end). The portable kernels take these strides in such units
    (``dense_strides(..., unit)``) and multiply them back by their constexpr STRIDE_UNIT,
    so that the compiler knows the rows' alignment: Triton specializes an integer argument
    only on divisibility by 16, so at a head dim that is not a multiple of 16 (d=72: a head
    stride of 72) every load and store of a tile was a scalar 2-byte access, and d=72 ran
    3-12x slower than FA2 (run 51), where d=112 vectorizes to 16 bytes. 1 where every
    stride is a multiple of 16 (Triton's specialization already says so: the kernels
    compile as they did before), and where a stride does not fit 32 bits (Triton passes it
    as a 64-bit integer, and its quotient, passed as a 32-bit one, would overflow when
    multiplied back)."""
    return strides_unit(s for x in tensors for s in dense_strides(x, is_varlen))


def strides_unit(strides: Iterable[int]) -> int:
    """``stride_unit`` of the strides themselves (a kernel whose strides are not all of
    dense (batch, token, head) tensors: the decode kernel's cache)."""
    unit = 16
    for s in strides:
        if s >= 2**31:
            return 1
        while s % unit:
            unit //= 2
    return 1 if unit == 16 else unit


def lse_strides(lse: torch.Tensor, is_varlen: bool) -> tuple[int, int]:
    """(batch, head) strides of lse; the token stride is 1 in both layouts."""
    if is_varlen:
        return 0, lse.stride(0)
    return lse.stride(0), lse.stride(1)


def seqlen_args(q: torch.Tensor, k: torch.Tensor, meta: Optional[SeqMeta]) -> tuple:
    """The kernels' sequence arguments, in order: QStarts, QEnds, stride_qmeta_g,
    CuSeqlensK, SequsedK, Diag, stride_used_g, seqlen_q, seqlen_k, total_q, total_k.
    SequsedK and Diag are (G, B) contiguous, hence one row stride. Unused pointers are
    dummies that the compile-time flags keep from being read."""
    starts, ends, cu_k, used, diag = seq_pointers(q, meta)
    if meta is not None:
        row = meta.seqused_k if meta.seqused_k is not None else meta.diag
        return (starts, ends, meta.q_starts.stride(0), cu_k, used, diag, row.stride(0) if row is not None else 0,
                0, 0, q.shape[0], k.shape[0])
    return starts, ends, 0, cu_k, used, diag, 0, q.shape[1], k.shape[1], q.shape[1], k.shape[1]


def seq_pointers(q: torch.Tensor, meta: Optional[SeqMeta]) -> tuple:
    """The tensors among ``seqlen_args``: QStarts, QEnds, CuSeqlensK, SequsedK, Diag (q
    where the call has none: never read)."""
    if meta is None:
        return q, q, q, q, q
    used, diag = meta.seqused_k, meta.diag
    return (meta.q_starts, meta.q_ends, meta.cu_seqlens_k, used if used is not None else meta.q_starts,
            diag if diag is not None else meta.q_starts)


def meta_signature(meta: Optional[SeqMeta]) -> Optional[tuple]:
    """What a launch plan reads of varlen metadata besides its values (``sm90``/``fwd``/``bwd``
    plans): which tensors are present, their shapes and strides, and which are 16-byte
    aligned (Triton specializes on it)."""
    if meta is None:
        return None
    return tuple(None if t is None else (t.shape, t.stride(), t.data_ptr() % 16 == 0)
                 for t in (meta.q_starts, meta.q_ends, meta.cu_seqlens_k, meta.seqused_k, meta.diag))


def alibi_args(alibi_slopes: Optional[torch.Tensor], dummy: torch.Tensor) -> tuple:
    """(Alibi, stride_b, stride_h) of (1 or batch, nheads) slopes; a row of one is shared by
    every sequence (batch stride 0). Without ALiBi a dummy pointer the HAS_ALIBI flag keeps
    from being read."""
    if alibi_slopes is None:
        return dummy, 0, 0
    return alibi_slopes, alibi_slopes.stride(0) if alibi_slopes.shape[0] > 1 else 0, alibi_slopes.stride(1)


def dropout_threshold(p: float) -> int:
    """The kernels' integer form of the dropout probability: an entry is kept when its 8-bit
    uniform (a byte of ``common.dropout_keep``'s draw) is at least round(p * 256), so the
    probability is applied in steps of 2**-8, as flash-attn's is, and the kept ones are scaled
    by exactly 1 / (1 - p) (flash-attn's scale): the expected output is off by at most
    2**-9 / (1 - p) relative, and ``S_dmask`` with 1 / (1 - p) rebuilds the output exactly.
    256 (p within 2**-9 of 1) drops every entry."""
    return int(round(float(p) * 256.0))


def dropout_args(dropout: Optional[tuple[float, int]]) -> tuple:
    """(dropout_threshold, dropout_scale, dropout_seed) kernel arguments; unused without
    HAS_DROPOUT."""
    if dropout is None:
        return 0, 1.0, 0
    p, seed = dropout
    return dropout_threshold(p), 1.0 / (1.0 - p), int(seed)


def meta_flags(meta: Optional[SeqMeta]) -> dict:
    return dict(
        IS_VARLEN=meta is not None,
        HAS_SEQUSED=meta is not None and meta.seqused_k is not None,
        HAS_DIAG=meta is not None and meta.diag is not None,
    )
