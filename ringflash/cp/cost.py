"""Predicted cost of a context-parallel layout, and ``strategy="auto"``'s choice.

A strategy's step is modelled as its slowest rank's attention work plus the communication
the engine leaves exposed:

* compute: the causal (query, key) pairs of each rank's pieces (``layout.CostModel``),
  times 4 x headdim x nheads FLOPs per pair, at ``Machine.tflops``;
* all-gather strategies (llama3, zigzag_llama3, balanced): every rank receives the other
  ranks' K/V; the forward's gather is exposed (measured: docs/benchmarks.md), so it counts
  whole, at ``Machine.link_gbs``;
* ulysses: two all-to-alls (q, k, v out, then the output back) of (W-1)/W of the local
  tokens' heads; compute is every document for nheads / W heads, evenly split;
* ring strategies are not candidates: their layouts cut every document into W or 2W
  chunks, so their compute balance is zigzag_llama3's or worse, and the all-gather engine
  measured faster than the ring on the same layout.

The ``Machine`` defaults are H200 figures from this project's own runs (about 400 TFLOP/s
for the bf16 kernels, about 200 GB/s for an all-gather of K/V beside them on 2x H200); they
are inputs to a ranking, not measurements of a new machine. ``ringflash bench cp
--simulate`` is meant to calibrate them per GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .layout import BALANCED_MIN_PIECE, CostModel, Piece, balanced_layout, rank_pieces

#: The strategies ``auto`` chooses among (see the module doc for why not the ring ones).
AUTO_CANDIDATES = ("balanced", "zigzag_llama3", "llama3", "ulysses")


@dataclass(frozen=True)
class Machine:
    tflops: float = 400.0  # attention kernels, forward
    link_gbs: float = 200.0  # one rank's all-gather / all-to-all bandwidth beside compute


@dataclass(frozen=True)
class Heads:
    """What the model's attention looks like (defaults: Llama-3-8B, bf16)."""

    nheads: int = 32
    nheads_k: int = 8
    headdim: int = 128
    bytes_per_element: int = 2


@dataclass
class Prediction:
    strategy: str
    tokens: list[int]  # per rank
    work: list[float]  # causal (query, key) pairs per rank
    compute_ms: float  # slowest rank
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


def layout_work(pieces_by_rank: list[list[Piece]], model: CostModel = CostModel()) -> list[float]:
    return [sum(model.cost(p.start, p.length) if p.step == 1 else _strided_pairs(p) for p in ps)
            for ps in pieces_by_rank]


def _strided_pairs(p: Piece) -> float:
    return float(sum(pos + 1 for pos in p.positions()))


def predict(strategy: str, seqlens: list[int], world_size: int, heads: Heads = Heads(),
            machine: Machine = Machine(), min_piece: int = BALANCED_MIN_PIECE) -> Prediction:
    """The modelled forward step of ``strategy`` on this batch (see the module doc)."""
    w = world_size
    flops_per_pair = 4.0 * heads.headdim * heads.nheads
    kv_bytes_per_token = 2 * heads.nheads_k * heads.headdim * heads.bytes_per_element
    if strategy == "ulysses":
        total = sum(seqlens)
        tokens = [n for _, n in _slices(total, w)]
        work = layout_work([[Piece(i, 0, n)] for i, n in enumerate(seqlens)])
        per_rank = sum(work) / w
        feasible = heads.nheads % w == 0 and (heads.nheads_k % w == 0 or w % heads.nheads_k == 0)
        qkvo = (2 * heads.nheads + 2 * heads.nheads_k) * heads.headdim * heads.bytes_per_element
        comm = max(tokens) * (w - 1) / w * qkvo
        return Prediction(strategy, tokens, [per_rank] * w, per_rank * flops_per_pair / machine.tflops / 1e9,
                          comm / machine.link_gbs / 1e6, feasible,
                          "" if feasible else f"nheads={heads.nheads}, nheads_k={heads.nheads_k} do not split "
                                              f"over {w} ranks")
    if strategy == "balanced":
        pieces = balanced_layout(seqlens, w, min_piece)
    else:
        pieces = [rank_pieces(strategy, seqlens, r, w) for r in range(w)]
    tokens = [sum(p.length for p in ps) for ps in pieces]
    work = layout_work(pieces)
    gathered = (w - 1) * max(tokens + [0]) * kv_bytes_per_token  # padded to the largest rank
    return Prediction(strategy, tokens, work, max(work + [0.0]) * flops_per_pair / machine.tflops / 1e9,
                      gathered / machine.link_gbs / 1e6)


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
    why = (f"least predicted forward time {best.total_ms:.3f} ms (compute {best.compute_ms:.3f} + communication "
           f"{best.comm_ms:.3f}; rank balance {best.balance:.3f}) against {others or 'no other candidate'}")
    skipped = [p for p in preds if not p.feasible]
    if skipped:
        why += "; not possible: " + "; ".join(f"{p.strategy} ({p.note})" for p in skipped)
    if heads is None:
        why += "; ulysses not considered (give Plan(..., heads=cost.Heads(...)) to include it)"
    return Choice(best.strategy, why, preds)
