"""Scenarios of the reliability review that need several ranks, run inside the gloo
processes of test_cp_reliability.py. Each returns "ok", or "<ExceptionType>: message" for
the scenarios whose point is the error (the test matches the message on every rank)."""

from __future__ import annotations

from interpreter_options import skip_dead_overflow_checks

skip_dead_overflow_checks()  # in the spawned gloo ranks too (CI time; see interpreter_options)


def _error_text(fn) -> str:
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _mk(n, h, d=16, dtype=None, requires_grad=False):
    import torch

    t = torch.randn(n, h, d, dtype=dtype or torch.float32)
    return t.requires_grad_() if requires_grad else t


def refilled_cu_seqlens(rank: int, world: int) -> str:
    """Finding 4: a local cu_seqlens buffer refilled through .data (no version bump) must
    not reuse the previous batch's plan."""
    import torch

    import ringflash

    torch.manual_seed(1)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)  # local lengths 4, 6 (global 8, 12 at W=2)
    q, k, v = _mk(10, 2), _mk(10, 1), _mk(10, 1)
    ringflash.ring_flash_attn_varlen_func(q, k, v, cu, 6, causal=True)
    cu.data.copy_(torch.tensor([0, 7, 10], dtype=torch.int32))  # another batch: local lengths 7, 3
    got = ringflash.ring_flash_attn_varlen_func(q, k, v, cu, 7, causal=True)
    fresh = torch.tensor([0, 7, 10], dtype=torch.int32)
    want = ringflash.ring_flash_attn_varlen_func(q, k, v, fresh, 7, causal=True)
    return "ok" if torch.equal(got, want) else f"stale plan: max diff {(got - want).abs().max().item():.3e}"


def fooled_layout_check(rank: int, world: int) -> str:
    """Finding 5: lengths [8, 8, 8] and [10, 4, 10] have the same weighted checksum."""
    import torch

    from ringflash.cp import Plan

    lengths = [0, 8, 16, 24] if rank == 0 else [0, 10, 14, 24]
    return _error_text(lambda: Plan(torch.tensor(lengths, dtype=torch.int32), strategy="zigzag_llama3"))


def _llama3_args(rank: int, world: int, causal: bool = True):
    import torch

    import ringflash

    cu = torch.tensor([0, 5, 14, 20], dtype=torch.int32)  # 20 tokens: 10 per rank at W=2
    cu_q, cu_k, max_q, max_k, key_slice = ringflash.llama3_flash_attn_prepare_cu_seqlens(cu, causal, rank, world)
    n = cu_q[-1].item()
    return [_mk(n, 2), _mk(n, 1), _mk(n, 1), cu_q, cu_k, max_q, max_k, 1, key_slice]


def llama3_bad_max_seqlen_k(rank: int, world: int) -> str:
    """Finding 6: max_seqlen_k=1 used to zero the dK/dV of the keys past it."""
    import ringflash

    args = _llama3_args(rank, world)
    args[6] = 1
    return _error_text(lambda: ringflash.llama3_flash_attn_varlen_func(*args, causal=True))


def llama3_shifted_slice(rank: int, world: int) -> str:
    import ringflash

    args = _llama3_args(rank, world)
    s = args[8]
    args[8] = slice(s.start + 1, s.stop + 1)
    return _error_text(lambda: ringflash.llama3_flash_attn_varlen_func(*args, causal=True))


def llama3_bad_cu_seqlens_k(rank: int, world: int) -> str:
    import ringflash

    args = _llama3_args(rank, world)
    args[4] = args[4].clone()
    args[4][1] += 1
    return _error_text(lambda: ringflash.llama3_flash_attn_varlen_func(*args, causal=True))


def llama3_bad_on_one_rank(rank: int, world: int) -> str:
    """Only rank 1 passes bad metadata: every rank must stop, none may hang."""
    import ringflash

    args = _llama3_args(rank, world)
    if rank == 1:
        args[6] = 1
    return _error_text(lambda: ringflash.llama3_flash_attn_varlen_func(*args, causal=True))


