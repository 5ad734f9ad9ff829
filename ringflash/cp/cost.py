"""Predicted cost of a context-parallel layout, and ``strategy="auto"``'s choice.

A strategy's training step (forward and backward) is modelled as its slowest rank's
attention work plus its communication:

* compute: ``Machine.step_model`` (``layout.CostModel``) over each rank's pieces, in units
  of one causal (query, key) pair: the pairs, plus terms per query row, per piece and per
  row of the K/V buffer the rank reads, times 4 x headdim x nheads FLOPs per pair, at
  ``Machine.step_tflops`` (forward FLOPs over the step's time). The coefficients are fitted
  to every rank of run 33's ``bench cp --simulate`` on an H200 (docs/benchmarks.md): a
  pairs-only model missed the short-document batches by up to 81%, since there the pieces,
  rows and gathered keys cost more than the pairs; the fitted one is within 16% on every
  rank of zigzag_llama3, llama3 and ulysses (balanced's short-document ranks ran up to
  44% slower than it predicts: they held four query groups, which ``balanced_layout`` now
  avoids);
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

from .layout import BALANCED_MIN_PIECE, CostModel, Piece, balanced_layout, rank_pieces

#: The strategies ``auto`` chooses among (see the module doc for why not the ring ones).
AUTO_CANDIDATES = ("balanced", "zigzag_llama3", "llama3", "ulysses")


@dataclass(frozen=True)
class Machine:
    tflops: float = 400.0  # attention kernels, forward, counting causal pairs only
    link_gbs: float = 200.0  # one rank's all-gather / all-to-all bandwidth beside compute
    #: The training step's rate and cost model (see the module doc; H200, run 33).
    step_tflops: float = 118.7
    step_model: CostModel = CostModel(pair=1.0, row=373.0, piece=7.42e4, key_row=134.0)


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


def layout_work(pieces_by_rank: list[list[Piece]], model: CostModel = CostModel(),
                key_rows: float = 0.0) -> list[float]:
    """Each rank's cost under ``model`` (causal pairs by default); ``key_rows``: rows of the
    K/V buffer every rank reads (``CostModel.key_row``)."""
    return [sum(model.cost(p.start, p.length) if p.step == 1 else _strided_cost(p, model) for p in ps)
            + model.key_row * key_rows for ps in pieces_by_rank]


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
        per_rank = sum(layout_work(whole, model)) / w + model.key_row * total / w
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
    cost = layout_work(pieces, model, key_rows=total)
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
