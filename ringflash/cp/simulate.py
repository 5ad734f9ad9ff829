"""Each rank's local attention of a W-rank context-parallel plan, run alone on one device.

For issue 18's balance measurement: ``simulate_rank(strategy, seqlens, W, r, heads, ...)``
builds rank r's share of a plan exactly as ``Plan`` builds it (the same pieces, the same
``SeqMeta`` / ``AllGatherSpec`` / ring steps, from plan.py's own functions and methods) and
returns a ``RankSim`` whose ``forward()`` and ``forward_backward()`` make that rank's
kernel calls (``local.local_forward`` / ``local.local_backward``) on random tensors of the
rank's shapes:

* all-gather strategies (llama3, zigzag_llama3, balanced): the local queries against a
  gathered K/V buffer of every token (the engine's packed (total, 2, nheads_k, d) layout),
  dK/dV into the float32 rank-major buffer through ``key_index``, as the engine does;
* ring strategies (ring, zigzag_ring, stripe): the W steps' calls against a K/V block of
  ``n_max`` rows (steps that see no key are skipped, as in the engine);
* ulysses: the unsplit varlen kernel over every document for nheads/W query heads (and
  their KV heads), on the all-to-all's packed q | k | v layout;
* hybrid (``ulysses_degree`` u): the all-gather call of the rank's Ulysses group (the
  group's zigzag stream) for nheads/u heads against the keys of all W/u groups.

What is *not* simulated: communication (all-gathers, reduce-scatters, P2P, all-to-alls),
and the engines' own elementwise work around the kernels (packing K/V, reordering the
gathered keys, the ring's lse merges and float32 accumulations, casts). The times measure
the compute balance of the layouts, not a CP step.

No process group is needed. ``RankSim.kernel_pairs`` counts the causal (query, key) pairs
of the metadata actually passed to the kernels (weighted by the rank's share of the query
heads); it equals ``cost.layout_work``'s count of the rank's pieces (``model_pairs``),
which the tests check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..kernels.bwd import prepare_backward
from ..kernels.problem import SeqMeta
from ..validation import resolve_softmax_scale
from .cost import Heads, Machine, call_shape, choose, layout_work, predict
from .engines import AllGatherSpec
from .layout import (
    BALANCED_MIN_PIECE, RING_STRATEGIES, STRATEGIES, CostModel, Piece, balanced_layout, rank_pieces,
)
from .local import LocalParams, local_backward, local_forward
from .plan import ALL_GATHER_STRATEGIES, Plan, _allgather_spec, _check_min_piece, zigzag_mode
from .ulysses import check_heads


class Unsupported(NotImplementedError):
    """The strategy cannot run these heads or this world size (a benchmark's "unsupported")."""


class _RankPlan(Plan):
    """A ``Plan``'s layout and metadata for rank ``rank`` of a ``world_size``-rank group,
    without a process group: the metadata methods (``_allgather_spec``, ``_ring_steps``)
    run unchanged, and so does ``Plan._build_layout`` (``Plan.__init__`` itself needs a
    process group for its checks and the hybrid sub-communicators; tests compare the two)."""

    def __init__(self, seqlens: list[int], world_size: int, rank: int, strategy: str,
                 ulysses_degree: Optional[int] = None, min_piece: Optional[int] = None,
                 heads: Optional[Heads] = None, device: torch.device = torch.device("cpu"),
                 requested: Optional[str] = None, why: str = "requested"):
        self.rank, self.world_size = rank, world_size
        self.strategy, self.requested_strategy, self.why = strategy, requested or strategy, why
        self.heads = heads
        self.ulysses_degree = self._check_degree(strategy, ulysses_degree)
        self.min_piece = _check_min_piece(strategy, min_piece)
        self.seqlens = list(seqlens)
        cu = [0]
        for n in self.seqlens:
            cu.append(cu[-1] + n)
        self._build_layout(cu, torch.device(device))
        self._cache: dict[tuple, object] = {}


def resolve_strategy(strategy: str, seqlens: list[int], world_size: int, heads: Heads,
                     min_piece: Optional[int] = None) -> tuple[str, str, Optional[int]]:
    """(strategy, why, min_piece) as ``Plan`` resolves them: ``auto`` becomes
    ``cost.choose``'s pick (with ``heads`` given, so ulysses is a candidate)."""
    if strategy not in STRATEGIES + ("auto",):
        raise ValueError(f"strategy: got {strategy!r}; expected auto or one of {', '.join(STRATEGIES)}")
    if strategy != "auto":
        return strategy, "requested", min_piece
    choice = choose(seqlens, world_size, heads, min_piece=_check_min_piece("balanced", min_piece))
    return choice.strategy, choice.why, (min_piece if choice.strategy == "balanced" else None)


def entry_pairs(nq: int, diag: int, used: int) -> int:
    """Causal (query, key) pairs of one metadata entry: query row i (0 <= i < nq) sees the
    keys j < used with j <= i + diag."""
    a = diag + 1  # row i sees min(used, max(0, i + a)) keys
    i0 = min(nq, max(0, -a))
    i1 = min(nq, max(i0, used - a))
    # rows [i0, i1) see i + a keys; rows [i1, nq) see all ``used``
    return (i1 - i0) * a + (i1 * (i1 - 1) - i0 * (i0 - 1)) // 2 + (nq - i1) * used


def meta_pairs(meta: SeqMeta) -> int:
    """Causal pairs of every entry of ``meta`` (causal attention; ``diag`` None is the
    bottom-right alignment)."""
    starts, ends = meta.q_starts.tolist(), meta.q_ends.tolist()
    cu = meta.cu_seqlens_k.tolist()
    used = meta.seqused_k.tolist() if meta.seqused_k is not None else None
    diag = meta.diag.tolist() if meta.diag is not None else None
    total = 0
    for g in range(len(starts)):
        for b in range(len(cu) - 1):
            nq = ends[g][b] - starts[g][b]
            sk = cu[b + 1] - cu[b]
            u = used[g][b] if used is not None else sk
            d = diag[g][b] if diag is not None else sk - nq
            if nq > 0 and u > 0:
                total += entry_pairs(nq, d, u)
    return total


def model_work(strategy: str, seqlens: list[int], world_size: int, heads: Heads, min_piece: int = BALANCED_MIN_PIECE,
               ulysses_degree: Optional[int] = None, model: CostModel = CostModel()) -> list[float]:
    """The cost model's work per rank (``model`` units: causal pairs by default), in units
    of all nheads query heads: ``cost.predict``'s ``work`` for the strategies it covers
    (``layout_work`` of the rank's pieces; ulysses: every document's work / W). hybrid:
    the rank's Ulysses group's zigzag stream, for nheads / u heads. The call terms
    (``CostModel.call_cost``) count the whole batch's keys and documents (all-gather and
    ring strategies), for nheads / W heads (ulysses, one query group) or nheads / u
    (hybrid, zigzag's two groups), with ``cost.call_shape``'s query groups."""
    w = world_size
    total = sum(seqlens)
    if strategy == "hybrid":
        u = ulysses_degree
        if u is None or w % u:
            raise Unsupported(f"ulysses_degree: got {u!r}; expected a divisor of world_size={w}")
        streams = [rank_pieces("zigzag_llama3", seqlens, g, w // u) for g in range(w // u)]
        groups, documents = call_shape("zigzag_llama3", streams, len(seqlens))
        work = layout_work(streams, model, key_rows=total, documents=documents, groups=groups)
        return [work[r // u] / u for r in range(w)]
    if strategy == "ulysses":
        whole = layout_work([[Piece(i, 0, n)] for i, n in enumerate(seqlens)], model)
        return [(sum(whole) + model.call_cost(total, len(seqlens), 1)) / w] * w
    if model == CostModel():
        return list(predict(strategy, seqlens, w, heads, min_piece=min_piece).work)
    pieces = balanced_layout(seqlens, w, min_piece) if strategy == "balanced" else \
        [rank_pieces(strategy, seqlens, r, w) for r in range(w)]
    groups, documents = call_shape(strategy, pieces, len(seqlens))
    return layout_work(pieces, model, key_rows=total, documents=documents, groups=groups)


def predicted_ms(pairs: float, heads: Heads, machine: Machine = Machine()) -> float:
    """``cost.predict``'s compute time of ``pairs`` causal pairs (all query heads)."""
    return pairs * 4.0 * heads.headdim * heads.nheads / machine.tflops / 1e9


@dataclass
class RankSim:
    """Rank ``rank``'s local attention work; ``forward()`` / ``forward_backward()`` run it."""

    strategy: str
    world_size: int
    rank: int
    tokens: int  # tokens the rank holds (Plan.num_local_tokens)
    q_rows: int  # query rows of its kernel calls (ulysses, hybrid: the whole stream it attends)
    key_rows: int  # rows of the K/V buffer its calls read
    q_heads: int  # query heads of its kernel calls
    calls: int  # local_forward calls of one forward
    query_groups: int  # query groups of each call's metadata
    kernel_pairs: float  # causal pairs of the calls' metadata, in units of all query heads
    forward: Callable[[], None] = field(repr=False)
    forward_backward: Callable[[], None] = field(repr=False)


def _rand(shape, dtype, device, gen) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.float32, device=device, generator=gen).to(dtype)


def _allgather_runner(q: torch.Tensor, kv: torch.Tensor, spec: AllGatherSpec, params: LocalParams, mode: str,
                      world: int, dtype, device, gen, dq: Optional[torch.Tensor] = None) -> tuple[Callable, Callable]:
    """The all-gather engine's kernel calls (one KV-head chunk): ``q`` against the gathered
    ``kv`` (total, 2, hk, d); dK/dV float32 in the rank-major buffer of ``world * n_max``
    rows; dQ into ``dq`` (default a new contiguous buffer)."""
    if getattr(spec, "local", None) is not None:
        # A spec that splits off the rank's own keys needs that call (and the merge) too.
        raise Unsupported("the all-gather spec has a local-first part, which this simulation does not run yet")
    n, h, d = q.shape
    hk = kv.shape[2]
    kc, vc = kv[:, 0], kv[:, 1]
    out = torch.empty(q.shape, dtype=dtype, device=device)
    lse = torch.empty(h, n, dtype=torch.float32, device=device)
    dout = _rand((n, h, d), dtype, device, gen)
    dq = torch.empty(q.shape, dtype=dtype, device=device) if dq is None else dq
    prob = params.problem(q, kc, spec.meta, spec.max_q, spec.max_k)

    def forward() -> None:
        local_forward(q, kc, vc, spec.meta, params, spec.max_q, spec.max_k, out=out, lse=lse, mode=mode)

    def forward_backward() -> None:
        forward()
        delta, lse2 = prepare_backward(dout, out, lse, prob)
        dkv = torch.empty((world * spec.n_max, 2, hk, d), dtype=torch.float32, device=device)
        local_backward(dout, q, kc, vc, out, lse, spec.meta, params, spec.max_q, spec.max_k, dq=dq, dk=dkv[:, 0],
                       dv=dkv[:, 1], prepared=(delta, lse2), mode=mode, dkv_rows=spec.key_index)

    return forward, forward_backward


def simulate_rank(strategy: str, seqlens: list[int], world_size: int, rank: int, heads: Heads = Heads(),
                  dtype: torch.dtype = torch.bfloat16, device="cuda", *, ulysses_degree: Optional[int] = None,
                  min_piece: Optional[int] = None, seed: int = 0) -> RankSim:
    """Rank ``rank``'s kernel calls of a ``world_size``-rank plan of ``strategy`` (not
    ``auto``: resolve it first with ``resolve_strategy``) on random inputs: causal,
    ``Plan.attention``'s defaults (all KV heads gathered at once, the default zigzag mode).
    Raises ``Unsupported`` where the plan could not run these heads."""
    device = torch.device(device)
    w, h, hk, d = world_size, heads.nheads, heads.nheads_k, heads.headdim
    if strategy in ("ulysses", "hybrid"):
        u = w if strategy == "ulysses" else ulysses_degree
        if u is None or u < 1 or w % u:
            raise Unsupported(f"ulysses_degree: got {u!r}; expected a divisor of world_size={w}")
        try:
            split = check_heads(h, hk, u, "world_size" if strategy == "ulysses" else "ulysses_degree")
        except ValueError as exc:
            raise Unsupported(str(exc)) from None
    plan = _RankPlan(seqlens, w, rank, strategy, ulysses_degree=ulysses_degree if strategy == "hybrid" else None,
                     min_piece=min_piece if strategy == "balanced" else None, heads=heads, device=device)
    gen = torch.Generator(device=device).manual_seed(seed * 1000003 + rank)
    # As Plan.attention: causal turns the window's right side to 0.
    params = LocalParams(resolve_softmax_scale(None, d), True, -1, 0, 0.0)
    zigzag = strategy in ("zigzag_llama3", "hybrid", "balanced")
    mode = zigzag_mode(None) if zigzag else "grouped"
    n = plan.num_local[rank]
    common = dict(strategy=strategy, world_size=w, rank=rank, tokens=n)

    if strategy in ALL_GATHER_STRATEGIES:
        spec = plan._allgather_spec()
        q = _rand((n, h, d), dtype, device, gen)
        kv = _rand((plan.total, 2, hk, d), dtype, device, gen)  # the gathered keys, in global order
        fwd, fwd_bwd = _allgather_runner(q, kv, spec, params, mode, w, dtype, device, gen)
        return RankSim(**common, q_rows=n, key_rows=plan.total, q_heads=h, calls=1,
                       query_groups=spec.meta.num_groups, kernel_pairs=float(meta_pairs(spec.meta)), forward=fwd,
                       forward_backward=fwd_bwd)

    if strategy == "hybrid":
        u = split.degree
        across = w // u
        streams = [rank_pieces("zigzag_llama3", plan.seqlens, g, across) for g in range(across)]
        spec = _allgather_spec(streams, rank // u, plan.seqlens, plan.cu_seqlens, 2)
        m = sum(p.length for p in streams[rank // u])
        hq, hkl = split.q_local, split.kv_local
        qkv = _rand((m, hq + 2 * hkl, d), dtype, device, gen)  # the all-to-all's packed q | k | v
        kv = _rand((plan.total, 2, hkl, d), dtype, device, gen)
        # The backward's dq: a view of the q | k | v gradient buffer that goes back by all-to-all
        # (dK/dV are float32 there with KV heads shared by several ranks).
        grads = torch.empty((m, hq + (0 if split.replicated else 2 * hkl), d), dtype=dtype, device=device)
        fwd, fwd_bwd = _allgather_runner(qkv[:, :hq], kv, spec, params, mode, across, dtype, device, gen,
                                         dq=grads[:, :hq])
        return RankSim(**common, q_rows=m, key_rows=plan.total, q_heads=hq, calls=1,
                       query_groups=spec.meta.num_groups, kernel_pairs=meta_pairs(spec.meta) * hq / h, forward=fwd,
                       forward_backward=fwd_bwd)

    if strategy == "ulysses":
        total = plan.total
        hq, hkl = split.q_local, split.kv_local
        meta = SeqMeta.from_cu_seqlens(plan.cu_seqlens, plan.cu_seqlens)
        longest = max(plan.seqlens + [1])
        qkv = _rand((total, hq + 2 * hkl, d), dtype, device, gen)
        q, k, v = qkv[:, :hq], qkv[:, hq:hq + hkl], qkv[:, hq + hkl:]
        out = torch.empty(q.shape, dtype=dtype, device=device)
        lse = torch.empty(hq, total, dtype=torch.float32, device=device)
        dout = _rand((total, hq, d), dtype, device, gen)
        # The backward's gradients: one q | k | v buffer, or float32 dK/dV for shared KV heads.
        dkv_dtype = torch.float32 if split.replicated else dtype

        def forward() -> None:
            local_forward(q, k, v, meta, params, longest, longest, out=out, lse=lse)

        def forward_backward() -> None:
            forward()
            if dkv_dtype == dtype:
                grads = torch.empty((total, hq + 2 * hkl, d), dtype=dtype, device=device)
                dq, dkv = grads[:, :hq], grads[:, hq:]
            else:
                dq = torch.empty((total, hq, d), dtype=dtype, device=device)
                dkv = torch.empty((total, 2 * hkl, d), dtype=dkv_dtype, device=device)
            local_backward(dout, q, k, v, out, lse, meta, params, longest, longest, dq=dq, dk=dkv[:, :hkl],
                           dv=dkv[:, hkl:])

        return RankSim(**common, q_rows=total, key_rows=total, q_heads=hq, calls=1,
                       query_groups=meta.num_groups, kernel_pairs=meta_pairs(meta) * hq / h, forward=forward,
                       forward_backward=forward_backward)

    if strategy in RING_STRATEGIES:
        steps = [s for s in plan._ring_steps(True, -1, 0) if not s.skip]
        q = _rand((n, h, d), dtype, device, gen)
        kv = _rand((plan.n_max, 2, hk, d), dtype, device, gen)  # the block visiting at a step
        dout = _rand((n, h, d), dtype, device, gen)
        # The backward reads the merged forward's out and lse: any finite values will do.
        out = _rand((n, h, d), dtype, device, gen)
        lse = torch.full((h, n), 8.0, dtype=torch.float32, device=device)

        def forward() -> None:
            for step in steps:
                out_s = torch.empty(n, h, d, dtype=torch.float32, device=device)
                lse_s = torch.empty(h, n, dtype=torch.float32, device=device)
                if not step.covers_all:
                    out_s.zero_()
                    lse_s.fill_(float("-inf"))
                local_forward(q, kv[:, 0], kv[:, 1], step.meta, params, step.max_q, step.max_k, out=out_s, lse=lse_s)

        def forward_backward() -> None:
            forward()
            if not steps:
                return
            prob = params.problem(q, kv[:, 0], steps[0].meta, steps[0].max_q, steps[0].max_k)
            prepared = prepare_backward(dout, out, lse, prob)
            for step in steps:
                dq_s = (torch.zeros if not step.covers_all else torch.empty)(n, h, d, dtype=torch.float32,
                                                                            device=device)
                dkv_s = torch.empty(kv.shape, dtype=torch.float32, device=device)
                local_backward(dout, q, kv[:, 0], kv[:, 1], out, lse, step.meta, params, step.max_q, step.max_k,
                               dq=dq_s, dk=dkv_s[:, 0], dv=dkv_s[:, 1], prepared=prepared)

        return RankSim(**common, q_rows=n, key_rows=plan.n_max, q_heads=h, calls=len(steps),
                       query_groups=max([s.meta.num_groups for s in steps] + [1]),
                       kernel_pairs=float(sum(meta_pairs(s.meta) for s in steps)), forward=forward,
                       forward_backward=forward_backward)
    raise ValueError(f"strategy: got {strategy!r}; expected one of {', '.join(STRATEGIES)}")


__all__ = ["RING_STRATEGIES", "RankSim", "Unsupported", "entry_pairs", "meta_pairs", "model_work", "predicted_ms",
           "resolve_strategy", "simulate_rank"]
