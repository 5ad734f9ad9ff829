"""Timing of each context-parallel step's communication and kernels, per rank.

Turned on by ``ZIGZAG_PROFILE_KERNELS=1`` (the design notes' flag) or
``RINGFLASH_CP_PROFILE=1`` when a ``Plan`` is built, or by ``Plan(..., profile=True)``.
The plans of one strategy on one process group share a profiler, so the per-batch plans of
a training run add up (``Plan.profile()`` reads it, ``reset()`` clears it).
Off, every hook is a no-op (a shared null context, the collectives' work handles returned
as they are).

What is timed, per pass (forward, backward) and per ring step or all-gather head chunk:

* ``attention``: the local attention kernels of that step;
* ``wait <collective>``: the time the compute stream stood still waiting for a collective
  (all_gather, reduce_scatter, ring, all_to_all), i.e. the communication left exposed;
* ``merge``: the ring engine's float32 merge of a step's partial result;
* ``prepare``: the backward's preprocessing (delta = rowsum(dout * out));
* ``checks: wait all_gather``: the cross-rank agreement check of a call's shapes and
  options (``checks``), when it runs.

A ring step's ``wait ring`` is the wait, at the end of step s, for the block of step s + 1.

Each profiler also prints its table to stderr when the process exits (``report_all``), so
that setting the flag on a training run is enough to see every rank's times.

On a GPU each span is a pair of CUDA events recorded on the current stream: nothing waits
for them in the timed path (no host sync); their times are read when a summary is asked
for, or, for old spans, when they have already completed (``Event.query``), so that a long
run keeps a bounded list. On the CPU (gloo) the kernels and collectives run synchronously
and spans are wall-clock intervals.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import time
from typing import Iterator, Optional

import torch

#: Environment flags that turn profiling on for new plans.
ENV_FLAGS = ("ZIGZAG_PROFILE_KERNELS", "RINGFLASH_CP_PROFILE")

#: Unresolved CUDA spans kept before the completed ones are folded into the totals.
_PENDING_LIMIT = 1024


def requested() -> bool:
    """Whether an environment flag asks for profiling (``1``; ``0`` or unset: off)."""
    on = False
    for name in ENV_FLAGS:
        value = os.environ.get(name)
        if value not in (None, "", "0", "1"):
            raise ValueError(f"{name}: got {value!r}; expected 1 (profile) or 0")
        on = on or value == "1"
    return on


class _Stat:
    __slots__ = ("count", "total_ms", "max_ms")

    def __init__(self) -> None:
        self.count, self.total_ms, self.max_ms = 0, 0.0, 0.0

    def add(self, ms: float) -> None:
        self.count += 1
        self.total_ms += ms
        self.max_ms = max(self.max_ms, ms)


class Profiler:
    """Accumulates named spans. ``phase`` ("forward"/"backward") and ``step`` (a ring step
    or head chunk) are set by the engines and prefix every span's name."""

    enabled = True

    def __init__(self, label: str = "", rank: Optional[int] = None) -> None:
        self.label, self.rank = label, rank
        self.phase = ""
        self.step: Optional[int] = None
        self._stats: dict[str, _Stat] = {}
        self._pending: list[tuple[str, object, object]] = []
        self.calls = {"forward": 0, "backward": 0}

    def name(self, what: str) -> str:
        where = f" [step {self.step}]" if self.step is not None else ""
        return f"{self.phase}{where}: {what}" if self.phase else what

    @contextlib.contextmanager
    def pass_(self, phase: str) -> Iterator[None]:
        """Spans inside belong to ``phase``; counts the forward and backward passes."""
        saved = (self.phase, self.step)
        self.phase, self.step = phase, None
        if phase in self.calls and saved[0] != phase:  # hybrid nests the all-gather's pass in Ulysses'
            self.calls[phase] += 1
        try:
            yield
        finally:
            self.phase, self.step = saved

    @contextlib.contextmanager
    def span(self, what: str, device: Optional[torch.device] = None) -> Iterator[None]:
        name = self.name(what)
        if device is not None and device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._pending.append((name, start, end))
                if len(self._pending) > _PENDING_LIMIT:
                    self._fold(block=False)
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._stat(name).add((time.perf_counter() - t0) * 1e3)

    def timed_wait(self, work, what: str, device: Optional[torch.device]):
        """``work`` with its ``wait()`` timed as ``wait <what>``."""
        return _TimedWork(work, self, what, device)

    def _stat(self, name: str) -> _Stat:
        if name not in self._stats:
            self._stats[name] = _Stat()
        return self._stats[name]

    def _fold(self, block: bool) -> None:
        keep = []
        for name, start, end in self._pending:
            if block:
                end.synchronize()  # type: ignore[attr-defined]
            elif not end.query():  # type: ignore[attr-defined]
                keep.append((name, start, end))
                continue
            self._stat(name).add(start.elapsed_time(end))  # type: ignore[attr-defined]
        self._pending = keep

    def summary(self) -> dict:
        """{span name: {count, total_ms, mean_ms, max_ms}} since the plan was built (or the
        last ``reset``), plus ``calls`` (forward and backward passes). Reads the CUDA events
        (waits for the recorded ones to complete)."""
        self._fold(block=True)
        spans = {
            name: {"count": s.count, "total_ms": s.total_ms, "mean_ms": s.total_ms / s.count, "max_ms": s.max_ms}
            for name, s in sorted(self._stats.items())
        }
        return {"calls": dict(self.calls), "spans": spans}

    def reset(self) -> None:
        self._fold(block=True)
        self._stats.clear()
        self.calls = {"forward": 0, "backward": 0}


