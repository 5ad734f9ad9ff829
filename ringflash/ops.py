"""The Triton kernels registered as ``torch.library`` custom ops, with fake (meta)
implementations, so that models calling them compile under ``torch.compile(fullgraph=True)``
without graph breaks.

``ringflash::attn_fwd`` -> (out, lse) and ``ringflash::attn_bwd`` -> (dq, dk, dv). Dense
when ``q_starts`` is None; varlen or grouped otherwise, with the metadata of
``ringflash.kernels.problem.SeqMeta`` (q_starts, q_ends, seqused_k, diag: (groups, batch)
int32; cu_seqlens_k: (batch + 1,)). Layouts as in ``ringflash.interface``.

``guard`` (plain varlen only): the host did not check the cu_seqlens values at this call,
so the forward checks them on the device after its kernel (``ringflash.kernels.guard``)
and turns its outputs into NaN if they are invalid. The backward always does, since the
metadata it reads may have been refilled since the forward.

Eager calls skip the dispatcher (``fwd``/``bwd`` below call the implementations directly):
the custom op only matters while ``torch.compile`` traces, and on a slow host its dispatch
cost about 70 us per call.
"""

from __future__ import annotations

from typing import Optional

import torch

from .kernels.bwd import attention_backward
from .kernels import configs, dispatch
from .kernels.decode import decode_forward
from .kernels.guard import poison_if_invalid
from .kernels.problem import AttnProblem, SeqMeta, make_problem


def _guard(meta: Optional[SeqMeta], q: torch.Tensor, k: torch.Tensor, prob: AttnProblem,
           outputs: tuple[torch.Tensor, ...]) -> None:
    """The device-side metadata check of a plain varlen call (see the module doc)."""
    if meta is not None and meta.num_groups == 1 and meta.diag is None:
        poison_if_invalid(meta, q.shape[0], k.shape[0], prob.max_seqlen_q, prob.max_seqlen_k, outputs)


def _dropout(dropout_p: float, dropout_seed: Optional[torch.Tensor]) -> Optional[tuple[float, int]]:
    """(probability, seed) for the launchers. The seed travels as a CPU int64 tensor (drawn
    from PyTorch's generator by the caller, so torch.manual_seed reproduces a run, and a
    runtime value under torch.compile); reading it costs no device sync."""
    if dropout_p == 0.0:
        return None
    return dropout_p, int(dropout_seed.item())


def _meta(q_starts, q_ends, cu_seqlens_k, seqused_k, diag) -> Optional[SeqMeta]:
    return None if q_starts is None else SeqMeta(q_starts, q_ends, cu_seqlens_k, seqused_k, diag)


def _lse_shape(q: torch.Tensor, is_varlen: bool) -> tuple[int, ...]:
    return (q.shape[1], q.shape[0]) if is_varlen else (q.shape[0], q.shape[2], q.shape[1])


def _attn_fwd_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_starts: Optional[torch.Tensor],
    q_ends: Optional[torch.Tensor],
    cu_seqlens_k: Optional[torch.Tensor],
    seqused_k: Optional[torch.Tensor],
    diag: Optional[torch.Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    guard: bool = False,
    alibi_slopes: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    dropout_seed: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    meta = _meta(q_starts, q_ends, cu_seqlens_k, seqused_k, diag)
    prob = make_problem(q, k, meta, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap)
    out, lse = dispatch.forward(q, k, v, prob, meta, alibi_slopes=alibi_slopes,
                                dropout=_dropout(dropout_p, dropout_seed))
    if guard:
        _guard(meta, q, k, prob, (out, lse))
    return out, lse


attn_fwd = torch.library.custom_op("ringflash::attn_fwd", mutates_args=())(_attn_fwd_impl)


@attn_fwd.register_fake
def _(q, k, v, q_starts, q_ends, cu_seqlens_k, seqused_k, diag, max_seqlen_q, max_seqlen_k,
      softmax_scale, causal, window_left, window_right, softcap, guard=False, alibi_slopes=None, dropout_p=0.0,
      dropout_seed=None):
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = q.new_empty(_lse_shape(q, q_starts is not None), dtype=torch.float32)
    return out, lse


def _attn_bwd_impl(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    q_starts: Optional[torch.Tensor],
    q_ends: Optional[torch.Tensor],
    cu_seqlens_k: Optional[torch.Tensor],
    seqused_k: Optional[torch.Tensor],
    diag: Optional[torch.Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    dropout_seed: Optional[torch.Tensor] = None,
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    meta = _meta(q_starts, q_ends, cu_seqlens_k, seqused_k, diag)
    prob = make_problem(q, k, meta, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap)
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, prob, meta, alibi_slopes=alibi_slopes,
                                    dropout=_dropout(dropout_p, dropout_seed),
                                    atomic_dq=configs.use_atomic_dq(deterministic))
    _guard(meta, q, k, prob, (dq, dk, dv))
    return dq, dk, dv


attn_bwd = torch.library.custom_op("ringflash::attn_bwd", mutates_args=())(_attn_bwd_impl)


@attn_bwd.register_fake
def _(dout, q, k, v, out, lse, q_starts, q_ends, cu_seqlens_k, seqused_k, diag, max_seqlen_q, max_seqlen_k,
      softmax_scale, causal, window_left, window_right, softcap, alibi_slopes=None, dropout_p=0.0, dropout_seed=None,
      deterministic=False):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


def fwd(*args) -> tuple[torch.Tensor, torch.Tensor]:
    """``attn_fwd``: through the custom op while compiling, directly otherwise."""
    if torch.compiler.is_compiling():
        return torch.ops.ringflash.attn_fwd(*args)
    return _attn_fwd_impl(*args)


def bwd(*args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``attn_bwd``: through the custom op while compiling, directly otherwise."""
    if torch.compiler.is_compiling():
        return torch.ops.ringflash.attn_bwd(*args)
    return _attn_bwd_impl(*args)


def paged_fwd(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, meta: SeqMeta,
    max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, causal: bool, window_left: int, window_right: int,
    softcap: float, guard: bool = False, alibi_slopes: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Varlen queries against a paged KV cache (flash-attn's ``block_table``), forward only:
    the decode kernels with varlen query rows. Sequence b's keys are slots 0 ..
    ``seqused_k[b]`` (else ``cu_seqlens_k[b+1] - cu_seqlens_k[b]``) - 1 of its pages. Rows
    of a sequence whose keys run past its pages or through a block-table entry outside the
    cache are NaN (found in the kernels, whose reads stay in the cache). Not a
    custom op: like ``flash_attn_with_kvcache``, it is an eager inference call."""
    prob = make_problem(q, k_cache, meta, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
                        window_right, softcap)
    cu_k = meta.cu_seqlens_k
    k_len = meta.seqused_k[0] if meta.seqused_k is not None else cu_k[1:] - cu_k[:-1]
    k_start = torch.zeros_like(k_len)
    q_starts, q_ends = meta.q_starts[0], meta.q_ends[0]
    out, lse = decode_forward(q, k_cache, v_cache, k_start, k_len, max_seqlen_k, prob, block_table=block_table,
                              alibi_slopes=alibi_slopes, q_bounds=(q_starts, q_ends))
    if guard:
        poison_if_invalid(meta, q.shape[0], None, max_seqlen_q, max_seqlen_k, (out, lse))
    return out, lse
