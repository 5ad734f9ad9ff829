"""Context-parallel cases run inside the gloo processes of test_cp.py.

Every rank builds the same global data from the case's seed, shards it with the Plan,
runs attention forward and backward, and gathers out, lse and the gradients. Rank 0
compares them with single-process float64 attention on the global batch, at the
project's bar (2x PyTorch's own error in the same dtype + epsilon)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from interpreter_options import skip_dead_overflow_checks

skip_dead_overflow_checks()  # in the spawned gloo ranks too (CI time; see interpreter_options)


@dataclass(frozen=True)
class CPCase:
    strategy: str
    causal: bool = True
    lengths: tuple = (11, 1, 3, 17, 5)  # ragged; shorter than 2W; a single token
    heads: tuple = (2, 1)
    headdim: int = 16
    dtype: str = "float32"
    window: tuple = (-1, -1)
    softcap: float = 0.0
    heads_k_stride: Optional[int] = None
    mode: Optional[str] = None
    keep_gathered_kv: bool = False
    local_first: bool = False  # own keys first, then the other ranks' (all-gather strategies)
    seed: int = 0
    api: str = "plan"  # or the name of a ring-flash-attn-compatible function (test_cp_api)
    strided_cu: bool = False  # pass cu_seqlens as a non-contiguous view
    tag: str = ""  # distinguishes generated cases (fuzz) with otherwise equal ids
    ulysses_degree: Optional[int] = None  # strategy "hybrid"
    min_piece: Optional[int] = None  # strategy "balanced"
    halves: bool = False  # each half of the ranks runs the case on its own group (a proper sub-group)

    @property
    def id(self) -> str:
        parts = [self.tag] if self.tag else []
        parts += [self.api if self.api != "plan" else self.strategy, "causal" if self.causal else "full"]
        if self.ulysses_degree is not None:
            parts.append(f"u{self.ulysses_degree}")
        if self.min_piece is not None:
            parts.append(f"min{self.min_piece}")
        if self.window != (-1, -1):
            parts.append(f"window{self.window[0]}_{self.window[1]}")
        if self.softcap:
            parts.append(f"softcap{self.softcap:g}")
        if self.heads_k_stride:
            parts.append(f"stride{self.heads_k_stride}")
        if self.mode:
            parts.append(self.mode)
        if self.keep_gathered_kv:
            parts.append("keep")
        if self.local_first:
            parts.append("local_first")
        if self.dtype != "float32":
            parts.append(self.dtype)
        if self.heads != (2, 1):
            parts.append(f"h{self.heads[0]}-{self.heads[1]}")
        if self.headdim != 16:
            parts.append(f"d{self.headdim}")
        if self.lengths != CPCase.lengths:
            parts.append("len" + "_".join(map(str, self.lengths)))
        if self.strided_cu:
            parts.append("strided_cu")
        if self.halves:
            parts.append("halves")
        return "-".join(parts)


def device():
    """The rank's device: its GPU under NCCL, else the CPU."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def global_data(case: CPCase):
    import torch

    gen = torch.Generator().manual_seed(case.seed)
    total = sum(case.lengths)
    if total == 0:
        raise ValueError("a case needs at least one token")
    h, hk = case.heads
    mk = lambda n: torch.randn(total, n, case.headdim, generator=gen, dtype=torch.float64)  # noqa: E731
    cu = torch.tensor([0] + list(torch.tensor(case.lengths).cumsum(0).tolist()), dtype=torch.int32)
    return tuple(t.to(device()) for t in (cu, mk(h), mk(hk), mk(hk), mk(h)))


def reference(case: CPCase, cu, q, k, v, dout, dtype):
    """(out, lse, dq, dk, dv) of single-process attention in ``dtype`` (float64 = ground truth)."""
    import torch

    from ringflash import attention_varlen_ref

    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    m = max(case.lengths)
    out, lse = attention_varlen_ref(*leaves, cu, cu, m, m, causal=case.causal, window_size=case.window,
                                    softcap=case.softcap)
    grads = torch.autograd.grad(out, leaves, dout.to(dtype))
    return (out, lse, *grads)


_HALVES: list = []


