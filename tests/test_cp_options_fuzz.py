"""Context-parallel options that test_cp.py's cases leave out, on gloo (CPU, Triton's
interpreter), against float64 single-process attention (out, lse, dq, dk, dv):

* ``softmax_scale`` (test_cp never passes one) and softcap on every strategy (test_cp:
  ulysses and hybrid only);
* windows bounded on the right (non-causal), one-sided, wider than a document, with GQA
  down to one KV head, and Ulysses with KV heads replicated across ranks;
* ``Plan.position_ids`` and ``shard``/``gather`` round trips for every layout;
* the local-first split (``local_first=True``) when one rank holds every token, so the
  other ranks' keys are empty (regression: dK/dV came back zero);
* unsupported windows (zigzag_ring, stripe) raise the same error on every rank, including
  a right-only window without causal.

One process group per world size (2, 3 and 4) runs all of its cases."""

from __future__ import annotations

import random
import re
from typing import NamedTuple, Optional

import pytest

from ringflash.cp.launch import run_local
from shared_run import once_per_session


class Case(NamedTuple):
    strategy: str
    lengths: tuple
    heads: tuple = (4, 2)
    causal: bool = True
    window: tuple = (-1, -1)
    softcap: float = 0.0
    scale: Optional[float] = None
    stride: Optional[int] = None
    mode: Optional[str] = None
    keep: bool = False
    local_first: bool = False
    udeg: Optional[int] = None  # hybrid's ulysses_degree
    min_piece: Optional[int] = None  # balanced
    seed: int = 0
    error: Optional[str] = None  # a pattern every rank's error must match
    tag: str = ""

    @property
    def id(self) -> str:
        parts = [self.tag, self.strategy, "causal" if self.causal else "full", "len" + "_".join(map(str, self.lengths)),
                 f"h{self.heads[0]}-{self.heads[1]}"]
        for name, value, default in (("u", self.udeg, None), ("min", self.min_piece, None), ("scale", self.scale, None),
                                     ("softcap", self.softcap, 0.0), ("stride", self.stride, None),
                                     ("mode", self.mode, None), ("keep", self.keep, False),
                                     ("local_first", self.local_first, False)):
            if value != default:
                parts.append(name if value is True else f"{name}{value}")
        if self.window != (-1, -1):
            parts.append(f"window{self.window[0]}_{self.window[1]}")
        return "-".join(p for p in parts if p)


def _data(case: Case):
    import torch

    gen = torch.Generator().manual_seed(case.seed)
    total = sum(case.lengths)
    h, hk = case.heads
    mk = lambda n: torch.randn(total, n, 16, generator=gen, dtype=torch.float64)  # noqa: E731
    cu = torch.tensor([0] + torch.tensor(case.lengths, dtype=torch.long).cumsum(0).tolist(), dtype=torch.int32)
    return cu, mk(h), mk(hk), mk(hk), mk(h)


def _reference(case: Case):
    import torch

    from ringflash import attention_varlen_ref

    cu, q, k, v, dout = _data(case)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    m = max(case.lengths)
    out, lse = attention_varlen_ref(*leaves, cu, cu, m, m, causal=case.causal, softmax_scale=case.scale,
                                    window_size=case.window, softcap=case.softcap)
    return (out, lse, *torch.autograd.grad(out, leaves, dout))


def _run(case: Case):
    """Gathered (out, lse, dq, dk, dv) and the layout problems found on this rank."""
    import torch

    from ringflash.cp import Plan

    cu, q64, k64, v64, dout64 = _data(case)
    kw = {}
    if case.udeg is not None:
        kw["ulysses_degree"] = case.udeg
    if case.min_piece is not None:
        kw["min_piece"] = case.min_piece
    plan = Plan(cu, None, strategy=case.strategy, **kw)
    problems = []
    positions = torch.cat([torch.arange(n) for n in case.lengths])
    if not torch.equal(plan.position_ids.cpu(), plan.shard(positions)):
        problems.append(f"position_ids {plan.position_ids.tolist()} != shard(positions)")
    if not torch.equal(plan.gather(plan.position_ids), positions):
        problems.append("gather(position_ids) != every token's position in its document")
    x = torch.randn(sum(case.lengths), 3, 2, generator=torch.Generator().manual_seed(case.seed))  # same on every rank
    if not torch.equal(plan.gather(plan.shard(x)), x):
        problems.append("gather(shard(x)) != x")
    q, k, v = (plan.shard(t.float()).requires_grad_() for t in (q64, k64, v64))
    out, lse = plan.attention(q, k, v, causal=case.causal, softmax_scale=case.scale, window_size=case.window,
                              softcap=case.softcap, heads_k_stride=case.stride, mode=case.mode, return_lse=True,
                              keep_gathered_kv=case.keep, local_first=case.local_first)
    grads = torch.autograd.grad(out, (q, k, v), plan.shard(dout64.float()))
    results = [plan.gather(out), plan.gather(lse.t().contiguous()).t(), *(plan.gather(g) for g in grads)]
    return results, problems


