"""ring-flash-attn's functions, with its names and argument lists, on ringflash's plans and
kernels. Switching is an import change; every function takes this rank's local shard and
returns this rank's output (or (out, lse, None) with ``return_attn_probs``).

Layouts, as in ring-flash-attn (W = world size, r = rank):

* ring: each sequence cut into W chunks; rank r holds chunk r of every sequence.
* zigzag_ring, zigzag_llama3: each sequence cut into 2W chunks; rank r holds chunks r and
  2W-1-r of every sequence, in that order.
* stripe: token t of each sequence on rank t % W.
* llama3: the packed stream cut into W contiguous slices (``llama3_flash_attn_prepare_cu_seqlens``).

Dense functions take (batch, seqlen_local, nheads, d) and return lse (batch, nheads,
seqlen_local); varlen functions take (total_local, nheads, d) with ring-flash-attn's local
``cu_seqlens`` and return lse (nheads, total_local). Beyond ring-flash-attn: non-causal
attention for every strategy, sliding windows for ring, llama3 and zigzag_llama3, softcap
everywhere (keyword-only ``softcap``), gradients in the inputs' dtype (ring-flash-attn
rounds fp16 dq through bf16), float32 merging and gradient accumulation.
"""

from __future__ import annotations

import dataclasses

from collections import OrderedDict
from typing import Optional

import torch
import torch.distributed as dist

from .. import validation as V
from ..kernels.problem import SeqMeta
from .checks import SignatureChecks, call_signature
from .comm import Comm
from .engines import AllGatherAttention, AllGatherSpec
from .local import LocalParams
from .plan import Plan

# Plans are built once per batch and reused by every layer. They are found by the *values*
# of cu_seqlens, read on the host at every call (one small device-to-host read, a sync on a
# GPU): a buffer that a data loader refills in place (even behind the version counter, by
# ``.data``, a numpy view or ``dist.broadcast``) can then never reuse a stale plan. The
# cache is a small LRU and plans hold no reference to the caller's tensors, so nothing
# accumulates across steps. Build a ``Plan`` yourself for a path with no syncs at all.
_MAX_PLANS = 8
_plans: "OrderedDict[tuple, Plan]" = OrderedDict()


def _group_key(group) -> int:
    return id(group if group is not None else dist.group.WORLD)


def _cached_plan(key: tuple, build) -> Plan:
    plan = _plans.get(key)
    if plan is not None:
        _plans.move_to_end(key)
        return plan
    plan = build()
    _plans[key] = plan
    while len(_plans) > _MAX_PLANS:
        _plans.popitem(last=False)
    return plan


def _host_values(*tensors: torch.Tensor) -> list[list[int]]:
    """The values of small int32 tensors of one device, in one device-to-host read."""
    flat = torch.cat([t.reshape(-1) for t in tensors]).tolist()
    out, pos = [], 0
    for t in tensors:
        out.append(flat[pos:pos + t.numel()])
        pos += t.numel()
    return out


def _dense_plan(q: torch.Tensor, strategy: str, group) -> Plan:
    world = dist.get_world_size(group if group is not None else dist.group.WORLD)
    batch, s_local = q.shape[0], q.shape[1]

    def build():
        seqlen = s_local * world
        cu = torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=q.device)
        return Plan(cu, group, strategy)

    return _cached_plan(("dense", strategy, batch, s_local, str(q.device), _group_key(group)), build)


def _varlen_plan(cu_values: list[int], device: torch.device, strategy: str, group) -> Plan:
    """Plan from the global cu_seqlens values."""
    def build():
        return Plan(torch.tensor(cu_values, dtype=torch.int32, device=device), group, strategy)

    return _cached_plan(("varlen", strategy, tuple(cu_values), str(device), _group_key(group)), build)


def _options(dropout_p, alibi_slopes, deterministic, return_attn_probs, causal) -> tuple[bool, bool]:
    """Returns (causal, return_attn_probs) as bools."""
    V.check_unsupported(dropout_p, alibi_slopes)
    V.as_bool("deterministic", deterministic)
    return V.as_bool("causal", causal), V.as_bool("return_attn_probs", return_attn_probs)