def _half_group(rank: int, world_size: int):
    """This rank's half of the world, as a process group (both made once, on every rank)."""
    import torch.distributed as dist

    if not _HALVES:
        half = world_size // 2
        _HALVES.extend([dist.new_group(list(range(half))), dist.new_group(list(range(half, world_size)))])
    return _HALVES[rank // (world_size // 2)]


def run_plan_case(case: CPCase, rank: int, world_size: int):
    """Returns the gathered (out, lse, dq, dk, dv) in the case dtype."""
    import torch

    from ringflash.cp import Plan

    dtype = getattr(torch, case.dtype)
    cu, q64, k64, v64, dout64 = global_data(case)
    if case.strided_cu:
        cu = torch.stack([cu, cu], 1)[:, 0]
    group = _half_group(rank, world_size) if case.halves else None
    plan = Plan(cu, group, strategy=case.strategy, ulysses_degree=case.ulysses_degree, min_piece=case.min_piece)
    q, k, v = (plan.shard(t.to(dtype)).requires_grad_() for t in (q64, k64, v64))
    out, lse = plan.attention(q, k, v, causal=case.causal, window_size=case.window, softcap=case.softcap,
                              heads_k_stride=case.heads_k_stride, mode=case.mode, return_lse=True,
                              keep_gathered_kv=case.keep_gathered_kv, local_first=case.local_first)
    grads = torch.autograd.grad(out, (q, k, v), plan.shard(dout64.to(dtype)))
    assert all(g.dtype == dtype for g in grads), [g.dtype for g in grads]
    gathered = [plan.gather(x) for x in (out, *grads)]
    lse_global = plan.gather(lse.t().contiguous()).t()
    return gathered[0], lse_global, *gathered[1:]


def check_case(case: CPCase, results) -> str:
    """Compare gathered CP results with the reference; returns "ok" or the failure."""
    import torch

    from ringflash.testing import assert_close

    eps = {"float32": 1e-5, "float16": 5e-4, "bfloat16": 4e-3}[case.dtype]
    cu, q64, k64, v64, dout64 = global_data(case)
    want = reference(case, cu, q64, k64, v64, dout64, torch.float64)
    base = reference(case, cu, q64, k64, v64, dout64, getattr(torch, case.dtype))
    try:
        for name, got, w, b in zip(("out", "lse", "dq", "dk", "dv"), results, want, base):
            assert_close(name, got, w, baseline=b, atol=eps)
    except AssertionError as exc:
        return str(exc)
    return "ok"


def cp_worker(rank: int, world_size: int, cases: list) -> dict:
    """Runs every case; rank 0 returns {case id: "ok" or the failure}."""
    import traceback

    # RINGFLASH_CP_TEST_TRACE=S (seconds): each rank prints the case it starts and, if still
    # running S seconds later, the stacks of its threads, to locate a hang.
    trace = float(os.environ.get("RINGFLASH_CP_TEST_TRACE", "0"))
    if trace > 0:
        import faulthandler

        faulthandler.dump_traceback_later(trace, exit=False)
    report = {}
    for case in cases:
        if trace > 0:
            print(f"[rank {rank}/{world_size}] {case.id}", flush=True)
        try:
            results = run_case(case, rank, world_size)
            report[case.id] = check_case(case, results) if rank == 0 else "ok"
        except Exception:
            report[case.id] = "exception:\n" + traceback.format_exc()
    if trace > 0:
        print(f"[rank {rank}/{world_size}] all cases done", flush=True)
    return report


def run_case(case: CPCase, rank: int, world_size: int):
    if case.api == "plan":
        return run_plan_case(case, rank, world_size)
    from cp_api_cases import run_api_case

    return run_api_case(case, rank, world_size)


def error_worker(rank: int, world_size: int, _payload) -> dict:
    """Each bad call on every rank; returns {scenario: "<ExceptionType>: message"} (or "no error")."""
    import torch
    import torch.distributed as dist

    import ringflash.cp.local as local_mod
    from ringflash.cp import Plan

    cu = torch.tensor([0, 9, 16], dtype=torch.int32, device=device())
    report = {}

    def attempt(name, fn):
        try:
            fn()
            report[name] = "no error"
        except Exception as exc:
            report[name] = f"{type(exc).__name__}: {exc}"

    def mk(n, h, d=16, dtype=torch.float32):
        return torch.randn(n, h, d, dtype=dtype, device=device())

    plan = Plan(cu, strategy="zigzag_llama3")
    n = plan.num_local_tokens
    # Shapes differ across ranks: rank 1 passes another head dim.
    d = 16 if rank == 0 else 8
    attempt("headdim differs across ranks", lambda: plan.attention(mk(n, 2, d), mk(n, 1, d), mk(n, 1, d)))
    # dtypes differ across ranks.
    dt = torch.float32 if rank == 0 else torch.float16
    ring = Plan(cu, strategy="ring")
    m = ring.num_local_tokens
    attempt("dtype differs across ranks", lambda: ring.attention(mk(m, 2, dtype=dt), mk(m, 1, dtype=dt), mk(m, 1, dtype=dt)))
    # heads_k_stride must divide nheads_k.
    attempt("heads_k_stride", lambda: plan.attention(mk(n, 4), mk(n, 2), mk(n, 2), heads_k_stride=3))
    # A group whose size does not match the plan's.
    singles = [dist.new_group([r]) for r in range(world_size)]
    attempt("group size", lambda: plan.attention(mk(n, 2), mk(n, 1), mk(n, 1), group=singles[rank]))
    # Plans built from different cu_seqlens on different ranks.
    other = cu if rank == 0 else torch.tensor([0, 8, 16], dtype=torch.int32, device=device())
    attempt("cu_seqlens differ across ranks", lambda: Plan(other, strategy="llama3"))
    # Local tensors that are not this rank's shard.
    attempt("wrong local size", lambda: plan.attention(mk(n + 1, 2), mk(n + 1, 1), mk(n + 1, 1)))
    # keep_gathered_kv where nothing is gathered.
    attempt("keep_gathered_kv on ring", lambda: ring.attention(mk(m, 2), mk(m, 1), mk(m, 1), keep_gathered_kv=True))
    attempt("local_first on ring", lambda: ring.attention(mk(m, 2), mk(m, 1), mk(m, 1), local_first=True))
    attempt("heads_k_stride on ring", lambda: ring.attention(mk(m, 2), mk(m, 1), mk(m, 1), heads_k_stride=1))
    attempt("mode on ring", lambda: ring.attention(mk(m, 2), mk(m, 1), mk(m, 1), mode="two_kernels"))
    # The process-wide setting applies where the split can run: elsewhere it is off.
    os.environ["RINGFLASH_CP_LOCAL_FIRST"] = "1"
    try:
        attempt("RINGFLASH_CP_LOCAL_FIRST=1 on ring", lambda: ring.attention(mk(m, 2), mk(m, 1), mk(m, 1)))
    finally:
        del os.environ["RINGFLASH_CP_LOCAL_FIRST"]
    llama3 = Plan(cu, strategy="llama3")
    m3 = llama3.num_local_tokens
    attempt("verify on llama3", lambda: llama3.attention(mk(m3, 2), mk(m3, 1), mk(m3, 1), verify=True))
    attempt("local_first with a window",
            lambda: plan.attention(mk(n, 2), mk(n, 1), mk(n, 1), window_size=(3, -1), local_first=True))
    # Sliding windows where a strategy cannot express them.
    stripe = Plan(cu, strategy="stripe")
    m = stripe.num_local_tokens
    attempt("window on stripe", lambda: stripe.attention(mk(m, 2), mk(m, 1), mk(m, 1), window_size=(4, -1)))
    # Verify mode: a perturbed "two_kernels" run must be caught.
    real = local_mod.local_forward

    perturb_ranks = set(range(world_size))

    def perturbed(*args, **kwargs):
        real(*args, **kwargs)
        if kwargs.get("mode") == "two_kernels" and rank in perturb_ranks:
            kwargs["out"].add_(0.5)

    local_mod.local_forward = perturbed
    import ringflash.cp.engines as engines_mod

    engines_mod.local_forward = perturbed
    try:
        attempt("verify catches a mismatch", lambda: plan.attention(mk(n, 2), mk(n, 1), mk(n, 1), verify=True))
        # A mismatch on rank 1 alone stops rank 0 as well (it went on into the backward).
        perturb_ranks = {1}
        attempt("verify mismatch on one rank", lambda: plan.attention(mk(n, 2), mk(n, 1), mk(n, 1), verify=True))
    finally:
        local_mod.local_forward = real
        engines_mod.local_forward = real
    attempt("verify passes when modes agree", lambda: plan.attention(mk(n, 2), mk(n, 1), mk(n, 1), verify=True))
    # One token in all: rank 1 holds none, and its verify compares empty results.
    tiny = Plan(torch.tensor([0, 0, 1], dtype=torch.int32, device=device()), strategy="zigzag_llama3")
    t = tiny.num_local_tokens
    attempt("verify on a rank without tokens", lambda: tiny.attention(mk(t, 2), mk(t, 1), mk(t, 1), verify=True))
    # Ulysses: heads that do not split over the ranks; the degree's own checks.
    uly = Plan(cu, strategy="ulysses")
    m = uly.num_local_tokens
    attempt("ulysses heads", lambda: uly.attention(mk(m, 3), mk(m, 1), mk(m, 1)))
    attempt("ulysses kv heads", lambda: uly.attention(mk(m, 6), mk(m, 3), mk(m, 3)))
    attempt("ulysses_degree on llama3", lambda: Plan(cu, strategy="llama3", ulysses_degree=2))
    attempt("hybrid without a degree", lambda: Plan(cu, strategy="hybrid"))
    attempt("hybrid degree", lambda: Plan(cu, strategy="hybrid", ulysses_degree=3))
    hybrid = Plan(cu, strategy="hybrid", ulysses_degree=2)
    m = hybrid.num_local_tokens
    attempt("hybrid heads", lambda: hybrid.attention(mk(m, 3), mk(m, 1), mk(m, 1)))
    attempt("hybrid verify passes", lambda: hybrid.attention(mk(m, 4), mk(m, 2), mk(m, 2), verify=True))
    return report
