"""Regression tests of the reliability review that need several ranks (gloo on the CPU, or
NCCL with RINGFLASH_CP_BACKEND=nccl), and fault tests of the local launcher: a rank that
raises, exits or crashes must fail the run promptly with that rank's report, and a call
that differs between ranks must fail on every rank, never hang."""

import os
import re
import time

import pytest

from cp_reliability_cases import SCENARIOS, reliability_worker
from ringflash.cp.launch import run_local
from shared_run import once_per_session

BACKEND = os.environ.get("RINGFLASH_CP_BACKEND", "gloo")

#: scenario -> the pattern every rank's report must match (rank-specific where it differs).
EXPECTED = {
    "refilled cu_seqlens": r"ok$",
    "fooled layout check": r"ValueError: cu_seqlens and strategy: differ across ranks",
    "llama3 max_seqlen_k": r"ValueError: max_seqlen_k: got 1; expected >= \d+",
    "llama3 shifted slice": r"ValueError: local_k_slice: got slice\(\d+, \d+, None\); expected start in",
    "llama3 cu_seqlens_k": r"ValueError: cu_seqlens_k: got \[.*\]\.\.\.; expected cu_seqlens_q's boundaries shifted",
    "llama3 bad on one rank": {0: r"ValueError: .*rank\(s\) \[1\] rejected their inputs",
                               1: r"ValueError: max_seqlen_k: got 1"},
    "inference mode": r"ok$",
    "later call mismatch": r"ValueError: q, k, v or options: differ across ranks",
    "backward mismatch": r"ValueError: q, k, v or options: differ across ranks",
    "local error on one rank": {0: r"ValueError: .*rank\(s\) \[1\] rejected their inputs",
                                1: r"ValueError: q: has \d+ tokens; expected this rank's \d+"},
    "plan cache is bounded": r"ok$",
    "step error leaves the group usable": r"ok$",
    "double backward raises": r"ok$",
}
assert set(EXPECTED) == set(SCENARIOS)


@once_per_session
def _reports() -> list:
    return run_local(reliability_worker, 2, list(SCENARIOS), backend=BACKEND, timeout=600)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_cp_reliability_scenario(scenario):
    for rank, report in enumerate(_reports()):
        pattern = EXPECTED[scenario]
        pattern = pattern[rank] if isinstance(pattern, dict) else pattern
        assert re.match(pattern, report[scenario], re.S), f"rank {rank}: {report[scenario]}"


# -- run_local itself ------------------------------------------------------------------------


def _raise_on_rank_1(rank, world, _):
    import torch
    import torch.distributed as dist

    if rank == 1:
        raise RuntimeError("rank 1 broke mid-step")
    dist.all_reduce(torch.ones(1))  # rank 0 waits here for a peer that never comes
    return "unreachable"


def _exit_on_rank_1(rank, world, _):
    import torch
    import torch.distributed as dist

    if rank == 1:
        os._exit(3)
    dist.all_reduce(torch.ones(1))
    return "unreachable"


def _segfault_on_rank_1(rank, world, _):
    import ctypes

    import torch
    import torch.distributed as dist

    if rank == 1:
        ctypes.string_at(0)  # a null-pointer read: SIGSEGV
    dist.all_reduce(torch.ones(1))
    return "unreachable"


@pytest.mark.parametrize(
    "target,pattern",
    [
        (_raise_on_rank_1, r"rank 1:\nTraceback .*RuntimeError: rank 1 broke mid-step"),
        (_exit_on_rank_1, r"rank 1: exited with code 3 without reporting a result"),
        (_segfault_on_rank_1, r"rank 1: exited with code -11 without reporting a result\n.*Segmentation fault"),
    ],
    ids=["raises", "exits", "segfaults"],
)
def test_run_local_fails_promptly_with_the_ranks_report(target, pattern):
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=re.compile(pattern, re.S)):
        run_local(target, 2, None, backend="gloo", timeout=300)
    assert time.monotonic() - start < 60, "run_local waited for the timeout instead of failing at once"


def _report_environment(rank, world, _):
    import triton.knobs

    return os.environ.get("TRITON_INTERPRET"), bool(triton.knobs.runtime.interpret)


def test_gloo_ranks_always_run_the_interpreter(monkeypatch):
    """On a GPU machine the parent compiles its kernels; gloo ranks hold CPU tensors and
    must interpret them from their first import on (issue 14's GPU-machine failure)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert run_local(_report_environment, 2, None, backend="gloo", timeout=300) == [("1", True)] * 2
    assert os.environ["TRITON_INTERPRET"] == "0"  # the parent's own setting is left alone