def _compare(case: Case, results) -> list:
    import torch

    problems = []
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), results, _reference(case)):
        got = got.double()
        finite = torch.isfinite(want)
        if got.shape != want.shape or not torch.equal(finite, torch.isfinite(got)):
            problems.append(f"{name}: shape or non-finite entries differ")
            continue
        err = (got[finite] - want[finite]).abs().max().item() if finite.any() else 0.0
        bound = 2e-4 * max(1.0, want[finite].abs().max().item() if finite.any() else 0.0)
        if not err <= bound:
            problems.append(f"{name}: max abs error {err:.3e} > {bound:.1e}")
    return problems


def _worker(rank: int, world_size: int, cases: list) -> dict:
    import traceback

    try:
        from interpreter_options import skip_dead_overflow_checks

        skip_dead_overflow_checks()
    except ImportError:
        pass
    report = {}
    for case in cases:
        try:
            results, problems = _run(case)
            if case.error is not None:
                report[case.id] = f"no error (expected {case.error})"
                continue
            if rank == 0:
                problems += _compare(case, results)
            report[case.id] = "ok" if not problems else "; ".join(problems)
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"
            if case.error is not None and re.match(case.error, text):
                report[case.id] = "ok"
            else:
                report[case.id] = text + "\n" + traceback.format_exc()[-1500:]
    return report


# -- cases ----------------------------------------------------------------------------------

#: local_first when one rank holds every token (the other ranks' key set is empty): the
#: remote part's backward, called with no keys, zeroed the whole rank-major dK/dV buffer,
#: wiping the own-keys part's gradients written into it just before.
LOCAL_FIRST_ALONE = [
    Case("llama3", (1,), heads=(2, 1), local_first=True, tag="alone"),
    Case("zigzag_llama3", (1, 1), heads=(4, 4), causal=False, scale=2.0, stride=2, local_first=True, tag="alone"),
    # The default min_piece keeps a short document whole: rank 0 holds it all.
    Case("balanced", (6,), heads=(2, 1), local_first=True, tag="alone"),
    Case("balanced", (6,), heads=(4, 2), local_first=True, mode="two_kernels", keep=True, stride=1, tag="alone"),
]

_NOT_INTERLEAVED = "NotImplementedError: window_size: {} interleaves each rank's tokens"
ERROR_CASES = [
    Case("zigzag_ring", (8, 5), causal=False, window=(-1, 2), error=_NOT_INTERLEAVED.format("zigzag_ring"), tag="err"),
    Case("stripe", (8, 5), causal=False, window=(3, 0), error=_NOT_INTERLEAVED.format("stripe"), tag="err"),
]


def _explicit(world_size: int) -> list:
    """Options test_cp leaves out, on each strategy."""
    u = {2: 2, 3: 3, 4: 4}[world_size]
    uly_heads = (4, 1) if world_size != 3 else (6, 1)  # KV heads replicated over the ranks
    uly_heads_2 = (4, 2) if world_size != 3 else (6, 3)
    cases = [
        Case("zigzag_llama3", (11, 1, 3, 17, 5), causal=False, window=(2, 3), scale=0.3, softcap=2.5, stride=1),
        Case("zigzag_llama3", (20, 2), window=(30, -1), scale=1.7, heads=(4, 1), mode="two_kernels"),
        Case("llama3", (11, 1, 3, 17, 5), causal=False, window=(-1, 2), softcap=0.7, heads=(4, 1)),
        Case("llama3", (3, 0, 9), causal=False, scale=0.05, softcap=2.5, keep=True),
        Case("ring", (11, 1, 3, 17, 5), causal=False, window=(-1, 1), scale=0.9, heads=(4, 4)),
        Case("ring", (1, 2, 25), causal=False, window=(0, 40), softcap=2.5, heads=(4, 1)),
        Case("zigzag_ring", (11, 1, 3, 17, 5), scale=2.0, softcap=0.7, heads=(4, 1)),
        Case("stripe", (11, 1, 3, 17, 5), causal=False, scale=0.3, softcap=2.5),
        Case("stripe", (11, 1, 3, 17, 5), window=(-1, 4), scale=0.3),  # causal: the right bound is 0
        Case("balanced", (23, 9, 30), min_piece=2, causal=False, window=(3, 3), scale=0.9, softcap=2.5, heads=(4, 1)),
        Case("balanced", (1, 2, 1, 0, 40), min_piece=3, local_first=True, scale=0.3, softcap=0.7),
        Case("ulysses", (11, 1, 3, 17, 5), heads=uly_heads, causal=False, window=(4, 0), scale=0.3, softcap=2.5),
        Case("ulysses", (1,) * 7 + (30,), heads=uly_heads_2, window=(40, -1), scale=1.7),
    ]
    if world_size == 4:
        cases += [
            Case("hybrid", (11, 1, 3, 17, 5), udeg=2, heads=(4, 1), causal=False, window=(2, 5), scale=0.3,
                 softcap=2.5),
            Case("hybrid", (2, 1, 30), udeg=2, heads=(4, 2), window=(-1, 3), scale=1.7, keep=True,
                 mode="two_kernels"),
            Case("hybrid", (9, 0, 4), udeg=u, heads=(4, 2), causal=False, window=(-1, 1)),
        ]
    return cases


