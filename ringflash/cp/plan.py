"""``Plan``: everything a context-parallel step needs about one batch, computed once.

    plan = ringflash.cp.Plan(cu_seqlens, group, strategy="zigzag_llama3")
    q, k, v = plan.shard(q_global), plan.shard(k_global), plan.shard(v_global)
    pos = plan.position_ids                       # for RoPE
    out = plan.attention(q, k, v, causal=True)    # this rank's rows
    full = plan.gather(out)                       # all rows, on every rank

``cu_seqlens`` is the global int32 (batch + 1,) layout of the packed batch, the same on
every rank. Building the plan reads it once on the host (one sync, to size buffers),
keeps its own copy (refilling the caller's buffer for the next batch cannot change a
plan), and checks collectively that every rank of ``group`` passed exactly the same
lengths. All index metadata then lives on the device; forward and backward make no host
syncs. Every call checks collectively that all ranks pass the same shapes, dtypes and
options, and that none rejected its inputs (see ``ringflash.cp.checks`` for when that
check runs), so that a mismatch is an error on every rank rather than a hang.

Documents may have any length, down to a single token: sequences are cut into chunks that
differ by at most one token, and nothing is padded. Results equal single-GPU attention on
the unpadded batch.

Strategies (``layout`` has the token layouts): the all-gather engine (llama3,
zigzag_llama3), the ring engine (ring, zigzag_ring, stripe), and the Ulysses engine
(``ulysses``: all-to-all over heads, then the plain varlen kernel; ``hybrid`` with
``ulysses_degree=u``: Ulysses inside groups of u consecutive ranks, zigzag_llama3's
all-gather engine across the W/u groups).
"""

from __future__ import annotations

import copy
import hashlib
import os
from typing import Optional

import torch
import torch.distributed as dist

from .. import validation as V
from ..kernels.problem import WINDOW_CAP, SeqMeta
from . import profile as cp_profile
from .checks import SignatureChecks, call_signature, check_agreement
from .cost import AUTO_CANDIDATES, Heads, choose, layout_work, predict
from .comm import Comm, hybrid_comms
from .engines import AllGatherAttention, AllGatherSpec, LocalKeys, RingAttention, RingStep
from .layout import (
    BALANCED_MIN_PIECE, STRATEGIES, balanced_layout, chunk_bounds, query_groups, rank_pieces, segments,
)
from .local import MODES, LocalParams
from .ulysses import AllGatherInner, HeadSplit, LocalInner, UlyssesAttention, check_heads

#: diag value meaning "every key of the entry precedes every query row".
ALL_VISIBLE = WINDOW_CAP


