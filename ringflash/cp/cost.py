"""Predicted cost of a context-parallel layout, and ``strategy="auto"``'s choice.

A strategy's training step (forward and backward) is modelled as its slowest rank's
attention work plus its communication:

* compute: ``Machine.step_model`` (``layout.CostModel``) over each rank's pieces and its
  kernel call, in units of one causal (query, key) pair: the pairs, plus terms per query
  row, per piece and per row of the K/V buffer the call reads *per query group* (the
  backward's dK/dV program of every key block loops over every query group of the call,
  empty ones included), times 4 x headdim x nheads FLOPs per pair, at
  ``Machine.step_tflops`` (forward FLOPs over the step's time). The forward alone has its
  own rate and model (``Machine.fwd_tflops``, ``fwd_model``: a term per (query group,
  document) entry of the call, whose programs fill the forward's launch grid, empty
  entries included, in place of the key rows). Both are fitted to every rank of run 35's
  ``bench cp --simulate`` on an H200 (balanced, zigzag_llama3, llama3, ulysses and hybrid,
  210 ranks: docs/measurements/2026-12-03-h200-bench-cp-simulate-run35.csv; ``ringflash
  bench cp --from-csv THAT.csv --fit`` prints the fit) and predict every rank within 6.3%
  (forward and backward; 6.1% for zigzag_llama3, 5.0% balanced) and 6.2% (forward). The
  previous step model charged the K/V rows once per rank (not per query group) and
  missed by up to 18.5% (balanced on short documents, under-predicted; llama3, one query
  group where zigzag_llama3 and balanced have two, over-predicted by up to 15%); pairs
  alone miss by up to 74%. The same constants predict runs 33 and 34 (other commits;
  run 33's balanced layout gave some ranks four query groups, 1.5x slower) within 8.9%
  and 5.9% (step), 11.0% and 5.6% (forward);
* all-gather strategies (llama3, zigzag_llama3, balanced): each rank receives the other
  ranks' K/V in the forward, again in the backward, and reduce-scatters float32 dK/dV;
* ulysses: all-to-alls of (W-1)/W of the local tokens' heads: q, k, v out and the output
  back in the forward, dout out and dq, dk, dv back in the backward; compute is every
  document for nheads / W heads, evenly split;
* communication counts whole, at ``Machine.link_gbs`` (the engines overlap some of it;
  how much is measured only on multi-GPU runs);
* ring strategies are not candidates: their layouts cut every document into W or 2W
  chunks, so their compute balance is zigzag_llama3's or worse, and the all-gather engine
  measured faster than the ring on the same layout.

The ``Machine`` defaults are H200 figures from this project's own runs; they are inputs to
a ranking, not measurements of a new machine. ``ringflash bench cp --simulate --fit``
calibrates them per GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .layout import (
    BALANCED_MIN_PIECE, RING_STRATEGIES, CostModel, Piece, balanced_layout, query_groups, rank_pieces,
)

#: The strategies ``auto`` chooses among (see the module doc for why not the ring ones).
AUTO_CANDIDATES = ("balanced", "zigzag_llama3", "llama3", "ulysses")


@dataclass(frozen=True)
class Machine:
    tflops: float = 400.0  # attention kernels, forward, counting causal pairs only (rough estimates)
    link_gbs: float = 200.0  # one rank's all-gather / all-to-all bandwidth beside compute
    #: The forward's and the training step's rates and cost models (see the module doc):
    #: H200, fitted to all 210 ranks of run 35's simulation (five strategies, W = 2, 4, 8;
    #: docs/measurements/2026-12-03-h200-bench-cp-simulate-run35.csv), largest rank error
    #: 6.2% (forward) and 6.3% (forward and backward).
    fwd_tflops: float = 480.7
    fwd_model: CostModel = CostModel(pair=1.0, row=408.0, piece=1.006e4, entry=3.075e4)
    step_tflops: float = 120.7
    step_model: CostModel = CostModel(pair=1.0, row=462.9, piece=2.588e4, group_key_row=99.93)


@dataclass(frozen=True)
class Heads:
    """What the model's attention looks like (defaults: Llama-3-8B, bf16)."""

    nheads: int = 32
    nheads_k: int = 8
    headdim: int = 128
    bytes_per_element: int = 2


@dataclass
class Prediction:
    """The modelled training step (forward and backward) of one strategy."""

    strategy: str
    tokens: list[int]  # per rank
    work: list[float]  # causal (query, key) pairs per rank
    compute_ms: float  # slowest rank, by Machine.step_model
    comm_ms: float
    feasible: bool = True
    note: str = ""

    @property
    def total_ms(self) -> float:
        return self.compute_ms + self.comm_ms

    @property
    def balance(self) -> float:
        """max / mean of the ranks' work (1.0: perfectly balanced)."""
        mean = sum(self.work) / len(self.work) if self.work else 0.0
        return max(self.work) / mean if mean else 1.0


def layout_work(pieces_by_rank: list[list[Piece]], model: CostModel = CostModel(), key_rows: float = 0.0,
                documents: float = 0, groups: Optional[list[int]] = None) -> list[float]:
    """Each rank's cost under ``model`` (causal pairs by default): its pieces, plus its
    kernel call's terms (``CostModel.call_cost``) for ``key_rows`` rows of the K/V buffer
    and ``documents`` documents, with ``groups[r]`` query groups on rank r (default: one
    per piece of a document, ``layout.query_groups``; ``call_shape`` gives a strategy's)."""
    return [sum(model.cost(p.start, p.length) if p.step == 1 else _strided_cost(p, model) for p in ps)
            + model.call_cost(key_rows, documents, query_groups("", ps) if groups is None else groups[r])
            for r, ps in enumerate(pieces_by_rank)]


