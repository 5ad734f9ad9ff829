"""Token layouts of the context-parallel strategies: which tokens of the global packed
batch each rank holds, in which order. Host-side integer arithmetic, run once per batch
when a Plan is built.

A rank's local tokens are a concatenation of *pieces*; a piece is a run of one sequence's
tokens at positions ``start, start + step, ...`` (``step`` is 1, or W for stripe). The
pieces of one sequence are adjacent in the local order, so each rank's tokens of sequence
i form one local segment.

Documents of any length: a sequence whose length does not divide into the strategy's
chunks gets chunks that differ by at most one token (the first chunks take the
remainder). Nothing is padded; ranks may hold different numbers of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("zigzag_llama3", "llama3", "ring", "zigzag_ring", "stripe")


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


def rank_pieces(strategy: str, seqlens: list[int], rank: int, world_size: int) -> list[Piece]:
    """The pieces rank ``rank`` holds, in local order."""
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
    elif strategy == "llama3":
        # Contiguous slices of the whole packed stream; sequences may span ranks.
        total = sum(seqlens)
        lo, n_rank = chunk_bounds(total, w)[rank]
        hi, seq_start = lo + n_rank, 0
        for i, n in enumerate(seqlens):
            a, b = max(lo, seq_start), min(hi, seq_start + n)
            if b > a:
                pieces.append(Piece(i, a - seq_start, b - a))
            seq_start += n
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
