"""Token layouts of the context-parallel strategies: which tokens of the global packed
batch each rank holds, in which order. Host-side integer arithmetic, run once per batch
when a Plan is built.

A rank's local tokens are a concatenation of *pieces*; a piece is a run of one sequence's
tokens at positions ``start, start + step, ...`` (``step`` is 1, or W for stripe). The
pieces of one sequence are adjacent in the local order, so each rank's tokens of sequence
i form one local segment.

ulysses holds llama3's contiguous slices of the packed stream. hybrid (Ulysses degree u)
groups ranks into W/u Ulysses groups of u consecutive ranks: group g holds zigzag_llama3's
chunks of rank g in a world of W/u, and rank j of the group holds slice j of that group's
stream (its pieces in order, cut into u slices), so that the group's all-to-all rebuilds
the group's stream in order.

Documents of any length: a sequence whose length does not divide into the strategy's
chunks gets chunks that differ by at most one token (the first chunks take the
remainder). Nothing is padded; ranks may hold different numbers of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

STRATEGIES = ("zigzag_llama3", "llama3", "ring", "zigzag_ring", "stripe", "ulysses", "hybrid")


@dataclass(frozen=True)
class Piece:
    seq: int
    start: int  # position of the first token within its sequence
    length: int
    step: int = 1  # distance between consecutive tokens' positions

    def positions(self) -> range:
        return range(self.start, self.start + self.length * self.step, self.step)


def chunk_bounds(length: int, chunks: int) -> list[tuple[int, int]]:
    """(start, length) of ``chunks`` contiguous chunks of a sequence, sizes differing by <= 1."""
    base, extra = divmod(length, chunks)
    out, pos = [], 0
    for c in range(chunks):
        n = base + (1 if c < extra else 0)
        out.append((pos, n))
        pos += n
    return out


def stream_slice(pieces: list[Piece], lo: int, hi: int) -> list[Piece]:
    """The tokens at positions [lo, hi) of the stream that ``pieces`` form, in order (no empty pieces)."""
    out, pos = [], 0
    for p in pieces:
        a, b = max(lo, pos), min(hi, pos + p.length)
        if b > a:
            out.append(Piece(p.seq, p.start + (a - pos) * p.step, b - a, p.step))
        pos += p.length
    return out


def rank_pieces(strategy: str, seqlens: list[int], rank: int, world_size: int,
                ulysses_degree: Optional[int] = None) -> list[Piece]:
    """The pieces rank ``rank`` holds, in local order (``ulysses_degree``: hybrid's u)."""
    w = world_size
    pieces: list[Piece] = []
    if strategy in ("ring",):
        for i, n in enumerate(seqlens):
            start, length = chunk_bounds(n, w)[rank]
            pieces.append(Piece(i, start, length))
    elif strategy in ("zigzag_ring", "zigzag_llama3"):
        for i, n in enumerate(seqlens):
            bounds = chunk_bounds(n, 2 * w)
            for c in (rank, 2 * w - 1 - rank):
                pieces.append(Piece(i, *bounds[c]))
    elif strategy == "stripe":
        for i, n in enumerate(seqlens):
            pieces.append(Piece(i, rank, len(range(rank, n, w)), w))
    elif strategy in ("llama3", "ulysses"):
        # Contiguous slices of the whole packed stream; sequences may span ranks.
        lo, n_rank = chunk_bounds(sum(seqlens), w)[rank]
        pieces = stream_slice([Piece(i, 0, n) for i, n in enumerate(seqlens)], lo, lo + n_rank)
    elif strategy == "hybrid":
        u = ulysses_degree
        if u is None or u < 1 or w % u != 0:
            raise ValueError(f"ulysses_degree: got {u!r}; expected a divisor of world_size={w}")
        group, j = divmod(rank, u)
        stream = rank_pieces("zigzag_llama3", seqlens, group, w // u)
        lo, n_rank = chunk_bounds(sum(p.length for p in stream), u)[j]
        pieces = stream_slice(stream, lo, lo + n_rank)
    else:
        raise ValueError(f"strategy: got {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    return pieces


def segments(pieces: list[Piece], num_seqs: int) -> list[tuple[int, int]]:
    """(local start, local length) of each sequence's segment on the rank ((x, 0) if none)."""
    out = [(0, 0)] * num_seqs
    pos = 0
    for p in pieces:
        start, length = out[p.seq]
        out[p.seq] = (pos if length == 0 else start, length + p.length)
        pos += p.length
    return out