class _TimedWork:
    __slots__ = ("work", "profiler", "what", "device")

    def __init__(self, work, profiler: Profiler, what: str, device: Optional[torch.device]):
        self.work, self.profiler, self.what, self.device = work, profiler, what, device

    def wait(self):
        with self.profiler.span(f"wait {self.what}", self.device):
            return self.work.wait()

    def __getattr__(self, name):
        return getattr(self.work, name)


class _Off:
    """The disabled profiler: every hook does nothing."""

    enabled = False
    phase = ""
    step = None

    def pass_(self, phase: str):
        return contextlib.nullcontext()

    def span(self, what: str, device: Optional[torch.device] = None):
        return contextlib.nullcontext()

    def timed_wait(self, work, what: str, device: Optional[torch.device]):
        return work

    def summary(self) -> dict:
        return {}

    def reset(self) -> None:
        pass


OFF = _Off()

#: One profiler per label (strategy and group), shared by the plans of every batch, so that
#: a training run's per-batch plans add up; kept for the life of the process.
_SHARED: dict[str, Profiler] = {}


def shared(label: str, rank: Optional[int] = None) -> Profiler:
    """The profiler of ``label``, made on first use; ``report_all`` and the exit report
    include it."""
    if label not in _SHARED:
        if not _SHARED:
            atexit.register(_report_at_exit)
        _SHARED[label] = Profiler(label, rank)
    return _SHARED[label]


def report_all() -> str:
    """Every profiler's table (those that timed at least one pass)."""
    parts = []
    for prof in _SHARED.values():
        summary = prof.summary()
        if any(summary["calls"].values()):
            head = f"ringflash CP profile, {prof.label}" if prof.label else "ringflash CP profile"
            parts.append(f"{head}\n{format_summary(summary, prof.rank)}")
    return "\n".join(parts)


def _report_at_exit() -> None:
    try:
        text = report_all()
    except Exception as exc:  # a torn-down CUDA context must not turn exit into a crash
        text = f"ringflash CP profile: could not read the timings ({exc})"
    if text:
        print(text, file=sys.stderr, flush=True)


def format_summary(summary: dict, rank: Optional[int] = None) -> str:
    """A per-span table of one rank's summary (``Plan.profile()``)."""
    head = f"rank {rank}: " if rank is not None else ""
    calls = summary.get("calls", {})
    lines = [f"{head}{calls.get('forward', 0)} forward, {calls.get('backward', 0)} backward passes",
             f"  {'span':<44} {'count':>6} {'total ms':>10} {'mean ms':>9} {'max ms':>9}"]
    for name, s in summary.get("spans", {}).items():
        lines.append(f"  {name:<44} {s['count']:>6} {s['total_ms']:>10.3f} {s['mean_ms']:>9.3f} {s['max_ms']:>9.3f}")
    return "\n".join(lines)