def _fuzz(world_size: int, count: int = 10) -> list:
    """Seeded random batches (1-14 documents, <= 64 tokens, some shorter than W or empty)
    with random options each strategy supports."""
    rng = random.Random(1000 + world_size)
    strategies = ["zigzag_llama3", "llama3", "ring", "zigzag_ring", "stripe", "balanced", "ulysses"]
    if world_size == 4:
        strategies.append("hybrid")
    cases = []
    for i in range(count):
        strategy = strategies[i % len(strategies)]
        kind = rng.choice(["ragged", "tiny", "long", "short", "zero"])
        lengths = {
            "ragged": lambda: [rng.randint(1, 20) for _ in range(rng.randint(1, 4))],
            "tiny": lambda: [rng.randint(1, max(1, world_size - 1)) for _ in range(rng.randint(1, 3))],
            "long": lambda: [rng.randint(30, 64)],
            "short": lambda: [rng.choice([1, 1, 2, 3]) for _ in range(rng.randint(5, 14))],
            "zero": lambda: [rng.randint(1, 15), 0, rng.randint(1, 15)],
        }[kind]()
        udeg = 2 if strategy == "hybrid" else None
        degree = world_size if strategy == "ulysses" else udeg
        nheads = 6 if degree == 3 else 4
        kv_options = [hk for hk in (1, 2, 3, 4, 6) if nheads % hk == 0
                      and (degree is None or hk % degree == 0 or degree % hk == 0)]
        causal = rng.random() < 0.6
        window = (-1, -1)
        if strategy not in ("zigzag_ring", "stripe") and rng.random() < 0.6:
            side = lambda: rng.choice([-1, 0, 1, rng.randint(2, 6), max(lengths) + 3])  # noqa: E731
            window = (side(), side())
        cases.append(Case(
            strategy, tuple(lengths), heads=(nheads, rng.choice(kv_options)), causal=causal, window=window,
            softcap=rng.choice([0.0, 0.7, 2.5]), scale=rng.choice([None, 0.05, 0.9, 2.0]),
            mode=rng.choice([None, "two_kernels"]) if strategy in ("zigzag_llama3", "balanced", "hybrid") else None,
            udeg=udeg, min_piece=rng.choice([1, 2, 3]) if strategy == "balanced" else None,
            seed=rng.randint(0, 10**6), tag=f"fuzz{i}",
        ))
    return cases


WORLD_SIZES = [2, 3, 4]
CASES = {w: _explicit(w) + _fuzz(w) + ERROR_CASES for w in WORLD_SIZES}
CASES[2] = LOCAL_FIRST_ALONE + CASES[2]


@once_per_session
def _reports(world_size: int) -> list:
    return run_local(_worker, world_size, CASES[world_size], timeout=600)


_PARAMS = [(w, c) for w in WORLD_SIZES for c in CASES[w]]


@pytest.mark.parametrize("world_size, case", _PARAMS, ids=[f"{c.id}-w{w}" for w, c in _PARAMS])
def test_cp_options_match_single_process(world_size, case):
    """rank 0 compares with float64 attention; every rank checks its layout (and, for the
    error cases, that it raised the expected error)."""
    for rank, report in enumerate(_reports(world_size)):
        assert report[case.id] == "ok", f"rank {rank}: {report[case.id]}"