def inference_mode(rank: int, world: int) -> str:
    """Finding 7: plans and the API functions under torch.inference_mode."""
    import torch

    import ringflash
    from ringflash.cp import Plan

    torch.manual_seed(2)
    cu = torch.tensor([0, 6, 20], dtype=torch.int32)
    for strategy in ("zigzag_llama3", "llama3", "ring"):
        plan = Plan(cu, strategy=strategy)
        n = plan.num_local_tokens
        q, k, v = _mk(n, 2), _mk(n, 1), _mk(n, 1)
        with torch.no_grad():
            want = plan.attention(q, k, v)
        with torch.inference_mode():
            got = plan.attention(q, k, v)
        if not torch.equal(got, want):
            return f"{strategy}: inference-mode result differs"
    local = torch.tensor([0, 3, 10], dtype=torch.int32)
    with torch.inference_mode():
        q, k, v = _mk(10, 2), _mk(10, 1), _mk(10, 1)
        ringflash.ring_flash_attn_varlen_func(q, k, v, local, 7, causal=True)
        ringflash.ring_flash_attn_varlen_func(q, k, v, local, 7, causal=True)  # the cached plan
        ringflash.zigzag_llama3_flash_attn_varlen_func(
            q, k, v, local, local * world, 7, 14, 1, causal=True)
    return "ok"


def later_call_mismatch(rank: int, world: int) -> str:
    """Finding 8: the first call agrees; on the second, rank 1 alone changes its head dim."""
    import torch

    from ringflash.cp import Plan

    plan = Plan(torch.tensor([0, 9, 16], dtype=torch.int32), strategy="zigzag_llama3")
    n = plan.num_local_tokens
    plan.attention(_mk(n, 2), _mk(n, 1), _mk(n, 1))
    d = 16 if rank == 0 else 8
    return _error_text(lambda: plan.attention(_mk(n, 2, d), _mk(n, 1, d), _mk(n, 1, d)))


def backward_mismatch(rank: int, world: int) -> str:
    """One rank records a graph for a backward and the other does not: the backward's
    collectives would run on one rank only."""
    import torch

    from ringflash.cp import Plan

    plan = Plan(torch.tensor([0, 9, 16], dtype=torch.int32), strategy="llama3")
    n = plan.num_local_tokens
    return _error_text(lambda: plan.attention(_mk(n, 2, requires_grad=rank == 0), _mk(n, 1), _mk(n, 1)))


def local_error_on_one_rank(rank: int, world: int) -> str:
    """Rank 1 alone passes tensors of the wrong size: every rank stops."""
    import torch

    from ringflash.cp import Plan

    plan = Plan(torch.tensor([0, 9, 16], dtype=torch.int32), strategy="ring")
    n = plan.num_local_tokens + (1 if rank == 1 else 0)
    return _error_text(lambda: plan.attention(_mk(n, 2), _mk(n, 1), _mk(n, 1)))


