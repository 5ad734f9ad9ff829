"""The one place that picks a forward kernel family for a call.

* ``decode`` (``kernels.decode``): calls with few query rows per KV head (seqlen_q x the
  GQA group <= ``DECODE_MAX_ROWS``) against at least ``DECODE_MIN_KEYS`` keys, without
  dropout: the training forward would launch a mostly empty tile of query rows per
  program and too few programs to fill the GPU. Dense calls, and plain varlen calls
  (max_seqlen_q, a host int, bounds every sequence's queries, so no host sync; the keys
  stay where they are: one cache row, each sequence starting at its cu_seqlens_k entry).
* ``sm90`` (``kernels.sm90``): the Gluon Hopper forward (TMA, warpgroup MMAs, a loader
  warp and two consumer warpgroups taking turns at the tensor cores), for the calls inside
  its scope (``sm90.supports``) where it measured faster than the portable forward
  (``sm90.preferred``, dense calls, with dropout at d=128 only: runs 37-47 in
  docs/benchmarks.md). ``RINGFLASH_BACKEND=sm90`` takes it for every call in scope (other
  dropout calls included; plain varlen with ``RINGFLASH_SM90_VARLEN=1`` too),
  ``RINGFLASH_BACKEND=portable`` never.
* ``fwd`` (``kernels.fwd``): everything else.

The backward (``backward``) has two families: the portable one (``kernels.bwd``) and the
Gluon Hopper one (``sm90.attention_backward_sm90``), for the calls in the forward's scope
(plain varlen ones, and head dims 136-256 other than 192 and 256, with
``RINGFLASH_BACKEND=sm90`` only), by default where ``sm90.preferred(..., "bwd")`` (run 38:
1.04-1.34x the portable backward at d=64 from seqlen 4k and d=128 from 1k; run 47: d=80-128
from 512 at 1.12-1.37x, d=192 and 256 from 512 at 1.08-1.72x but for a tie at d=192 causal
16k). Either backward takes either forward's out and lse.

Dense calls take the decode family by default: on an H100 (run 27 in docs/benchmarks.md) it
ran one-query calls 1.45-1.57x faster than the training forward as a Python call and
2.8-3.2x in kernel time. Varlen calls take it only with ``RINGFLASH_DECODE=1``: their call
through it measured 0.54 ms for a 0.10 ms kernel at batch 8, a host cost not yet understood
or compared with the training forward's varlen call. ``RINGFLASH_DECODE=0`` keeps every
call on the training forward (A/B runs). Both families write the same out and lse, so the
backward is the same either way.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch

from .decode import KeyRanges, decode_forward
from . import configs, sm90
from .bwd import attention_backward
from .fwd import attention_forward
from .problem import AttnProblem, SeqMeta

#: Packed query rows (seqlen_q x nheads / nheads_k) up to which the decode family runs.
DECODE_MAX_ROWS = 64
#: Fewest keys for which it is worth it (below, one training-forward tile covers them).
DECODE_MIN_KEYS = 256


def _plain_varlen(meta: SeqMeta) -> bool:
    """One group of sequences with bottom-right alignment (not grouped or CP metadata)."""
    return meta.num_groups == 1 and meta.diag is None


def decode_mode() -> str:
    """``RINGFLASH_DECODE``: "" (unset: dense calls only), "1" (dense and varlen) or "0" (never)."""
    mode = os.environ.get("RINGFLASH_DECODE", "")
    if mode not in ("", "0", "1"):
        raise ValueError(f"RINGFLASH_DECODE: got {mode!r}; expected 0, 1 or unset")
    return mode


backend = configs.backend

#: While ``recording_families`` runs: the (pass, family) of every call, in order.
_family_log: Optional[list] = None


@contextlib.contextmanager
def recording_families() -> Iterator[list]:
    """Collect ("fwd" or "bwd", "portable" / "sm90" / "decode") for each call made inside the
    block (benchmarks report which kernels ran)."""
    global _family_log
    saved, _family_log = _family_log, []
    try:
        yield _family_log
    finally:
        _family_log = saved


def _ran(kind: str, family: str) -> None:
    if _family_log is not None:
        _family_log.append((kind, family))


def use_decode(q: torch.Tensor, k: torch.Tensor, prob: AttnProblem, meta: Optional[SeqMeta],
               dropout: Optional[tuple]) -> bool:
    if dropout is not None:
        return False
    mode = decode_mode()
    if mode == "0" or (meta is not None and mode != "1"):
        return False
    if meta is not None and not _plain_varlen(meta):
        return False
    seqlen_q = prob.max_seqlen_q if meta is not None else q.shape[1]
    num_keys = prob.max_seqlen_k if meta is not None else k.shape[1]
    return seqlen_q * (prob.nheads // prob.nheads_k) <= DECODE_MAX_ROWS and num_keys >= DECODE_MIN_KEYS


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prob: AttnProblem, meta: Optional[SeqMeta] = None,
    alibi_slopes: Optional[torch.Tensor] = None, dropout: Optional[tuple[float, int]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of one attention call, from the family ``use_decode`` picks."""
    if use_decode(q, k, prob, meta, dropout):
        _ran("fwd", "decode")
        if meta is not None:
            return _varlen_decode(q, k, v, prob, meta, alibi_slopes)
        return decode_forward(q, k, v, KeyRanges(offset=k.shape[1]), k.shape[1], prob, alibi_slopes=alibi_slopes)
    chosen = backend()
    if chosen != "portable" and sm90.supports(q, k, v, prob, meta, alibi_slopes, dropout) and \
            (chosen == "sm90" or sm90.preferred(prob, dropout)):
        result = sm90.run_or_disable(sm90.attention_forward_sm90, q, k, v, prob, dropout=dropout, meta=meta)
        if result is not None:
            _ran("fwd", "sm90")
            return result
    _ran("fwd", "portable")
    return attention_forward(q, k, v, prob, meta, alibi_slopes=alibi_slopes, dropout=dropout)