def _run_dense(strategy, q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes, deterministic,
               return_attn_probs, group, softcap):
    causal, return_attn_probs = _options(dropout_p, alibi_slopes, deterministic, return_attn_probs, causal)
    shape = V.check_dense_qkv(q, k, v)
    if shape.seqlen_k != shape.seqlen_q:
        raise ValueError(f"k: local seqlen {shape.seqlen_k} differs from q's {shape.seqlen_q}; expected the same "
                         "(self-attention shards)")
    if strategy == "zigzag_ring" and shape.seqlen_q % 2:
        raise ValueError(f"q: local seqlen {shape.seqlen_q} is odd; expected zigzag_ring's two equal chunks per "
                         "rank (a global seqlen divisible by 2 x world_size)")
    plan = _dense_plan(q, strategy, group)
    flat = lambda x: x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])  # noqa: E731
    out, lse = plan.attention(flat(q), flat(k), flat(v), causal=causal, softmax_scale=softmax_scale,
                              window_size=window_size, softcap=softcap, return_lse=True)
    out = out.view(q.shape)
    if not return_attn_probs:
        return out
    return out, lse.view(shape.nheads, shape.batch, shape.seqlen_q).transpose(0, 1), None


def _run_varlen(strategy, q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, window_size,
                alibi_slopes, deterministic, return_attn_probs, group, softcap):
    causal, return_attn_probs = _options(dropout_p, alibi_slopes, deterministic, return_attn_probs, causal)
    V.check_varlen_qkv(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
    world = dist.get_world_size(group if group is not None else dist.group.WORLD)
    (local,) = _host_values(cu_seqlens)
    if strategy == "zigzag_ring" and any((b - a) % 2 for a, b in zip(local, local[1:])):
        raise ValueError(f"cu_seqlens: local lengths {[b - a for a, b in zip(local, local[1:])][:8]} include an odd "
                         "one; expected zigzag_ring's two equal chunks of each sequence per rank (global lengths "
                         "divisible by 2 x world_size)")
    plan = _varlen_plan([c * world for c in local], cu_seqlens.device, strategy, group)
    out, lse = plan.attention(q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                              softcap=softcap, return_lse=True)
    return (out, lse, None) if return_attn_probs else out


def _dense_family(strategy: str):
    def func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
             deterministic=False, return_attn_probs=False, group=None, *, softcap=0.0):
        return _run_dense(strategy, q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                          deterministic, return_attn_probs, group, softcap)

    def kvpacked(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
                 deterministic=False, return_attn_probs=False, group=None, *, softcap=0.0):
        V.check_rank("kv", kv, 5, "(batch, seqlen_local, 2, nheads_k, headdim)")
        return func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                    deterministic, return_attn_probs, group, softcap=softcap)

    def qkvpacked(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
                  deterministic=False, return_attn_probs=False, group=None, *, softcap=0.0):
        V.check_rank("qkv", qkv, 5, "(batch, seqlen_local, 3, nheads, headdim)")
        return func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size,
                    alibi_slopes, deterministic, return_attn_probs, group, softcap=softcap)

    return func, kvpacked, qkvpacked


def _varlen_family(strategy: str):
    def func(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
             alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None, *, softcap=0.0):
        return _run_varlen(strategy, q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal,
                           window_size, alibi_slopes, deterministic, return_attn_probs, group, softcap)

    def kvpacked(q, kv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                 window_size=(-1, -1), alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None,
                 *, softcap=0.0):
        V.check_rank("kv", kv, 4, "(total_local, 2, nheads_k, headdim)")
        return func(q, kv[:, 0], kv[:, 1], cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, window_size,
                    alibi_slopes, deterministic, return_attn_probs, group, softcap=softcap)

    def qkvpacked(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                  window_size=(-1, -1), alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None,
                  *, softcap=0.0):
        V.check_rank("qkv", qkv, 4, "(total_local, 3, nheads, headdim)")
        return func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal,
                    window_size, alibi_slopes, deterministic, return_attn_probs, group, softcap=softcap)

    return func, kvpacked, qkvpacked