def plan_cache_is_bounded(rank: int, world: int) -> str:
    """Finding 9: a new cu_seqlens_k tensor per step used to leave one plan per step alive.
    Twice the cache's bound in steps tells (that bug held one plan per step)."""
    import gc

    import torch

    import ringflash
    from ringflash.cp import api

    steps = 2 * api._MAX_PLANS
    for step in range(steps):
        lengths = [4 + step % 5 * 2, 8]  # a few distinct batches, new tensors every step
        cu_k = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32)
        chunk = [(n + 2 * world - 1 - c) // (2 * world) for n in lengths for c in (rank, 2 * world - 1 - rank)]
        local = [chunk[0] + chunk[1], chunk[2] + chunk[3]]
        cu_q = torch.tensor([0, local[0], sum(local)], dtype=torch.int32)
        n = sum(local)
        ringflash.zigzag_llama3_flash_attn_varlen_func(_mk(n, 2), _mk(n, 1), _mk(n, 1), cu_q, cu_k, None, None, 1,
                                                      causal=True)
    gc.collect()
    held = len(api._plans)
    return "ok" if held <= api._MAX_PLANS else f"{held} plans held after {steps} steps"


def step_error_leaves_the_group_usable(rank: int, world: int) -> str:
    """A local kernel that raises inside a CP step (out of memory, say), caught by the caller
    to retry: the group must stay usable. Every engine, the error in the forward and in the
    backward, each time on every rank's first local call. The ring engine used to leave
    that step's K/V exchange in flight, and the next Plan's agreement check hung."""
    import torch

    from ringflash.cp import Plan, local

    cu = torch.tensor([0, 9, 16], dtype=torch.int32)
    strategies = [("ring", {}), ("zigzag_ring", {}), ("stripe", {}), ("zigzag_llama3", {}), ("llama3", {}),
                  ("ulysses", {}), ("hybrid", {"ulysses_degree": 1}), ("hybrid", {"ulysses_degree": world})]
    for strategy, options in strategies:
        for kernel in ("attention_forward", "attention_backward"):
            real = getattr(local, kernel)

            def planted(*args, **kwargs):
                raise RuntimeError("planted")

            plan = Plan(cu, strategy=strategy, **options)
            n = plan.num_local_tokens
            q, k, v = _mk(n, 2, requires_grad=True), _mk(n, 1), _mk(n, 1)
            setattr(local, kernel, planted)
            try:
                text = _error_text(lambda: plan.attention(q, k, v).sum().backward())
            finally:
                setattr(local, kernel, real)
            if text != "RuntimeError: planted":
                return f"{strategy} {options}, {kernel}: {text}"
            # The retry: the same plan, then a new one (collectives of its own first).
            want = Plan(cu, strategy=strategy, **options).attention(q, k, v)
            if not torch.equal(plan.attention(q, k, v), want):
                return f"{strategy} {options}, {kernel}: the plan's retry differs from a new plan's result"
            plan.attention(q, k, v).sum().backward()
    return "ok"


def double_backward_raises(rank: int, world: int) -> str:
    """create_graph=True through every engine (all-gather, ring, Ulysses): their gradients
    carry no graph, so a second-order use must raise rather than lose this attention's term."""
    import torch

    from ringflash.cp import Plan

    cu = torch.tensor([0, 6, 20], dtype=torch.int32)
    for strategy in ("zigzag_llama3", "ring", "ulysses"):
        plan = Plan(cu, strategy=strategy)
        n = plan.num_local_tokens
        q, k, v = _mk(n, 2, requires_grad=True), _mk(n, 2, requires_grad=True), _mk(n, 2, requires_grad=True)
        out = plan.attention(q, k, v, causal=True)
        error = _error_text(lambda: torch.autograd.grad(out.sum(), (q, k, v), create_graph=True))
        if "double backward" not in error:
            return f"{strategy}: {error}"
    return "ok"


SCENARIOS = {
    "refilled cu_seqlens": refilled_cu_seqlens,
    "fooled layout check": fooled_layout_check,
    "llama3 max_seqlen_k": llama3_bad_max_seqlen_k,
    "llama3 shifted slice": llama3_shifted_slice,
    "llama3 cu_seqlens_k": llama3_bad_cu_seqlens_k,
    "llama3 bad on one rank": llama3_bad_on_one_rank,
    "inference mode": inference_mode,
    "later call mismatch": later_call_mismatch,
    "backward mismatch": backward_mismatch,
    "local error on one rank": local_error_on_one_rank,
    "plan cache is bounded": plan_cache_is_bounded,
    "step error leaves the group usable": step_error_leaves_the_group_usable,
    "double backward raises": double_backward_raises,
}


def reliability_worker(rank: int, world: int, names) -> dict:
    import traceback

    report = {}
    for name in names:
        try:
            report[name] = SCENARIOS[name](rank, world)
        except Exception:
            report[name] = "exception:\n" + traceback.format_exc()
    return report
