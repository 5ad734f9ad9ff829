"""ZIGZAG_PROFILE_KERNELS / Plan(profile=True): per-step timings of communication and
kernels, per rank, for each engine (all-gather, ring, Ulysses, hybrid), without changing
any result; and the flag's validation."""

import os

import pytest
import torch

from conftest import cu_seqlens_from_lengths
from ringflash.cp import profile as cp_profile
from ringflash.cp.launch import run_local

BACKEND = os.environ.get("RINGFLASH_CP_BACKEND", "gloo")

#: strategy -> span names (beyond "<pass>: attention") that each pass must report.
EXPECTED = {
    "zigzag_llama3": {"forward: wait all_gather", "backward: wait all_gather", "backward: wait reduce_scatter",
                      "backward: prepare"},
    # A ring step waits, at its end, for the next step's block; rank 0's causal step 1
    # sees no key (the block of a later rank) and is skipped.
    "ring": {"forward [step 0]: attention", "forward [step 0]: wait ring", "forward [step 0]: merge",
             "backward [step 0]: attention", "backward [step 0]: wait ring", "backward: prepare"},
    "ulysses": {"forward: wait all_to_all", "backward: wait all_to_all"},
    "hybrid": {"forward: wait all_to_all", "forward: wait all_gather", "backward: wait reduce_scatter",
               "backward: wait all_to_all"},
}


def _profile_worker(rank: int, world_size: int, payload):
    import torch.distributed as dist

    from ringflash.cp import Plan

    device = torch.device("cuda", rank) if BACKEND == "nccl" else torch.device("cpu")
    results = {}
    for strategy, kwargs in payload:
        gen = torch.Generator().manual_seed(7)
        lengths = (5, 13, 2) if strategy != "hybrid" else (9, 12)
        cu = cu_seqlens_from_lengths(lengths).to(device)
        total = sum(lengths)
        q, k, v = (torch.randn(total, 4, 8, generator=gen).to(device) for _ in range(3))
        runs = []
        for profile in (False, True):
            plan = Plan(cu, None, strategy, profile=profile, **kwargs)
            ql, kl, vl = (plan.shard(t).requires_grad_() for t in (q, k, v))
            out = plan.attention(ql, kl, vl, causal=True)
            out.backward(torch.ones_like(out))
            runs.append((out.detach(), ql.grad, kl.grad, vl.grad))
            if profile:
                summary = plan.profile()
                every = plan.profile(all_ranks=True)
                described = plan.describe()["profile"]
                plan.reset_profile()
                after_reset = plan.profile()
        same = all(torch.equal(a, b) for a, b in zip(*runs))
        results[strategy] = (same, summary, len(every), described == summary, after_reset)
    dist.barrier()
    return results


def test_profile_reports_each_engines_steps():
    # One process group for every engine (CI time); hybrid at W=2 is one Ulysses group of 2
    # and an all-gather "across" a single group, which still nests the two passes.
    world_size = 2
    payload = [("zigzag_llama3", {}), ("ring", {}), ("ulysses", {}), ("hybrid", {"ulysses_degree": 2})]
    reports = run_local(_profile_worker, world_size, payload, backend=BACKEND, timeout=600)
    for rank, results in enumerate(reports):
        for strategy, _ in payload:
            same, summary, n_reports, described_same, after_reset = results[strategy]
            assert same, f"rank {rank} {strategy}: profiling changed the results"
            assert summary["calls"] == {"forward": 1, "backward": 1}, (strategy, summary["calls"])
            spans = summary["spans"]
            attention = {n for n in spans if n.endswith(": attention")}
            assert any(n.startswith("forward") for n in attention) and any(n.startswith("backward") for n in attention)
            missing = EXPECTED[strategy] - set(spans)
            assert not missing, f"rank {rank} {strategy}: no spans {missing} in {sorted(spans)}"
            for name, s in spans.items():
                assert s["count"] >= 1 and 0 <= s["mean_ms"] <= s["max_ms"] <= s["total_ms"] + 1e-9, (name, s)
            assert n_reports == world_size and described_same
            assert after_reset["spans"] == {} and after_reset["calls"] == {"forward": 0, "backward": 0}


def test_flag_validation_and_off_by_default(monkeypatch):
    for name in cp_profile.ENV_FLAGS:
        monkeypatch.delenv(name, raising=False)
    assert not cp_profile.requested()
    monkeypatch.setenv("ZIGZAG_PROFILE_KERNELS", "1")
    assert cp_profile.requested()
    monkeypatch.setenv("ZIGZAG_PROFILE_KERNELS", "yes")
    with pytest.raises(ValueError, match="ZIGZAG_PROFILE_KERNELS: got 'yes'; expected 1"):
        cp_profile.requested()
    off = cp_profile.OFF
    work = object()
    assert off.timed_wait(work, "x", None) is work and off.summary() == {}


def test_summary_table_and_exit_report():
    prof = cp_profile.shared("test table", rank=3)
    prof.reset()
    with prof.pass_("forward"):
        prof.step = 1
        with prof.span("attention"):
            pass
    summary = prof.summary()
    assert list(summary["spans"]) == ["forward [step 1]: attention"]
    text = cp_profile.format_summary(summary, prof.rank)
    assert text.startswith("rank 3: 1 forward, 0 backward passes") and "forward [step 1]: attention" in text
    assert "ringflash CP profile, test table" in cp_profile.report_all()
    prof.reset()
