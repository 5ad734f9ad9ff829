"""The Triton kernels registered as ``torch.library`` custom ops, with fake (meta)
implementations, so that models calling them compile under ``torch.compile(fullgraph=True)``
without graph breaks.

``ringflash::attn_fwd`` -> (out, lse) and ``ringflash::attn_bwd`` -> (dq, dk, dv); for
inference, ``ringflash::kvcache_fwd`` (``flash_attn_with_kvcache``; mutates the caches) and
``ringflash::paged_fwd`` (``flash_attn_varlen_func`` with ``block_table``). Dense
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

from .kernels import configs, dispatch
from .kernels.common import grad_buffer
from .kernels.decode import KeyRanges, append_to_cache, cache_capacity, decode_forward
from .kernels.guard import poison_if_invalid
from .kernels.problem import AttnProblem, SeqMeta, make_problem
from .rotary import apply_rotary, rotary_rows


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
    dq, dk, dv = dispatch.backward(dout, q, k, v, out, lse, prob, meta, alibi_slopes=alibi_slopes,
                                   dropout=_dropout(dropout_p, dropout_seed),
                                   atomic_dq=configs.use_atomic_dq(deterministic))
    _guard(meta, q, k, prob, (dq, dk, dv))
    return dq, dk, dv


attn_bwd = torch.library.custom_op("ringflash::attn_bwd", mutates_args=())(_attn_bwd_impl)


@attn_bwd.register_fake
def _(dout, q, k, v, out, lse, q_starts, q_ends, cu_seqlens_k, seqused_k, diag, max_seqlen_q, max_seqlen_k,
      softmax_scale, causal, window_left, window_right, softcap, alibi_slopes=None, dropout_p=0.0, dropout_seed=None,
      deterministic=False):
    # Laid out as the real backward lays them out (the inputs' layout where the kernels can
    # write it): a compiled graph checks the strides (Inductor's assert_size_stride).
    token_dim = 1 if q_starts is None else 0
    return grad_buffer(q, token_dim), grad_buffer(k, token_dim), grad_buffer(v, token_dim)


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


def _paged_fwd_impl(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, seqused_k: Optional[torch.Tensor],
    max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, causal: bool, window_left: int, window_right: int,
    softcap: float, guard: bool = False, alibi_slopes: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ringflash::paged_fwd``: varlen queries against a paged KV cache (flash-attn's
    ``block_table``), forward only: the decode kernels with varlen query rows. Sequence b's
    keys are slots 0 .. ``seqused_k[b]`` (else ``cu_seqlens_k[b+1] - cu_seqlens_k[b]``) - 1
    of its pages. Rows of a sequence whose keys run past its pages or through a
    block-table entry outside the cache are NaN (found in the kernels, whose reads stay in
    the cache). Returns out like q and lse (nheads, total_q)."""
    meta = SeqMeta.from_cu_seqlens(cu_seqlens_q, cu_seqlens_k, seqused_k)
    prob = make_problem(q, k_cache, meta, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
                        window_right, softcap)
    cu_k = meta.cu_seqlens_k
    keys = KeyRanges(ends=meta.seqused_k[0]) if meta.seqused_k is not None else KeyRanges(None, cu_k[1:], 0, cu_k)
    q_starts, q_ends = meta.q_starts[0], meta.q_ends[0]
    out, lse = decode_forward(q, k_cache, v_cache, keys, max_seqlen_k, prob, block_table=block_table,
                              alibi_slopes=alibi_slopes, q_bounds=(q_starts, q_ends))
    if guard:
        poison_if_invalid(meta, q.shape[0], None, max_seqlen_q, max_seqlen_k, (out, lse))
    return out, lse


paged_fwd_op = torch.library.custom_op("ringflash::paged_fwd", mutates_args=())(_paged_fwd_impl)


@paged_fwd_op.register_fake
def _(q, k_cache, v_cache, block_table, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
      softmax_scale, causal, window_left, window_right, softcap, guard=False, alibi_slopes=None):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), q.new_empty(_lse_shape(q, True), dtype=torch.float32)


def paged_fwd(*args) -> tuple[torch.Tensor, torch.Tensor]:
    """``paged_fwd_op``: through the custom op while compiling, directly otherwise."""
    if torch.compiler.is_compiling():
        return torch.ops.ringflash.paged_fwd(*args)
    return _paged_fwd_impl(*args)