def call_shape(strategy: str, pieces_by_rank: list[list[Piece]], num_docs: int) -> tuple[list[int], int]:
    """(query groups per rank, documents per rank's calls) of the engines' kernel calls:
    the all-gather call has ``layout.query_groups`` groups over every document; a ring
    rank makes W calls of one group over every document (not measured yet)."""
    w = len(pieces_by_rank)
    if strategy in RING_STRATEGIES:
        return [1] * w, w * num_docs
    return [query_groups(strategy, ps) for ps in pieces_by_rank], num_docs


def _strided_cost(p: Piece, model: CostModel) -> float:
    return model.piece_cost(float(sum(pos + 1 for pos in p.positions())), p.length)


def predict(strategy: str, seqlens: list[int], world_size: int, heads: Heads = Heads(),
            machine: Machine = Machine(), min_piece: int = BALANCED_MIN_PIECE) -> Prediction:
    """The modelled training step of ``strategy`` on this batch (see the module doc)."""
    w = world_size
    total = sum(seqlens)
    flops_per_pair = 4.0 * heads.headdim * heads.nheads
    ms_per_unit = flops_per_pair / machine.step_tflops / 1e9
    model = machine.step_model
    kv_bytes_per_token = 2 * heads.nheads_k * heads.headdim * heads.bytes_per_element
    if strategy == "ulysses":
        tokens = [n for _, n in _slices(total, w)]
        whole = [[Piece(i, 0, n)] for i, n in enumerate(seqlens)]
        pairs = sum(layout_work(whole)) / w
        # Every document for nheads / W heads: a W-th of the whole batch's cost, keys included.
        per_rank = (sum(layout_work(whole, model)) + model.call_cost(total, len(seqlens), 1)) / w
        feasible = heads.nheads % w == 0 and (heads.nheads_k % w == 0 or w % heads.nheads_k == 0)
        qkvo = (2 * heads.nheads + 2 * heads.nheads_k) * heads.headdim * heads.bytes_per_element
        comm = 2 * max(tokens) * (w - 1) / w * qkvo  # forward: q, k, v, out; backward: dout, dq, dk, dv
        return Prediction(strategy, tokens, [pairs] * w, per_rank * ms_per_unit, comm / machine.link_gbs / 1e6,
                          feasible,
                          "" if feasible else f"nheads={heads.nheads}, nheads_k={heads.nheads_k} do not split "
                                              f"over {w} ranks")
    if strategy == "balanced":
        pieces = balanced_layout(seqlens, w, min_piece)
    else:
        pieces = [rank_pieces(strategy, seqlens, r, w) for r in range(w)]
    tokens = [sum(p.length for p in ps) for ps in pieces]
    groups, documents = call_shape(strategy, pieces, len(seqlens))
    cost = layout_work(pieces, model, key_rows=total, documents=documents, groups=groups)
    gathered = (w - 1) * max(tokens + [0]) * kv_bytes_per_token  # padded to the largest rank
    # K/V gathered in the forward and again in the backward, dK/dV reduce-scattered in float32.
    comm = gathered * (2 + 4 / heads.bytes_per_element)
    return Prediction(strategy, tokens, layout_work(pieces), max(cost + [0.0]) * ms_per_unit,
                      comm / machine.link_gbs / 1e6)


def _slices(total: int, w: int) -> list[tuple[int, int]]:
    base, extra = divmod(total, w)
    return [(0, base + (1 if r < extra else 0)) for r in range(w)]


@dataclass
class Choice:
    strategy: str
    why: str
    predictions: list[Prediction] = field(default_factory=list)


def choose(seqlens: list[int], world_size: int, heads: Optional[Heads] = None, machine: Machine = Machine(),
           min_piece: int = BALANCED_MIN_PIECE) -> Choice:
    """``auto``: the candidate with the least predicted step time. Without ``heads`` ulysses
    is left out (its feasibility depends on the head counts)."""
    if world_size == 1:
        return Choice("llama3", "one rank: no communication, every layout is the whole batch")
    candidates = [s for s in AUTO_CANDIDATES if s != "ulysses" or heads is not None]
    preds = [predict(s, seqlens, world_size, heads or Heads(), machine, min_piece) for s in candidates]
    feasible = [p for p in preds if p.feasible]
    best = min(feasible, key=lambda p: (round(p.total_ms, 6), candidates.index(p.strategy)))
    others = ", ".join(f"{p.strategy} {p.total_ms:.3f} ms (balance {p.balance:.3f})" for p in feasible
                       if p is not best)
    why = (f"least predicted step time (forward and backward) {best.total_ms:.3f} ms (compute "
           f"{best.compute_ms:.3f} + communication {best.comm_ms:.3f}; rank balance {best.balance:.3f}) against "
           f"{others or 'no other candidate'}")
    skipped = [p for p in preds if not p.feasible]
    if skipped:
        why += "; not possible: " + "; ".join(f"{p.strategy} ({p.note})" for p in skipped)
    if heads is None:
        why += "; ulysses not considered (give Plan(..., heads=cost.Heads(...)) to include it)"
    return Choice(best.strategy, why, preds)