def _tensor(values, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


def _positions(pieces: list) -> torch.Tensor:
    """Positions within their sequences of a rank's tokens, in local order (one arange a piece)."""
    parts = [torch.arange(p.start, p.start + p.length * p.step, p.step) for p in pieces]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def _global_rows(pieces: list, seq_starts: list[int]) -> torch.Tensor:
    """Rows of a rank's tokens in the global packed batch, in local order."""
    parts = [seq_starts[p.seq] + torch.arange(p.start, p.start + p.length * p.step, p.step) for p in pieces]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def _rank_major_index(pieces_by_rank: list, seq_starts: list[int], total: int, n_max: int) -> torch.Tensor:
    """For each global token (packed order): its row in the rank-major buffer that gathers
    every rank's tokens (in local order, padded to ``n_max``)."""
    index = torch.empty(total, dtype=torch.long)
    for s, ps in enumerate(pieces_by_rank):
        rows = _global_rows(ps, seq_starts)
        index[rows] = torch.arange(s * n_max, s * n_max + rows.numel())
    return index


def _allgather_spec(pieces_by_rank: list, me: int, seqlens: list[int], cu_seqlens: torch.Tensor,
                    groups: int) -> AllGatherSpec:
    """Rank ``me``'s queries against the gathered keys in global order; each query piece is a
    group entry (``groups`` 2: zigzag's two chunks) whose diagonal is its first token's
    position (query row i sees key j iff j <= start + i)."""
    device, own = cu_seqlens.device, pieces_by_rank[me]
    num_seqs = len(seqlens)
    starts = [[0] * num_seqs for _ in range(groups)]
    ends = [[0] * num_seqs for _ in range(groups)]
    diag = [[0] * num_seqs for _ in range(groups)]
    seen = [0] * num_seqs
    pos = 0
    for p in own:
        g = seen[p.seq]
        seen[p.seq] += 1
        starts[g][p.seq], ends[g][p.seq], diag[g][p.seq] = pos, pos + p.length, p.start
        pos += p.length
    meta = SeqMeta(_tensor(starts, device), _tensor(ends, device), cu_seqlens, None, _tensor(diag, device))
    n_max = max([sum(p.length for p in ps) for ps in pieces_by_rank] + [1])
    seq_starts = [0]
    for n in seqlens[:-1]:
        seq_starts.append(seq_starts[-1] + n)
    return AllGatherSpec(
        meta=meta, n_max=n_max, max_q=max([p.length for p in own] + [1]), max_k=max(seqlens + [1]),
        key_index=_rank_major_index(pieces_by_rank, seq_starts, sum(seqlens), n_max).to(device),
    )


def _local_first_spec(pieces_by_rank: list, me: int, seqlens: list[int], cu_seqlens: torch.Tensor,
                      groups: int, causal: bool) -> AllGatherSpec:
    """The local-first split of rank ``me``'s attention (causal or full, no window).

    Own keys: each document's local rows, in position order (every layout keeps a rank's
    pieces of a document sorted), so the global causal mask is a causal mask in local
    order: one plain varlen call. Other ranks' keys: the gathered buffer without this rank's
    rows, in global order; a query piece starting at position p sees, of them, the ones
    before p, which is a prefix (p minus its own rows before p): one group entry per piece
    with that many keys used, all visible.
    """
    device, own = cu_seqlens.device, pieces_by_rank[me]
    num_seqs = len(seqlens)
    own_count = [0] * num_seqs
    starts = [[0] * num_seqs for _ in range(groups)]
    ends = [[0] * num_seqs for _ in range(groups)]
    used = [[0] * num_seqs for _ in range(groups)]
    seen = [0] * num_seqs
    last_end = [0] * num_seqs
    pos = 0
    for p in own:
        g = seen[p.seq]
        seen[p.seq] += 1
        if p.step != 1 or p.start < last_end[p.seq]:  # the layouts that reach here never do this
            raise AssertionError(f"local-first split: piece {p} is strided or out of position order")
        last_end[p.seq] = p.start + p.length
        starts[g][p.seq], ends[g][p.seq] = pos, pos + p.length
        used[g][p.seq] = p.start - own_count[p.seq]  # causal: the other ranks' keys before p
        own_count[p.seq] += p.length
        pos += p.length
    remote = [n - o for n, o in zip(seqlens, own_count)]
    if not causal:
        used = [[remote[s] if ends[g][s] > starts[g][s] else 0 for s in range(num_seqs)] for g in range(groups)]
    cu_local, cu_remote = [0], [0]
    for o, r in zip(own_count, remote):
        cu_local.append(cu_local[-1] + o)
        cu_remote.append(cu_remote[-1] + r)
    local_cu = _tensor(cu_local, device)
    meta = SeqMeta(_tensor(starts, device), _tensor(ends, device), _tensor(cu_remote, device),
                   _tensor(used, device), _tensor([[ALL_VISIBLE] * num_seqs] * groups, device))
    n_max = max([sum(p.length for p in ps) for ps in pieces_by_rank] + [1])
    seq_starts = [0]
    for n in seqlens[:-1]:
        seq_starts.append(seq_starts[-1] + n)
    index = _rank_major_index(pieces_by_rank, seq_starts, sum(seqlens), n_max)
    mine = torch.ones(sum(seqlens), dtype=torch.bool)
    mine[_global_rows(own, seq_starts)] = False
    return AllGatherSpec(
        meta=meta, n_max=n_max, max_q=max([p.length for p in own] + [1]), max_k=max(remote + [1]),
        key_index=index[mine].to(device),
        local=LocalKeys(SeqMeta.from_cu_seqlens(local_cu, local_cu), max(own_count + [1])),
    )


#: Strategies whose engine all-gathers K/V and attends the local pieces to them in one launch.
ALL_GATHER_STRATEGIES = ("llama3", "zigzag_llama3", "balanced")


def _check_min_piece(strategy: str, min_piece: object) -> Optional[int]:
    """The balanced layout's shortest chunk (``min_piece`` is balanced's alone)."""
    if strategy != "balanced":
        if min_piece is not None:
            raise ValueError(f"min_piece: got {min_piece!r} for strategy {strategy!r}; expected None (only "
                             "strategy='balanced' takes it)")
        return None
    if min_piece is None:
        return BALANCED_MIN_PIECE
    value = V.integer_value(min_piece)
    if value is None or value < 1:
        raise ValueError(f"min_piece: got {min_piece!r}; expected a positive int")
    return value


def zigzag_mode(mode: Optional[str]) -> str:
    """The zigzag_llama3 execution mode: the argument, else RINGFLASH_ZIGZAG_MODE, else the
    design notes' ZIGZAG_USE_FUSED_TRITON_V2 (1: grouped, 0: two_kernels), else grouped."""
    name = "mode"
    if mode is None:
        fused = os.environ.get("ZIGZAG_USE_FUSED_TRITON_V2")
        if fused not in (None, "0", "1"):
            raise ValueError(f"ZIGZAG_USE_FUSED_TRITON_V2: got {fused!r}; expected 1 (grouped) or 0 (two_kernels)")
        default = "grouped" if fused in (None, "1") else "two_kernels"
        mode = os.environ.get("RINGFLASH_ZIGZAG_MODE", default)
        name = "RINGFLASH_ZIGZAG_MODE"
    if mode not in MODES:
        raise ValueError(f"{name}: got {mode!r}; expected one of {', '.join(MODES)}")
    return mode


def _local_first(value: Optional[bool]) -> bool:
    """The local-first split: the argument, else RINGFLASH_CP_LOCAL_FIRST (1/0), else off."""
    if value is not None:
        return V.as_bool("local_first", value)
    env = os.environ.get("RINGFLASH_CP_LOCAL_FIRST", "0")
    if env not in ("0", "1"):
        raise ValueError(f"RINGFLASH_CP_LOCAL_FIRST: got {env!r}; expected 1 or 0")
    return env == "1"


def zigzag_verify(verify: Optional[bool]) -> bool:
    """Verify mode: the argument, else RINGFLASH_ZIGZAG_VERIFY (or the seed's ZIGZAG_VERIFY_CORRECTNESS) = 1."""
    if verify is not None:
        return bool(verify)
    return any(os.environ.get(name, "0") == "1" for name in ("RINGFLASH_ZIGZAG_VERIFY", "ZIGZAG_VERIFY_CORRECTNESS"))


class Plan:
    def __init__(self, cu_seqlens: torch.Tensor, group: Optional[dist.ProcessGroup] = None,
                 strategy: str = "zigzag_llama3", *, ulysses_degree: Optional[int] = None,
                 min_piece: Optional[int] = None, heads: Optional[Heads] = None,
                 profile: Optional[bool] = None):
        self.comm = Comm(group)
        self.group = self.comm.group
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        self.strategy = strategy
        self.requested_strategy = strategy
        #: Why this strategy (``auto``'s reasoning; otherwise the caller's choice).
        self.why = "requested"
        self.heads = heads
        #: Ranks of a Ulysses group: W for ulysses, ``ulysses_degree`` for hybrid, else None.
        self.ulysses_degree: Optional[int] = None
        self.min_piece: Optional[int] = None
        profiling = False
        # Every rank runs the same checks and then one collective, so that a bad argument on
        # one rank is an error on every rank instead of a hang in the next collective.
        error: Optional[BaseException] = None
        cu: list[int] = []
        try:
            if strategy not in STRATEGIES + ("auto",):
                raise ValueError(f"strategy: got {strategy!r}; expected auto or one of {', '.join(STRATEGIES)}")
            if heads is not None and not isinstance(heads, Heads):
                raise TypeError(f"heads: expected a ringflash.cp.cost.Heads, got {type(heads).__name__}")
            profiling = cp_profile.requested() if profile is None else V.as_bool("profile", profile)
            V.check_cu_seqlens_shape("cu_seqlens", cu_seqlens)
            cu = cu_seqlens.tolist()  # the one host sync of a plan
            if cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
                raise ValueError(f"cu_seqlens: expected 0 then non-decreasing cumulative lengths, got {cu[:8]}...")
            if strategy == "auto":  # the same lengths on every rank give the same choice
                choice = choose([b - a for a, b in zip(cu, cu[1:])], self.world_size, heads,
                                min_piece=_check_min_piece("balanced", min_piece))
                strategy, self.why = choice.strategy, choice.why
                self.strategy = strategy
                if strategy != "balanced":
                    min_piece = None
            self.ulysses_degree = self._check_degree(strategy, ulysses_degree)
            self.min_piece = _check_min_piece(strategy, min_piece)
        except (ValueError, TypeError) as exc:
            error = exc
        self.seqlens = [b - a for a, b in zip(cu, cu[1:])]
        device = cu_seqlens.device if isinstance(cu_seqlens, torch.Tensor) else torch.device("cpu")
        check_agreement(self.comm, None if error else self._layout_signature(), device,
                        "cu_seqlens and strategy", error)
        self._build_layout(cu, device)
        w = self.world_size
        own = self.pieces[self.rank]
        self.position_ids = _positions(own).to(self.device)
        self.local_index = _global_rows(own, self._seq_starts).to(self.device)
        self._gather_index: Optional[torch.Tensor] = None
        self._cache: dict[tuple, object] = {}
        self._checks = SignatureChecks(self.comm, self.device, "q, k, v or options")
        #: Per-step timings (``profile``): shared by the plans of this strategy on this group.
        self.profiler = (cp_profile.shared(f"strategy {strategy}, {w} ranks, group {self._group_name()}", self.rank)
                         if profiling else cp_profile.OFF)
        self.comm.profiler = self.profiler
        if strategy == "hybrid":  # collective, on every rank: the layout check above passed everywhere
            ulysses, across = hybrid_comms(self.comm, self.ulysses_degree)
            # The sub-communicators are shared by every hybrid plan on this group: this
            # plan's copies carry its profiler.
            self._ulysses_comm, self._across_comm = copy.copy(ulysses), copy.copy(across)
            self._ulysses_comm.profiler = self._across_comm.profiler = self.profiler

    def _build_layout(self, cu: list[int], device: torch.device) -> None:
        """Every rank's pieces and the sizes that follow from them (no communication:
        ``cp.simulate`` builds one rank's share of a plan with it)."""
        self.device = device
        # The plan's own copy: the caller's buffer may be refilled for the next batch (even
        # behind its version counter) while this plan is still in use.
        self.cu_seqlens = torch.tensor(cu, dtype=torch.int32, device=device)
        self.total = cu[-1]
        w = self.world_size
        if self.strategy == "balanced":
            self.pieces = balanced_layout(self.seqlens, w, self.min_piece)
        else:
            self.pieces = [rank_pieces(self.strategy, self.seqlens, s, w, self.ulysses_degree) for s in range(w)]
        self.num_local = [sum(p.length for p in ps) for ps in self.pieces]
        self.n_max = max(max(self.num_local), 1)
        self.segments = [segments(ps, len(self.seqlens)) for ps in self.pieces]
        self._seq_starts = cu[:-1]

    def _check_degree(self, strategy: str, degree: object) -> Optional[int]:
        """The Ulysses group size of the strategy (``ulysses_degree`` is hybrid's alone)."""
        if strategy == "ulysses" and degree is None:
            return self.world_size
        if strategy != "hybrid":
            if degree is not None:
                raise ValueError(f"ulysses_degree: got {degree!r} for strategy {strategy!r}; expected None "
                                 "(only strategy='hybrid' takes a Ulysses degree)")
            return None
        value = V.integer_value(degree)
        if value is None or value < 1 or self.world_size % value != 0:
            raise ValueError(f"ulysses_degree: got {degree!r}; expected a divisor of world_size={self.world_size} "
                             "(strategy='hybrid' needs it)")
        return int(value)

    def _layout_signature(self) -> str:
        """What every rank must agree on to build the same layout: the exact lengths (by
        digest, so that no two different lists can pass as one), strategy, Ulysses degree and
        world size."""
        lengths = hashlib.sha256(",".join(map(str, self.seqlens)).encode()).hexdigest()
        return (f"strategy={self.strategy} requested={self.requested_strategy} "
                f"ulysses_degree={self.ulysses_degree} min_piece={self.min_piece} "
                f"world_size={self.world_size} "
                f"documents={len(self.seqlens)} "
                f"tokens={sum(self.seqlens)} lengths_sha256={lengths}")

    def describe(self) -> dict:
        """The plan in numbers, the same on every rank: the strategy (and why: ``auto``'s
        reasoning), each rank's tokens and predicted attention work (causal query-key pairs,
        ``cost.layout_work``), their balance (max / mean), and for the strategies ``auto``
        models, the predicted forward time split into compute and communication
        (``cost.predict``, with ``cost.Machine``'s defaults and this plan's ``heads`` or
        Llama-3-8B's)."""
        work = layout_work(self.pieces)
        mean = sum(work) / len(work) if work else 0.0
        info = {
            "strategy": self.strategy, "requested": self.requested_strategy, "why": self.why,
            "world_size": self.world_size, "documents": len(self.seqlens), "tokens": self.total,
            "rank_tokens": list(self.num_local), "rank_work": work,
            "work_balance": max(work) / mean if mean else 1.0,
        }
        if self.profiler.enabled:
            # This rank's measured times (``profile``); the rest of the dict is the same everywhere.
            info["profile"] = self.profiler.summary()
        if self.strategy in AUTO_CANDIDATES:
            pred = predict(self.strategy, self.seqlens, self.world_size, self.heads or Heads(),
                           min_piece=self.min_piece or BALANCED_MIN_PIECE)
            info["predicted_ms"] = {"compute": pred.compute_ms, "communication": pred.comm_ms,
                                    "total": pred.total_ms}
        return info

    def _group_name(self) -> str:
        """The group as its global ranks (a label for the shared profiler)."""
        ranks = [dist.get_global_rank(self.group, i) for i in range(self.world_size)]
        return ",".join(map(str, ranks)) if len(ranks) <= 8 else f"{ranks[0]}..{ranks[-1]} ({len(ranks)})"

    def profile(self, all_ranks: bool = False):
        """Measured time per step (``ZIGZAG_PROFILE_KERNELS=1`` or ``Plan(profile=True)``):
        this rank's ``{"calls": {...}, "spans": {name: {count, total_ms, mean_ms, max_ms}}}``
        summed over every plan of this strategy on this group since the first (or the last
        ``reset_profile``). Span names are "<pass> [step s]: <what>", where what is
        ``attention`` (kernels), ``wait <collective>`` (communication the compute stream
        waited for), ``merge`` or ``prepare``. ``all_ranks=True`` returns the list of every
        rank's, in rank order (collective: every rank must call it). Reading waits for the
        recorded CUDA events, so call it outside the timed loop."""
        if not self.profiler.enabled:
            raise RuntimeError("profile: this plan does not profile; expected ZIGZAG_PROFILE_KERNELS=1 (or "
                               "RINGFLASH_CP_PROFILE=1) when the plan is built, or Plan(..., profile=True)")
        mine = self.profiler.summary()
        if not all_ranks:
            return mine
        every: list = [None] * self.world_size
        dist.all_gather_object(every, mine, group=self.group)
        return every

    def reset_profile(self) -> None:
        """Clear the timings of this plan's profiler (shared with its strategy's other plans)."""
        self.profiler.reset()

    # -- layout ------------------------------------------------------------------------

    @property
    def num_local_tokens(self) -> int:
        return self.num_local[self.rank]

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's tokens of a global packed tensor (total, ...) -> (num_local_tokens, ...)."""
        if x.shape[0] != self.total:
            raise ValueError(f"x: has {x.shape[0]} tokens; expected the global token count {self.total}")
        return x.index_select(0, self.local_index.to(x.device))

    def _rank_major_index(self) -> torch.Tensor:
        """For each global token (packed order): its row in the rank-major all-gather buffer."""
        if self._gather_index is None:
            index = _rank_major_index(self.pieces, self._seq_starts, self.total, self.n_max)
            self._gather_index = index.to(self.device)
        return self._gather_index

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of shard, on every rank: local (num_local_tokens, ...) -> global (total, ...).
        Not differentiable (use it to inspect or compare results)."""
        if x.shape[0] != self.num_local_tokens:
            raise ValueError(f"x: has {x.shape[0]} tokens; expected this rank's {self.num_local_tokens}")
        buf = x.new_zeros((self.n_max,) + tuple(x.shape[1:]))
        buf[: x.shape[0]] = x.detach()
        out = buf.new_empty((self.world_size * self.n_max,) + tuple(x.shape[1:]))
        self.comm.all_gather(out, buf).wait()
        return out.index_select(0, self._rank_major_index().to(out.device))

    # -- collective checks -------------------------------------------------------------

    def _check_local(self, q, k, v, group) -> None:
        if group is not None and group is not self.group and dist.get_world_size(group) != self.world_size:
            raise ValueError(f"group: has {dist.get_world_size(group)} ranks but the plan was built for "
                             f"{self.world_size}; expected the plan's group")
        V.check_packed_qkv(q, k, v)
        V.check_same_device(("q", "cu_seqlens"), (q, self.cu_seqlens))
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.shape[0] != self.num_local_tokens:
                raise ValueError(f"{name}: has {t.shape[0]} tokens; expected this rank's {self.num_local_tokens} "
                                 f"(plan.shard of the global tensor)")

    # -- attention -----------------------------------------------------------------------

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool = True,
        softmax_scale: Optional[float] = None,
        window_size: tuple[int, int] = (-1, -1),
        softcap: float = 0.0,
        heads_k_stride: Optional[int] = None,
        mode: Optional[str] = None,
        verify: Optional[bool] = None,
        return_lse: bool = False,
        group: Optional[dist.ProcessGroup] = None,
        keep_gathered_kv: bool = False,
        local_first: Optional[bool] = None,
        _caller_error: Optional[BaseException] = None,
    ):
        """Attention of this rank's queries to all keys of their sequences.

        q: (num_local_tokens, nheads, headdim); k, v: (num_local_tokens, nheads_k, headdim),
        as ``plan.shard`` lays them out. Returns out (num_local_tokens, nheads, headdim), and
        with ``return_lse`` also lse (nheads, num_local_tokens) float32. ``heads_k_stride``
        (all-gather strategies): KV heads gathered at a time, a divisor of nheads_k (default
        all; for hybrid, of the KV heads a rank holds after its all-to-all). ``mode``
        (zigzag_llama3, hybrid): "grouped" or "two_kernels"; ``verify`` recomputes with the
        other mode and raises on a mismatch. ulysses and hybrid need nheads divisible by the
        Ulysses degree (W, or ``ulysses_degree``) and nheads_k a multiple or a divisor of it.
        ``keep_gathered_kv`` (all-gather strategies, hybrid): keep the gathered K/V from the
        forward for the backward instead of gathering them again, which saves the backward's
        all-gather at the cost of world_size x the local K/V of memory per call until the
        backward (off by default, as in ring-flash-attn's llama3, which re-gathers).
        ``local_first`` (llama3, zigzag_llama3, balanced; causal or full, no window; default
        ``RINGFLASH_CP_LOCAL_FIRST=1``, else off): attend to this rank's own keys while the
        all-gather runs, then to the other ranks' keys, merging in float32; the backward
        likewise computes the own keys' part while the re-gather runs.

        (``_caller_error``: a wrapper's own check that failed on this rank; it is raised
        after the collective check, so that every rank stops.)
        """
        # Local checks first, then one collective on every rank (see ``checks``): an error
        # or a disagreement stops every rank here, before any data collective.
        error: Optional[BaseException] = _caller_error
        signature: Optional[str] = None
        try:
            if error is not None:
                raise error
            causal = V.as_bool("causal", causal)
            left, right = V.check_window(window_size)
            softcap = V.check_softcap(softcap)
            if causal:
                right = 0
            windowed = left >= 0 or (right >= 0 and not causal)
            if windowed and self.strategy in ("zigzag_ring", "stripe"):
                raise NotImplementedError(
                    f"window_size: {self.strategy} interleaves each rank's tokens, so a sliding window is not one "
                    "diagonal band per step; expected (-1, -1) (use llama3, zigzag_llama3 or ring for windows)")
            self._check_local(q, k, v, group)
            scale = V.resolve_softmax_scale(softmax_scale, q.shape[-1])
            heads = None
            if self.ulysses_degree is not None:
                heads = check_heads(q.shape[1], k.shape[1], self.ulysses_degree,
                                    "world_size" if self.strategy == "ulysses" else "ulysses_degree")
            # hybrid gathers the KV heads a rank holds after its all-to-all
            nheads_k = heads.kv_local if self.strategy == "hybrid" else k.shape[1]
            # Options of the K/V all-gather, which ring, zigzag_ring, stripe and ulysses do not run.
            gathers = self.strategy in ALL_GATHER_STRATEGIES + ("hybrid",)
            how = "moves K/V by all-to-all" if self.strategy == "ulysses" else "passes K/V around the ring"
            if heads_k_stride is not None and not gathers:
                raise ValueError(f"heads_k_stride: got {heads_k_stride!r}; {self.strategy} {how} and gathers "
                                 "nothing, so it would be ignored; expected None (or the llama3, zigzag_llama3, "
                                 "balanced or hybrid strategies)")
            stride = nheads_k if heads_k_stride is None else heads_k_stride
            if V.integer_value(stride) is None or stride < 1 or nheads_k % stride != 0:
                where = " per rank after the all-to-all" if self.strategy == "hybrid" else ""
                raise ValueError(f"heads_k_stride: got {heads_k_stride!r}; expected a divisor of "
                                 f"nheads_k={nheads_k}{where}")
            stride = int(stride)
            zigzag = self.strategy in ("zigzag_llama3", "hybrid", "balanced")  # several query groups
            if not zigzag and (mode is not None or verify):
                # (The environment's RINGFLASH_ZIGZAG_* settings stay global and apply where they can.)
                name, value = ("mode", mode) if mode is not None else ("verify", verify)
                raise ValueError(f"{name}: got {value!r} for {self.strategy}, whose ranks run one query group (one "
                                 "launch either way); expected None (mode and verify apply to zigzag_llama3, "
                                 "balanced and hybrid)")
            mode = zigzag_mode(mode) if zigzag else "grouped"
            keep_gathered_kv = V.as_bool("keep_gathered_kv", keep_gathered_kv)
            if keep_gathered_kv and not gathers:
                raise ValueError(f"keep_gathered_kv: {self.strategy} {how} and gathers nothing; expected False "
                                 "(or the llama3, zigzag_llama3, balanced or hybrid strategies)")
            explicit_local_first = local_first is not None
            local_first = _local_first(local_first)
            if local_first and not explicit_local_first and (self.strategy not in ALL_GATHER_STRATEGIES or windowed):
                # RINGFLASH_CP_LOCAL_FIRST is process-wide: it applies where the split can run,
                # as the RINGFLASH_ZIGZAG_* settings do; an explicit local_first=True still raises.
                local_first = False
            if local_first and self.strategy not in ALL_GATHER_STRATEGIES:
                raise ValueError(f"local_first: {self.strategy} does not run the all-gather engine's local-keys-first "
                                 f"split; expected False (or the {', '.join(ALL_GATHER_STRATEGIES)} strategies)")
            if local_first and windowed:
                raise ValueError(f"local_first: a sliding window {tuple(window_size)} is not a prefix of the other "
                                 "ranks' keys; expected window_size=(-1, -1) or local_first=False")
            verify = zigzag_verify(verify) if zigzag else False
            return_lse = V.as_bool("return_lse", return_lse)
            # Every rank must agree on all of it: the backward's re-gather is a collective
            # too, and so is Ulysses' all-to-all of lse (with return_lse).
            signature = call_signature(q, k, v, (causal, left, right, softcap, scale, stride, mode,
                                                 keep_gathered_kv, verify, return_lse, local_first))
        except (ValueError, TypeError, NotImplementedError) as exc:
            error = exc
        self._checks.check(signature, error)
        params = LocalParams(scale, causal, left, right, softcap)
        if self.strategy in ALL_GATHER_STRATEGIES:
            spec = self._allgather_spec(local_first, causal)

            def run(mode, keep):
                return AllGatherAttention.apply(q, k, v, spec, params, self.comm, stride, mode, keep)
        elif heads is not None:
            def run(mode, keep):
                return self._ulysses(q, k, v, params, heads, stride, mode, keep, return_lse or verify)
        else:
            def run(mode, keep):
                return RingAttention.apply(q, k, v, self._ring_steps(causal, left, right), self.n_max, params,
                                           self.comm)
        out, lse = run(mode, keep_gathered_kv)
        if verify:
            other = "two_kernels" if mode == "grouped" else "grouped"
            with torch.no_grad():
                ref, ref_lse = run(other, False)
            mismatch: Optional[RuntimeError] = None
            try:
                _check_modes_agree(out, lse, ref, ref_lse, mode, other, self.strategy)
            except RuntimeError as exc:
                mismatch = exc
            # One rank's mismatch must stop every rank: the others would otherwise go on
            # into the backward's collectives and wait for it (a hang under NCCL).
            check_agreement(self.comm, None, q.device, f"{self.strategy} verify", mismatch)
        return (out, lse) if return_lse else out

    def _ulysses(self, q, k, v, params: LocalParams, heads: HeadSplit, stride: int, mode: str, keep: bool,
                 need_lse: bool):
        """ulysses: all-to-all over the whole group, the plain varlen kernel on every
        document. hybrid: all-to-all inside this rank's Ulysses group, zigzag_llama3's
        all-gather engine across the groups."""
        u = self.ulysses_degree
        first = self.rank - self.rank % u
        counts = self.num_local[first:first + u]
        if self.strategy == "ulysses":
            if "ulysses" not in self._cache:
                self._cache["ulysses"] = SeqMeta.from_cu_seqlens(self.cu_seqlens, self.cu_seqlens)
            longest = max(self.seqlens + [1])
            inner = LocalInner(self._cache["ulysses"], longest, params, self.profiler)  # type: ignore[arg-type]
            return UlyssesAttention.apply(q, k, v, counts, self.comm, inner, heads, need_lse)
        if "hybrid" not in self._cache:
            across = self.world_size // u
            streams = [rank_pieces("zigzag_llama3", self.seqlens, g, across) for g in range(across)]
            self._cache["hybrid"] = _allgather_spec(streams, self.rank // u, self.seqlens, self.cu_seqlens, 2)
        inner = AllGatherInner(self._cache["hybrid"], params, self._across_comm, stride, mode, keep)  # type: ignore
        return UlyssesAttention.apply(q, k, v, counts, self._ulysses_comm, inner, heads, need_lse)

    # -- metadata --------------------------------------------------------------------------

    def _allgather_spec(self, local_first: bool = False, causal: bool = True) -> AllGatherSpec:
        """Local queries against the gathered keys in global order (llama3, zigzag_llama3,
        balanced); with ``local_first``, split into own keys and the other ranks' keys."""
        key = ("allgather", causal) if local_first else "allgather"
        if key not in self._cache:
            # One query group per piece of a document on this rank: zigzag's two chunks,
            # llama3's one, and as many zigzag pairs as the balanced layout dealt here.
            groups = query_groups(self.strategy, self.pieces[self.rank])
            if local_first:
                self._cache[key] = _local_first_spec(self.pieces, self.rank, self.seqlens, self.cu_seqlens, groups,
                                                     causal)
            else:
                self._cache[key] = _allgather_spec(self.pieces, self.rank, self.seqlens, self.cu_seqlens, groups)
        return self._cache[key]  # type: ignore[return-value]

    def _ring_steps(self, causal: bool, left: int, right: int) -> list[RingStep]:
        key = ("ring", causal, left, right)
        if key not in self._cache:
            self._cache[key] = [self._ring_step(s, causal, left, right) for s in range(self.world_size)]
        return self._cache[key]  # type: ignore[return-value]

    def _ring_step(self, step: int, causal: bool, left: int, right: int) -> RingStep:
        """Local queries against the block of rank src = rank - step: one entry per sequence."""
        r, src = self.rank, (self.rank - step) % self.world_size
        q_seg, k_seg = self.segments[r], self.segments[src]
        num_seqs = len(self.seqlens)
        cu_k = [0]
        for _, n in k_seg:
            cu_k.append(cu_k[-1] + n)
        q_start = [a for a, _ in q_seg]
        q_end = [a + n for a, n in q_seg]
        used = [n for _, n in k_seg]
        diag = [ALL_VISIBLE] * num_seqs
        windowed = left >= 0 or right >= 0
        if self.strategy == "ring" and (causal or windowed):
            # One contiguous piece each side: the offset of their first positions.
            for i in range(num_seqs):
                diag[i] = self._piece_start(r, i) - self._piece_start(src, i)
        elif self.strategy == "stripe" and causal:
            # Query t sits at position r + W t, key u at src + W u: u <= t + floor((r - src) / W).
            diag = [0 if src <= r else -1] * num_seqs
        elif self.strategy == "zigzag_ring" and causal:
            for i in range(num_seqs):
                first_q, first_k = self._zigzag_chunk_len(i, r), self._zigzag_chunk_len(i, src)
                if src == r:
                    diag[i] = 0  # same chunks both sides: plain causal in local order
                elif src < r:
                    used[i] = first_k  # all queries see chunk src, none see chunk 2W-1-src
                else:
                    q_start[i] += first_q  # only chunk 2W-1-r sees anything, and all of the block
        lens_q = [e - a for a, e in zip(q_start, q_end)]
        visible = [
            n > 0 and u > 0 and (not causal or d + n - 1 >= 0)
            for n, u, d in zip(lens_q, used, diag)
        ]
        meta = SeqMeta(
            _tensor([q_start], self.device), _tensor([q_end], self.device), _tensor(cu_k, self.device),
            _tensor([used], self.device), _tensor([diag], self.device),
        )
        # max_k bounds every key sequence of the block, not only the keys used: the dK/dV
        # kernel covers (and zeroes) the keys no query sees up to it, so a smaller bound
        # left the unused tail of a zigzag block uninitialised.
        return RingStep(
            meta=meta, max_q=max(lens_q + [1]), max_k=max([n for _, n in k_seg] + [1]), skip=not any(visible),
            covers_all=sum(lens_q) == self.num_local_tokens,
        )

    def _piece_start(self, rank: int, seq: int) -> int:
        for p in self.pieces[rank]:
            if p.seq == seq:
                return p.start
        return 0

    def _zigzag_chunk_len(self, seq: int, rank: int) -> int:
        return chunk_bounds(self.seqlens[seq], 2 * self.world_size)[rank][1]


def _check_modes_agree(out, lse, ref, ref_lse, mode: str, other: str, strategy: str = "zigzag_llama3") -> None:
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}[out.dtype]
    # A rank may hold no tokens (documents totalling fewer than the ranks): the max of its
    # empty results raised there alone, after the collectives, and the others hung in the
    # backward's re-gather.
    diff = (out.float() - ref.float()).abs().max().item() if out.numel() else 0.0
    scale = ref.float().abs().max().item() if ref.numel() else 0.0
    finite = torch.isfinite(lse)
    lse_diff = (lse[finite] - ref_lse[finite]).abs().max().item() if finite.any() else 0.0
    if diff > tol * max(1.0, scale) or lse_diff > 1e-3 or not torch.equal(finite, torch.isfinite(ref_lse)):
        raise RuntimeError(f"{strategy} verify: modes {mode!r} and {other!r} disagree "
                           f"(max |out diff| {diff:.3e}, max |lse diff| {lse_diff:.3e})")