ring_flash_attn_func, ring_flash_attn_kvpacked_func, ring_flash_attn_qkvpacked_func = _dense_family("ring")
(ring_flash_attn_varlen_func, ring_flash_attn_varlen_kvpacked_func,
 ring_flash_attn_varlen_qkvpacked_func) = _varlen_family("ring")
(zigzag_ring_flash_attn_func, zigzag_ring_flash_attn_kvpacked_func,
 zigzag_ring_flash_attn_qkvpacked_func) = _dense_family("zigzag_ring")
(zigzag_ring_flash_attn_varlen_func, zigzag_ring_flash_attn_varlen_kvpacked_func,
 zigzag_ring_flash_attn_varlen_qkvpacked_func) = _varlen_family("zigzag_ring")
stripe_flash_attn_func, stripe_flash_attn_kvpacked_func, stripe_flash_attn_qkvpacked_func = _dense_family("stripe")
(stripe_flash_attn_varlen_func, stripe_flash_attn_varlen_kvpacked_func,
 stripe_flash_attn_varlen_qkvpacked_func) = _varlen_family("stripe")


# -- llama3 -------------------------------------------------------------------------------


def llama3_flash_attn_prepare_cu_seqlens(cu_seqlens: torch.Tensor, causal: bool, rank: int, world_size: int):
    """Local metadata of rank ``rank`` when the packed stream (global ``cu_seqlens``) is cut
    into ``world_size`` equal contiguous slices. Returns (cu_seqlens_q, cu_seqlens_k,
    max_seqlen_q, max_seqlen_k, local_k_slice): the local sequences' query boundaries, their
    key boundaries within the gathered keys ``[local_k_slice]`` (keys from each sequence's
    start; up to the slice end when causal), and the maxima. Reads cu_seqlens on the host."""
    V.check_cu_seqlens_shape("cu_seqlens", cu_seqlens)
    cu = cu_seqlens.tolist()
    total = cu[-1]
    if total % world_size != 0:
        raise ValueError(f"cu_seqlens: total {total} is not divisible by world_size={world_size}; expected equal slices")
    n = total // world_size
    lo, hi = rank * n, (rank + 1) * n
    bounds = [c for c in cu if lo < c < hi]
    first = max(c for c in cu if c <= lo)  # start of the sequence that holds token lo
    last_end = min(c for c in cu if c >= hi)  # end of the sequence that holds token hi - 1
    q_bounds = [0] + [c - lo for c in bounds] + [n]
    k_bounds = [0] + [c - first for c in bounds] + [(hi if causal else last_end) - first]
    local_k_slice = slice(first, hi if causal else last_end)
    dev = cu_seqlens.device
    return (
        torch.tensor(q_bounds, dtype=torch.int32, device=dev),
        torch.tensor(k_bounds, dtype=torch.int32, device=dev),
        max(b - a for a, b in zip(q_bounds, q_bounds[1:])),
        max(b - a for a, b in zip(k_bounds, k_bounds[1:])),
        local_k_slice,
    )


