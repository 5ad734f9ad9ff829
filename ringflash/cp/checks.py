"""Cross-rank agreement checks for context parallelism.

A collective that one rank skips, or enters with other sizes, hangs or corrupts the other
ranks. So every rank states what it is about to do (a signature: shapes, dtypes, options,
whether it will run a backward) and whether its own checks passed, in one small
all-gather; a disagreement or a local error then raises on *every* rank, with the same
decision everywhere, before any data collective starts.

When the check runs:

* On a group that can communicate CPU tensors (gloo, or a mixed backend such as
  ``init_process_group("cuda:nccl,cpu:gloo")``, torchtitan's default), at every call:
  the exchange costs a host round trip and no device sync.
* On an NCCL-only group, on the first call of each signature (one device sync each, so
  later calls stay sync-free). A rank that alone changes its signature on a later call
  then checks while the others do not; use a mixed backend to close that gap.

Signatures are compared through a SHA-256 digest of their text, so any difference (not
only a different checksum) is caught; the text itself goes into the error message.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import torch
import torch.distributed as dist

from .comm import Comm

#: 63-bit words of the digest that travel (4 x 63 bits: collisions are not a concern).
_DIGEST_WORDS = 4


def cpu_collectives(group: dist.ProcessGroup) -> bool:
    """Whether ``group`` can all-gather CPU tensors (gloo, alone or beside NCCL)."""
    return "gloo" in str(dist.get_backend(group))


def digest(text: str) -> list[int]:
    raw = hashlib.sha256(text.encode()).digest()
    return [int.from_bytes(raw[8 * i:8 * i + 8], "little") >> 1 for i in range(_DIGEST_WORDS)]


def exchange(comm: Comm, words: list[int], device: torch.device) -> torch.Tensor:
    """All-gather one int64 row per rank; returns (world_size, len(words)) on the CPU."""
    if cpu_collectives(comm.group):
        on = torch.device("cpu")
    elif device.type == "cuda":
        on = device
    else:  # NCCL needs a GPU tensor even when the caller's argument was not one
        on = torch.device("cuda", torch.cuda.current_device())
    mine = torch.tensor(words, dtype=torch.long, device=on)
    every = mine.new_empty(comm.world_size * mine.numel())
    with comm.profiler.pass_("checks"):  # the cross-rank agreement's collective, when profiled
        comm.all_gather(every, mine).wait()
    return every.view(comm.world_size, -1).cpu()


def check_agreement(comm: Comm, text: Optional[str], device: torch.device, what: str,
                    local_error: Optional[BaseException] = None) -> None:
    """One collective: raise on every rank unless all ranks passed ``text`` (their
    signature) and none had a ``local_error``. This rank re-raises its own error; the
    others name the ranks that failed."""
    words = [0 if local_error is None else 1] + (digest(text) if text is not None else [0] * _DIGEST_WORDS)
    every = exchange(comm, words, device)
    failed = [r for r in range(comm.world_size) if every[r, 0] != 0]
    if local_error is not None:
        raise local_error
    if failed:
        raise ValueError(f"{what}: rank(s) {failed} rejected their inputs (see the error on those ranks); "
                         "expected valid inputs on every rank, so every rank stops here instead of waiting for them")
    differ = [r for r in range(comm.world_size) if not torch.equal(every[r], every[0])]
    if differ:
        raise ValueError(f"{what}: differ across ranks (ranks {differ} differ from rank 0); expected the same on "
                         f"every rank. This rank (rank {comm.rank}) has: {text}")


class SignatureChecks:
    """The per-call check of one plan (or one API entry point), with the policy of the
    module doc: every call on CPU-capable groups, else the first call of each signature."""

    def __init__(self, comm: Comm, device: torch.device, what: str):
        self.comm, self.device, self.what = comm, device, what
        self.every_call = cpu_collectives(comm.group)
        self.seen: set[str] = set()

    def check(self, text: Optional[str], local_error: Optional[BaseException] = None) -> None:
        if self.every_call or local_error is not None or text not in self.seen:
            check_agreement(self.comm, text, self.device, self.what, local_error)
            if text is not None:
                self.seen.add(text)


def call_signature(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: tuple) -> str:
    """What every rank must agree on for one attention call: per-token shapes, dtypes, the
    device type, whether a backward will follow (a rank without one would skip the
    backward's collectives) and the options."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return (f"q{tuple(q.shape[1:])} k{tuple(k.shape[1:])} v{tuple(v.shape[1:])} "
            f"dtypes=({q.dtype}, {k.dtype}, {v.dtype}) device={q.device.type} backward={grad} options={options!r}")