def _varlen_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prob: AttnProblem, meta: SeqMeta,
                   alibi_slopes: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A plain varlen call through the decode kernels: the packed keys as one cache row that
    every sequence indexes from its cu_seqlens_k start (seqused_k, when given, counts its
    keys); the row is broadcast over the batch (stride 0), so no row index is needed.
    Returns varlen out and lse (nheads, total_q)."""
    cu = meta.cu_seqlens_k
    keys = KeyRanges(cu, meta.seqused_k[0]) if meta.seqused_k is not None else KeyRanges(cu, cu[1:], 0, cu)
    k_row, v_row = (t.unsqueeze(0).expand(meta.batch, -1, -1, -1) for t in (k, v))
    return decode_forward(q, k_row, v_row, keys, prob.max_seqlen_k, prob, alibi_slopes=alibi_slopes,
                          q_bounds=(meta.q_starts[0], meta.q_ends[0]))


def backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    prob: AttnProblem, meta: Optional[SeqMeta] = None, alibi_slopes: Optional[torch.Tensor] = None,
    dropout: Optional[tuple[float, int]] = None, atomic_dq: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of one attention call, from the family the module docstring names;
    ``atomic_dq``: the 5-GEMM backward (dQ by atomics) of either family."""
    # A gradient that is not contiguous (an expanded one, as out.sum() gives, or a strided
    # view) is copied once: the kernels' load layouts follow the strides' divisibility, and
    # with them the order in which a float32 dot (on FMAs) sums, so dQ and dK would differ
    # in the last bit from a run on the same values laid out contiguously (run 38,
    # test_properties::test_gpu_dense_layouts); the Gluon kernels cannot read a stride 0.
    dout = dout.contiguous()
    chosen = backend()
    if chosen != "portable" and sm90.supports(q, k, v, prob, meta, alibi_slopes, dropout) and \
            (chosen == "sm90" or sm90.preferred(prob, dropout, "bwd")):
        # Under the default backend the deterministic Gluon backward runs even where atomic_dq
        # asks for the 5-GEMM one: run 38 timed it 1.3-1.6x faster than the Gluon atomic one
        # (a speed request, so the faster deterministic kernel answers it).
        result = sm90.run_or_disable(sm90.attention_backward_sm90, dout, q, k, v, out, lse, prob, dropout=dropout,
                                     atomic_dq=atomic_dq and chosen == "sm90", meta=meta)
        if result is not None:
            _ran("bwd", "sm90")
            return result
    _ran("bwd", "portable")
    return attention_backward(dout, q, k, v, out, lse, prob, meta, alibi_slopes=alibi_slopes, dropout=dropout,
                              atomic_dq=atomic_dq)