def llama3_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads_k_stride,
                                  local_k_slice, dropout_p=0.0, softmax_scale=None, causal=False,
                                  window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                  return_attn_probs=False, group=None, *, softcap=0.0):
    """ring-flash-attn's llama3: q/k/v are this rank's contiguous slice of the packed stream;
    the metadata comes from ``llama3_flash_attn_prepare_cu_seqlens``. K/V are all-gathered
    ``heads_k_stride`` KV heads at a time, overlapped with compute.

    The metadata is checked against this rank's slice at every call (its values are read on
    the host): cu_seqlens_k must be cu_seqlens_q shifted by the keys that precede the slice,
    ``local_k_slice`` must end at the slice's end (causal) and max_seqlen_k must cover the
    longest key range. Every rank then checks collectively that the others agree."""
    comm = Comm(group)
    checks = _llama3_checks.setdefault(_group_key(group), SignatureChecks(
        comm, q.device if isinstance(q, torch.Tensor) else torch.device("cpu"),
        "q, k, v, metadata or options of llama3_flash_attn_varlen_func"))
    error: Optional[BaseException] = None
    signature: Optional[str] = None
    try:
        causal, return_attn_probs = _options(dropout_p, alibi_slopes, deterministic, return_attn_probs, causal)
        shape = V.check_varlen_qkv(q, k, v, cu_seqlens_q, cu_seqlens_q, max_seqlen_q, max_seqlen_q)
        V.check_cu_seqlens_shape("cu_seqlens_k", cu_seqlens_k)
        V.check_same_device(("q", "cu_seqlens_k"), (q, cu_seqlens_k))
        max_seqlen_k = V.check_max_seqlen("max_seqlen_k", max_seqlen_k)
        left, right = V.check_window(window_size)
        softcap = V.check_softcap(softcap)
        stride = V.integer_value(heads_k_stride)
        if stride is None or stride < 1 or k.shape[1] % stride != 0:
            raise ValueError(f"heads_k_stride: got {heads_k_stride!r}; expected a divisor of nheads_k={k.shape[1]}")
        key_slice = _check_llama3_metadata(cu_seqlens_q, cu_seqlens_k, max_seqlen_k, local_k_slice, causal,
                                           q.shape[0], comm)
        scale = V.resolve_softmax_scale(softmax_scale, q.shape[-1])
        signature = call_signature(q, k, v, (q.shape[0], causal, left, right, softcap, scale, stride))
    except (ValueError, TypeError, NotImplementedError) as exc:
        error = exc
    checks.check(signature, error)
    # Each query's own key (the diagonal that causal masks and windows count from): the
    # first local sequence's keys begin local_k_slice.start - rank n earlier than its
    # queries, later ones with them. Without causal the last sequence's keys run on to its
    # document's end, so bottom-right alignment (ring-flash-attn's, through flash-attn)
    # would shift its windows by the keys past the slice.
    meta = SeqMeta.from_cu_seqlens(cu_seqlens_q, cu_seqlens_k)
    offset = comm.rank * q.shape[0] - key_slice.start
    diag = torch.zeros((1, meta.batch), dtype=torch.int32)
    diag[0, :1] = offset
    meta = dataclasses.replace(meta, diag=diag.to(q.device, non_blocking=True))
    spec = AllGatherSpec(
        meta=meta, n_max=q.shape[0], max_q=shape.max_seqlen_q, max_k=max_seqlen_k, key_slice=key_slice,
    )
    params = LocalParams(scale, causal, left, 0 if causal else right, softcap)
    out, lse = AllGatherAttention.apply(q, k, v, spec, params, comm, stride, "grouped")
    return (out, lse, None) if return_attn_probs else out


#: The cross-rank checks of llama3_flash_attn_varlen_func, per process group.
_llama3_checks: dict[int, SignatureChecks] = {}


