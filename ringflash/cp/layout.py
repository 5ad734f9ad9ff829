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

balanced (document-aware) keeps short documents whole and cuts long ones into zigzag
pairs of chunks no shorter than ``min_piece`` tokens, then deals these units to ranks
largest predicted cost first, each to the rank with the least cost that still has room
for its tokens (``balanced_layout``, ``CostModel``). Keys travel by all-gather, as for
llama3 and zigzag_llama3.

Documents of any length: a sequence whose length does not divide into the strategy's
chunks gets chunks that differ by at most one token (the first chunks take the
remainder). Nothing is padded; ranks may hold different numbers of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

STRATEGIES = ("zigzag_llama3", "llama3", "ring", "zigzag_ring", "stripe", "ulysses", "hybrid", "balanced")


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
    elif strategy == "balanced":
        pieces = balanced_layout(seqlens, w)[rank]
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


#: Shortest chunk the balanced layout cuts a document into. Below about 256 query rows the
#: kernels lose throughput (WLB-LLM reports the jump at 256; ours is to be measured on a
#: GPU and set here).
BALANCED_MIN_PIECE = 256


@dataclass(frozen=True)
class CostModel:
    """Predicted attention time of a rank's work, in units of one visible (query, key) pair:
    ``pair`` per visible pair, ``row`` per query row (loads, softmax and stores that do not
    scale with the keys), ``piece`` per piece (a partial tile, a grid tail), and two terms
    of the rank's kernel call as a whole, each per query group of the call
    (``query_groups``; ``cost.layout_work`` charges them once per rank):

    * ``group_key_row`` per row of the K/V buffer the call reads, per query group: the
      backward's dK/dV kernel runs one program per key block of every document, and each
      loops over every query group (and the query heads of its KV head), whether or not
      the group has queries in that document;
    * ``entry`` per (query group, document) entry of the call's metadata: the forward's
      launch grid holds query blocks x heads programs for every entry, empty ones included.

    The defaults count visible pairs only (``balanced_layout`` deals by them);
    ``cost.Machine`` holds the coefficients measured per GPU."""

    pair: float = 1.0
    row: float = 0.0
    piece: float = 0.0
    group_key_row: float = 0.0
    entry: float = 0.0

    def cost(self, start: int, length: int) -> float:
        """Query rows at positions [start, start + length) of a document, each seeing every
        key up to its own position."""
        return self.piece_cost(length * start + length * (length + 1) / 2, length)

    def piece_cost(self, pairs: float, length: int) -> float:
        """A piece of ``length`` query rows that see ``pairs`` (query, key) pairs in all."""
        return self.pair * pairs + self.row * length + (self.piece if length else 0.0)

    def call_cost(self, key_rows: float, documents: float, groups: float) -> float:
        """The terms of a kernel call over ``key_rows`` K/V rows and ``documents``
        documents with ``groups`` query groups."""
        return groups * (self.group_key_row * key_rows + self.entry * documents)


#: Strategies whose engine passes K/V around a ring: W calls a step, one query group each.
RING_STRATEGIES = ("ring", "zigzag_ring", "stripe")


def query_groups(strategy: str, pieces: list[Piece]) -> int:
    """Query groups of a rank's all-gather kernel call (``Plan._allgather_spec``): one per
    piece of a document on the rank, at least one (llama3: one; balanced: two for each
    zigzag pair of one document dealt there), and always two for zigzag_llama3 (its two
    chunks of every document)."""
    if strategy == "zigzag_llama3":
        return 2
    counts: dict[int, int] = {}
    for p in pieces:
        counts[p.seq] = counts.get(p.seq, 0) + 1
    return max(list(counts.values()) + [1])


def balanced_layout(seqlens: list[int], world_size: int, min_piece: int = BALANCED_MIN_PIECE,
                    model: CostModel = CostModel()) -> list[list[Piece]]:
    """Every rank's pieces (in document order) for the balanced strategy.

    Units: a document of up to ``unit_max`` tokens stays whole; a longer one is cut into 2p
    chunks and unit c pairs chunk c with chunk 2p-1-c (zigzag: every pair has the same
    causal cost), with p a multiple of W (one pair per rank for a document of one share;
    more for longer ones) unless chunks would fall below ``min_piece``. ``unit_max`` is a
    eighth of a rank's share of tokens (at least 2 x min_piece), so that the whole
    documents can even out the token counts. Units are dealt largest cost
    first (ties: more tokens, then document order, so every rank computes the same
    layout), each to the rank of least cost among those whose tokens stay within the
    share plus half a unit; if none has room, to the rank with the fewest tokens.
    """
    w = world_size
    total = sum(seqlens)
    share = -(-total // w) if total else 0
    unit_max = max(2 * min_piece, -(-share // 8), 1)
    units = []  # (cost, tokens, document, pieces)
    for i, n in enumerate(seqlens):
        if n == 0:
            continue
        pairs = 1
        if n > unit_max:
            # A multiple of W pairs of equal cost: each rank can take the same number.
            pairs = max(1, min(w * -(-n // (w * share)), n // (2 * min_piece)))
        if pairs == 1 and n <= unit_max:
            units.append((model.cost(0, n), n, i, [Piece(i, 0, n)]))
            continue
        bounds = chunk_bounds(n, 2 * pairs)
        for c in range(pairs):
            chunks = [Piece(i, *bounds[c]), Piece(i, *bounds[2 * pairs - 1 - c])]
            units.append((sum(model.cost(p.start, p.length) for p in chunks), sum(p.length for p in chunks), i,
                          chunks))
    units.sort(key=lambda u: (-u[0], -u[1], u[2], u[3][0].start))
    cap = share + unit_max // 2
    loads = [[0.0, 0] for _ in range(w)]  # (cost, tokens) per rank
    assigned: list[list[Piece]] = [[] for _ in range(w)]
    held: list[set[int]] = [set() for _ in range(w)]  # documents with a piece on each rank
    for cost, tokens, doc, chunks in units:
        roomy = [r for r in range(w) if loads[r][1] + tokens <= cap]
        # A second pair of one document on a rank doubles its query groups (Plan gives each
        # piece of a document its own group), and the grouped kernels' time grows with
        # groups x documents: prefer ranks without this document while one has room.
        roomy = [r for r in roomy if doc not in held[r]] or roomy
        rank = min(roomy, key=lambda r: (loads[r][0], loads[r][1], r)) if roomy else \
            min(range(w), key=lambda r: (loads[r][1], loads[r][0], r))
        loads[rank][0] += cost
        loads[rank][1] += tokens
        assigned[rank] += chunks
        held[rank].add(doc)
    return [sorted(ps, key=lambda p: (p.seq, p.start)) for ps in assigned]