def _kvcache_fwd_impl(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k: Optional[torch.Tensor],
    v: Optional[torch.Tensor], rotary_cos: Optional[torch.Tensor], rotary_sin: Optional[torch.Tensor],
    cache_seqlens: Optional[torch.Tensor], cache_seqlens_int: int, cache_leftpad: Optional[torch.Tensor],
    cache_batch_idx: Optional[torch.Tensor], block_table: Optional[torch.Tensor], alibi_slopes: Optional[torch.Tensor],
    softmax_scale: float, causal: bool, window_left: int, window_right: int, softcap: float,
    rotary_interleaved: bool, num_splits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ringflash::kvcache_fwd``: ``flash_attn_with_kvcache`` after its checks (see there
    for the positions and the layouts): appends the new k/v (rotated) into the caches in
    place, rotates q, and runs the decode kernels. ``cache_seqlens`` int32 (batch,), or
    None for ``cache_seqlens_int`` keys in every sequence; ``cache_leftpad`` int32 (batch,)
    or None (0). Returns out like q and lse (batch, nheads, seqlen_q). A registered custom
    op that mutates the caches, so that a compiled decode step (``torch.compile``, CUDA
    graphs) keeps the call whole."""
    batch, seqlen_q = q.shape[0], q.shape[1]
    device = q.device
    capacity = cache_capacity(k_cache, block_table)
    seqlen_new = 0 if k is None else k.shape[1]
    rotary = rotary_cos is not None
    # Each sequence's first new slot, (batch, 1) or a broadcastable int (only for appending
    # and rotary: a plain decode step runs no elementwise op on the host).
    first_new = cache_seqlens_int
    if cache_seqlens is not None and (k is not None or rotary):
        first_new = cache_seqlens[:, None].long()
    if k is not None:
        new_slots = (first_new + torch.arange(seqlen_new, device=device)).expand(batch, seqlen_new)
        if rotary:  # positions are cache slots, left padding included, as in flash-attn
            k = apply_rotary(k, *rotary_rows(rotary_cos, rotary_sin, new_slots), rotary_interleaved)
        append_to_cache(k_cache, k, new_slots, block_table, cache_batch_idx)
        append_to_cache(v_cache, v, new_slots, block_table, cache_batch_idx)
    if rotary:
        offsets = torch.arange(seqlen_q, device=device)
        local = causal or window_left >= 0 or window_right >= 0
        positions = (first_new + (offsets if local else 0 * offsets)).expand(batch, seqlen_q)
        q = apply_rotary(q, *rotary_rows(rotary_cos, rotary_sin, positions), rotary_interleaved)
    prob = make_problem(q, k_cache, None, seqlen_q, capacity, softmax_scale, causal, window_left, window_right,
                        softcap)
    keys = KeyRanges(cache_leftpad, cache_seqlens, cache_seqlens_int + seqlen_new, cache_leftpad)
    # A bad device-side cache_seqlens / cache_leftpad / cache_batch_idx / block table (past
    # the cache, a pad past the length, a row or page outside it) gives that sequence NaN
    # inside the kernels, which stay in the cache (no host sync): fewer than seqlen_new keys
    # is a pad past the length.
    return decode_forward(q, k_cache, v_cache, keys, capacity, prob, cache_rows=cache_batch_idx,
                          block_table=block_table, alibi_slopes=alibi_slopes, num_splits=num_splits,
                          min_k_len=seqlen_new)


kvcache_fwd_op = torch.library.custom_op("ringflash::kvcache_fwd", mutates_args=("k_cache", "v_cache"))(
    _kvcache_fwd_impl)


@kvcache_fwd_op.register_fake
def _(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_seqlens_int, cache_leftpad,
      cache_batch_idx, block_table, alibi_slopes, softmax_scale, causal, window_left, window_right, softcap,
      rotary_interleaved, num_splits):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            q.new_empty(_lse_shape(q, False), dtype=torch.float32))


def kvcache(*args) -> tuple[torch.Tensor, torch.Tensor]:
    """``kvcache_fwd_op``: through the custom op while compiling, directly otherwise."""
    if torch.compiler.is_compiling():
        return torch.ops.ringflash.kvcache_fwd(*args)
    with torch.no_grad():
        return _kvcache_fwd_impl(*args)