def _check_llama3_metadata(cu_q: torch.Tensor, cu_k: torch.Tensor, max_seqlen_k: Optional[int], key_slice: object,
                           causal: bool, n: int, comm: Comm) -> slice:
    """The facts ``llama3_flash_attn_prepare_cu_seqlens`` guarantees for rank r, whose queries
    are tokens [r n, (r + 1) n) of the stream: keys are ``[start, stop)`` of the gathered
    stream with start <= r n, the first sequence's keys begin ``offset = r n - start``
    earlier than its queries (every later boundary sits ``offset`` further in the keys),
    and the keys end at the slice's end (causal) or at the end of its last sequence."""
    if not isinstance(key_slice, slice):
        raise TypeError(f"local_k_slice: expected a slice, got {type(key_slice).__name__}")
    start, stop = V.integer_value(key_slice.start), V.integer_value(key_slice.stop)
    if start is None or stop is None or key_slice.step not in (None, 1):
        raise ValueError(f"local_k_slice: got {key_slice}; expected slice(start, stop) of ints with step 1")
    if cu_k.shape[0] != cu_q.shape[0]:
        raise ValueError(f"cu_seqlens_k: has {cu_k.shape[0]} entries but cu_seqlens_q has {cu_q.shape[0]}; "
                         "expected one key range per local sequence")
    q_vals, k_vals = _host_values(cu_q, cu_k)
    lo, hi, total = comm.rank * n, (comm.rank + 1) * n, comm.world_size * n
    if not (0 <= start <= lo and hi <= stop <= total and (stop == hi or not causal)):
        end = f"== {hi}" if causal else f"in [{hi}, {total}]"
        raise ValueError(f"local_k_slice: got {key_slice}; expected start in [0, {lo}] and stop {end} for rank "
                         f"{comm.rank}'s tokens [{lo}, {hi}) (llama3_flash_attn_prepare_cu_seqlens)")
    offset = lo - start
    expected = [0] + [c + offset for c in q_vals[1:-1]] + [stop - start]
    if k_vals != expected:
        raise ValueError(f"cu_seqlens_k: got {k_vals[:8]}...; expected cu_seqlens_q's boundaries shifted by the "
                         f"{offset} keys before this rank's slice, ending at the slice length {stop - start}: "
                         f"{expected[:8]}...")
    longest = max([b - a for a, b in zip(k_vals, k_vals[1:])] + [0])
    if max_seqlen_k is None or max_seqlen_k < longest:
        raise ValueError(f"max_seqlen_k: got {max_seqlen_k}; expected >= {longest}, the longest key range of "
                         "cu_seqlens_k")
    return slice(start, stop)


def llama3_flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                           heads_k_stride, local_k_slice, dropout_p=0.0, softmax_scale=None,
                                           causal=False, window_size=(-1, -1), alibi_slopes=None,
                                           deterministic=False, return_attn_probs=False, group=None, *, softcap=0.0):
    V.check_rank("kv", kv, 4, "(total_local, 2, nheads_k, headdim)")
    return llama3_flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                         max_seqlen_k, heads_k_stride, local_k_slice, dropout_p, softmax_scale, causal,
                                         window_size, alibi_slopes, deterministic, return_attn_probs, group,
                                         softcap=softcap)


def llama3_flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                            heads_k_stride, local_k_slice, dropout_p=0.0, softmax_scale=None,
                                            causal=False, window_size=(-1, -1), alibi_slopes=None,
                                            deterministic=False, return_attn_probs=False, group=None, *, softcap=0.0):
    V.check_rank("qkv", qkv, 4, "(total_local, 3, nheads, headdim)")
    return llama3_flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                         max_seqlen_k, heads_k_stride, local_k_slice, dropout_p, softmax_scale, causal,
                                         window_size, alibi_slopes, deterministic, return_attn_probs, group,
                                         softcap=softcap)


# -- zigzag_llama3 (the fork's signature) ----------------------------------------------------


def zigzag_llama3_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                         heads_k_stride, local_k_slice=None, dropout_p=0.0, softmax_scale=None,
                                         causal=False, window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                         return_attn_probs=False, group=None, n_chunks=2, *, mode=None, verify=None,
                                         softcap=0.0):
    """Zigzag sharding with llama3's all-gather, the local step on the grouped kernels.

    As in the fork: ``cu_seqlens_q`` is local (each sequence's 2 chunks on this rank) and
    ``cu_seqlens_k`` is the global layout; ``max_seqlen_*`` and ``local_k_slice`` are
    accepted for compatibility and not needed. ``mode``: "grouped" (default) or
    "two_kernels" (also RINGFLASH_ZIGZAG_MODE); ``verify`` recomputes with the other mode
    and raises on a mismatch (also RINGFLASH_ZIGZAG_VERIFY=1 or ZIGZAG_VERIFY_CORRECTNESS=1).
    """
    causal, return_attn_probs = _options(dropout_p, alibi_slopes, deterministic, return_attn_probs, causal)
    if n_chunks != 2:
        raise NotImplementedError(f"n_chunks: got {n_chunks}; ringflash's zigzag_llama3 supports 2 (chunks r and 2W-1-r)")
    V.check_varlen_qkv(q, k, v, cu_seqlens_q, cu_seqlens_q, None, None)
    V.check_cu_seqlens_shape("cu_seqlens_k", cu_seqlens_k)
    V.check_same_device(("q", "cu_seqlens_k"), (q, cu_seqlens_k))
    q_vals, k_vals = _host_values(cu_seqlens_q, cu_seqlens_k)
    plan = _varlen_plan(k_vals, cu_seqlens_k.device, "zigzag_llama3", group)
    try:
        _check_local_layout(plan, q_vals)
        layout_error = None
    except ValueError as exc:  # raised after the plan's collective check, on every rank
        layout_error = exc
    out, lse = plan.attention(q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                              softcap=softcap, heads_k_stride=heads_k_stride, mode=mode, verify=verify,
                              return_lse=True, _caller_error=layout_error)
    return (out, lse, None) if return_attn_probs else out


def _check_local_layout(plan: Plan, cu_q_values: list[int]) -> None:
    """cu_seqlens_q must describe the plan's local layout."""
    expected = [0]
    for _, n in plan.segments[plan.rank]:
        expected.append(expected[-1] + n)
    if cu_q_values != expected:
        raise ValueError(f"cu_seqlens_q: got {cu_q_values[:8]}...; expected this rank's zigzag layout of "
                         f"cu_seqlens_k, {expected[:8]}...")


def zigzag_llama3_flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                  heads_k_stride, local_k_slice=None, dropout_p=0.0,
                                                  softmax_scale=None, causal=False, window_size=(-1, -1),
                                                  alibi_slopes=None, deterministic=False, return_attn_probs=False,
                                                  group=None, n_chunks=2, *, mode=None, verify=None, softcap=0.0):
    V.check_rank("kv", kv, 4, "(total_local, 2, nheads_k, headdim)")
    return zigzag_llama3_flash_attn_varlen_func(
        q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads_k_stride,
        local_k_slice, dropout_p, softmax_scale, causal, window_size, alibi_slopes, deterministic, return_attn_probs,
        group, n_chunks, mode=mode, verify=verify, softcap=softcap)


def zigzag_llama3_flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                   heads_k_stride, local_k_slice=None, dropout_p=0.0,
                                                   softmax_scale=None, causal=False, window_size=(-1, -1),
                                                   alibi_slopes=None, deterministic=False, return_attn_probs=False,
                                                   group=None, n_chunks=2, *, mode=None, verify=None, softcap=0.0):
    V.check_rank("qkv", qkv, 4, "(total_local, 3, nheads, headdim)")
    return zigzag_llama3_flash_attn_varlen_func(
        qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads_k_stride,
        local_k_slice, dropout_p, softmax_scale, causal, window_size, alibi_slopes, deterministic, return_attn_probs,
        group, n_chunks, mode=mode, verify=verify, softcap=softcap)


# -- ring-flash-attn's transformers helpers ---------------------------------------------------

_HF_ROUTE = ("ringflash does not patch transformers' flash-attention path (it would need the flash-attn package "
             "installed); register ringflash's own implementation instead: `import ringflash.integrations.hf as "
             "rf_hf; model.set_attn_implementation(rf_hf.register())`, then run each packed batch inside "
             "`with rf_hf.context_parallel(ringflash.cp.Plan(cu_seqlens, group, strategy='llama3')):` (the README's "
             "Hugging Face section)")


def substitute_hf_flash_attn(process_group, heads_k_stride):
    """ring-flash-attn's patch of transformers' flash-attention forward: not provided (see
    the error for ringflash's route)."""
    raise NotImplementedError(f"substitute_hf_flash_attn: {_HF_ROUTE}")


def update_ring_flash_attn_params(cu_seqlens, process_group):
    """ring-flash-attn's per-batch update for ``substitute_hf_flash_attn``: not provided
    (see the error for ringflash's route)."""
    raise NotImplementedError(f"update_ring_flash_attn_params: {_HF_ROUTE}")
