"""Context-parallel attention on gloo process groups (CPU, Triton interpreter), world sizes
1, 2, 3 and 4: every strategy against single-process attention on the same global data,
for out, lse, dq, dk and dv. One process group per world size runs all of its cases."""

import os

import pytest

from cp_cases import CPCase, cp_worker, error_worker
from ringflash.cp.launch import run_local
from shared_run import once_per_session

# On the GPU machine: RINGFLASH_CP_BACKEND=nccl runs the same cases on GPUs (one per rank),
# with exact fp32 matmuls so that fp32 results meet the same bar as on the CPU.
BACKEND = os.environ.get("RINGFLASH_CP_BACKEND", "gloo")
#: Every test here reads one run per world size (`_reports`) or `_error_reports`, done once
#: per session even under pytest-xdist (shared_run.once_per_session).

WORLD_SIZES = [1, 2, 3, 4]
#: Option variants run at two world sizes (one even, one odd) to keep CI short.
OPTION_WORLD_SIZES = [2, 3]
#: ring-flash-attn's functions wrap the same plans as the strategy cases: one world size on
#: the CPU (CI time), 2 and 3 with NCCL.
API_WORLD_SIZES = [2]
#: Edge and fuzz cases: every size with more than one rank (one rank has no cross-rank
#: layout to get wrong); balanced cases at an even and an odd size. CI time on 2 cores.
EDGE_WORLD_SIZES = [2, 3, 4]
#: A non-contiguous cu_seqlens at one size on the CPU: Plan reads its values on the host
#: (tolist) and keeps its own copy before any layout is built, so no size takes another path.
STRIDED_CU_WORLD_SIZES = [2]
BALANCED_WORLD_SIZES = [2, 3]
if BACKEND == "nccl":
    import torch

    os.environ["RINGFLASH_FP32_PRECISION"] = "ieee"
    WORLD_SIZES = [w for w in WORLD_SIZES if w <= torch.cuda.device_count()]
    OPTION_WORLD_SIZES = [w for w in OPTION_WORLD_SIZES if w <= torch.cuda.device_count()]
    API_WORLD_SIZES = [w for w in (2, 3) if w <= torch.cuda.device_count()]
    EDGE_WORLD_SIZES = [w for w in EDGE_WORLD_SIZES if w <= torch.cuda.device_count()]
    STRIDED_CU_WORLD_SIZES = EDGE_WORLD_SIZES
    BALANCED_WORLD_SIZES = [w for w in BALANCED_WORLD_SIZES if w <= torch.cuda.device_count()]

BASE_CASES = [CPCase(s, causal=c) for s in ("zigzag_llama3", "llama3", "ring", "zigzag_ring", "stripe")
              for c in (True, False)]
# The balanced layout with small pieces, so that the tiny test documents get cut: whole
# short documents, zigzag pairs of long ones (several on a rank), a single token.
BALANCED_CASES = [
    CPCase("balanced", causal=c, min_piece=2, lengths=lengths)
    for c in (True, False) for lengths in ((11, 1, 3, 17, 5), (40,), (3, 1, 2, 0, 29, 6))
] + [
    CPCase("balanced", min_piece=3, heads=(4, 2), heads_k_stride=1, window=(7, -1), lengths=(23, 9, 30)),
    CPCase("balanced", lengths=(11, 1, 3, 17, 5)),  # the default min_piece: every document whole
    CPCase("balanced", min_piece=2, lengths=(0, 1), mode="two_kernels"),
    CPCase("balanced", min_piece=2, lengths=(33, 4), keep_gathered_kv=True, dtype="float16"),
    CPCase("auto", min_piece=2, lengths=(23, 9, 30)),  # resolves to an all-gather strategy
]
OPTION_CASES = [
    CPCase("zigzag_llama3", mode="two_kernels"),
    CPCase("zigzag_llama3", heads=(4, 2), heads_k_stride=1),
    CPCase("zigzag_llama3", window=(9, -1)),
    CPCase("zigzag_llama3", dtype="float16"),
    CPCase("zigzag_llama3", heads=(4, 2), heads_k_stride=1, keep_gathered_kv=True),
    CPCase("llama3", heads=(6, 3), heads_k_stride=1),
    CPCase("llama3", keep_gathered_kv=True),
    CPCase("llama3", causal=False, window=(4, 6)),
    CPCase("ring", window=(10, -1)),
    CPCase("ring", dtype="float16", heads=(4, 2)),
    CPCase("zigzag_ring", dtype="float16"),
    CPCase("stripe", heads=(2, 2)),
    # The head dim in two tiles (configs.head_parts, on by default: 192 = 128 + 64) through
    # both engines' buffers: float32 out and lse, scattered dK/dV rows, the ring's steps.
    CPCase("zigzag_llama3", headdim=192, heads=(4, 2), dtype="float16"),
    CPCase("zigzag_ring", headdim=192),
]


# ring-flash-attn's functions, with its sharding (lengths divisible by 2W for W = 2, 3).
API_LENGTHS = (12, 24)
API_CASES = [
    CPCase("ring", api="ring_flash_attn_func", lengths=(12, 12), causal=True),
    CPCase("ring", api="ring_flash_attn_qkvpacked_func", lengths=(12, 12), causal=False, heads=(2, 2)),
    CPCase("ring", api="ring_flash_attn_varlen_func", lengths=API_LENGTHS),
    CPCase("zigzag_ring", api="zigzag_ring_flash_attn_func", lengths=(12, 12)),
    CPCase("zigzag_ring", api="zigzag_ring_flash_attn_varlen_kvpacked_func", lengths=API_LENGTHS),
    CPCase("stripe", api="stripe_flash_attn_func", lengths=(12, 12)),
    CPCase("stripe", api="stripe_flash_attn_varlen_func", lengths=API_LENGTHS, causal=False),
    CPCase("llama3", api="llama3_flash_attn_varlen_func", lengths=(13, 5, 18), heads=(4, 2), heads_k_stride=1),
    CPCase("llama3", api="llama3_flash_attn_varlen_qkvpacked_func", lengths=(13, 5, 18), causal=False, heads=(2, 2)),
    CPCase("zigzag_llama3", api="zigzag_llama3_flash_attn_varlen_func", lengths=API_LENGTHS),
    CPCase("zigzag_llama3", api="zigzag_llama3_flash_attn_varlen_func", lengths=API_LENGTHS, mode="two_kernels"),
]


# The reliability review's zero-token ranks (documents totalling fewer tokens than W: the
# backward used to hang), at every world size, and a non-contiguous cu_seqlens (used to
# give garbage), at STRIDED_CU_WORLD_SIZES.
EDGE_CASES = [
    CPCase(s, lengths=lengths, causal=c)
    for s in ("zigzag_llama3", "llama3") for lengths in ((0, 1), (1, 2, 1)) for c in (True, False)
] + [
    CPCase("zigzag_llama3", lengths=(0, 1), mode="two_kernels"),
    CPCase("llama3", lengths=(1, 2, 1), keep_gathered_kv=True),
    CPCase("ring", lengths=(0, 1)),
    CPCase("zigzag_ring", lengths=(1, 2, 1)),
    CPCase("stripe", lengths=(1,)),
    # A document longer than a dK/dV block: zigzag_ring's steps use only part of a block's
    # keys, whose unused tail used to come back uninitialised.
    CPCase("zigzag_ring", lengths=(160, 3)),
    CPCase("ring", lengths=(150,), window=(40, -1)),
    CPCase("zigzag_llama3", strided_cu=True),
    CPCase("llama3", strided_cu=True, causal=False),
    CPCase("ring", strided_cu=True),
]


def _ulysses_cases(world_size: int) -> list:
    """ulysses (and hybrid at 4 = 2 x 2) at one world size: nheads must divide by the Ulysses
    degree, so the heads depend on it. Sharded GQA KV heads (kv_sharded), KV heads that
    ranks share (kv_shared, summed in the backward) and MHA; ragged documents, documents
    shorter than W and totals below W, one document, many short ones; windows and softcap."""
    kv_sharded = {1: (4, 2), 2: (4, 2), 3: (6, 3), 4: (8, 4)}[world_size]
    kv_shared = {1: (4, 1), 2: (4, 1), 3: (6, 1), 4: (8, 2)}[world_size]
    cases = [
        CPCase("ulysses", heads=kv_sharded, headdim=8),
        CPCase("ulysses", causal=False, heads=kv_shared, headdim=8),
        CPCase("ulysses", heads=kv_shared, headdim=8, lengths=(1, 2, 1), dtype="float16"),
        CPCase("ulysses", causal=False, heads=kv_sharded, headdim=8, lengths=(0, 1)),
        CPCase("ulysses", heads=kv_shared, headdim=8, lengths=(23,), window=(5, -1), softcap=3.0),
        CPCase("ulysses", heads=(max(world_size, 2),) * 2, headdim=8, lengths=(1, 3, 1, 2, 1, 4, 1), dtype="float16"),
    ]
    if world_size == 4:
        cases += [
            CPCase("hybrid", ulysses_degree=2, heads=(4, 2), headdim=8),
            CPCase("hybrid", ulysses_degree=2, causal=False, heads=(4, 1), headdim=8),
            CPCase("hybrid", ulysses_degree=2, heads=(8, 4), headdim=8, heads_k_stride=1, mode="two_kernels",
                   lengths=(1, 2, 1), keep_gathered_kv=True),
            CPCase("hybrid", ulysses_degree=2, heads=(4, 1), headdim=8, lengths=(23, 1, 2, 1), dtype="float16",
                   window=(4, -1), softcap=3.0),
            # On a group of 2 of the 4 ranks: the sub-groups come from new_group's local mode.
            CPCase("hybrid", ulysses_degree=1, heads=(4, 2), headdim=8, lengths=(5, 1, 7), halves=True),
        ]
    return cases


ULYSSES_CASES = {w: _ulysses_cases(w) for w in (1, 2, 3, 4)}


def _fuzz_cases(count_per_strategy: int = 2) -> list:
    """Random packed batches for every strategy, from the session seed (printed in the test
    header; RINGFLASH_TEST_SEED replays it): 1-5 documents of 0-140 tokens (mostly short,
    often totalling fewer than the world size; sometimes longer than a kernel block),
    causal or not, MHA/GQA, windows where the strategy has them."""
    import random

    from conftest import SESSION_SEED

    rng = random.Random(SESSION_SEED)
    cases = []
    for strategy in ("zigzag_llama3", "llama3", "ring", "zigzag_ring", "stripe"):
        for i in range(count_per_strategy):
            lengths = [rng.choice([0, 1, 1, 2, 3, rng.randint(0, 23), rng.randint(0, 23), rng.randint(24, 140)])
                       for _ in range(rng.randint(1, 5))]
            while sum(lengths) > 200:  # bounded interpreter time
                lengths[lengths.index(max(lengths))] //= 2
            if sum(lengths) == 0:
                lengths[-1] = 1
            window = (-1, -1)
            if strategy in ("zigzag_llama3", "llama3", "ring") and rng.random() < 0.3:
                window = (rng.randint(0, 8), -1)
            cases.append(CPCase(
                strategy, causal=rng.random() < 0.7, lengths=tuple(lengths),
                heads=rng.choice([(2, 1), (2, 2), (4, 2)]), headdim=rng.choice([8, 16]), window=window,
                dtype=rng.choice(["float32", "float32", "float16"]), seed=rng.randint(0, 2**31),
                mode=rng.choice([None, "two_kernels"]) if strategy == "zigzag_llama3" else None,
                tag=f"fuzz{i}",
            ))
    return cases


FUZZ_CASES = _fuzz_cases(count_per_strategy=1)

# The local-first split (own keys while the all-gather runs, then the others'): causal and
# full, head chunks, a document on one rank only, zero-token ranks, balanced pairs. At the
# odd world size (the layouts' uneven case) only, for CI time; with NCCL, every size there is.
LOCAL_FIRST_CASES = [
    CPCase("zigzag_llama3", local_first=True),
    CPCase("zigzag_llama3", causal=False, heads=(4, 2), heads_k_stride=1, local_first=True, mode="two_kernels"),
    CPCase("llama3", causal=False, lengths=(1, 2, 1), local_first=True, keep_gathered_kv=True),
    CPCase("balanced", min_piece=2, lengths=(3, 1, 2, 0, 29, 6), local_first=True, dtype="float16"),
]
LOCAL_FIRST_WORLD_SIZES = [3] if BACKEND != "nccl" else [w for w in WORLD_SIZES if w > 1]


# World size 8 (a GPU node's width). On the CPU: causal, one strategy per engine and layout
# family (all-gather with the zigzag and the contiguous layout, the ring engine), 8
# processes on CI's 2 cores (ring and stripe share zigzag_ring's engine). With NCCL on an
# 8-GPU machine: every base and option case.
WIDE_WORLD_SIZE = 8
WIDE_CASES = BASE_CASES + OPTION_CASES if BACKEND == "nccl" else [
    c for c in BASE_CASES if c.causal and c.strategy in ("zigzag_llama3", "llama3", "zigzag_ring")]


@once_per_session
def _reports(world_size: int) -> dict:
    if world_size == WIDE_WORLD_SIZE:
        cases = WIDE_CASES
    else:
        cases = BASE_CASES + (OPTION_CASES if world_size in OPTION_WORLD_SIZES else [])
        if world_size in API_WORLD_SIZES:
            cases = cases + API_CASES
        if world_size in EDGE_WORLD_SIZES:
            cases = cases + [c for w, c in _EDGE_PARAMS if w == world_size] + FUZZ_CASES
        if world_size in BALANCED_WORLD_SIZES:
            cases = cases + BALANCED_CASES
        cases = cases + ULYSSES_CASES.get(world_size, [])
        if world_size in LOCAL_FIRST_WORLD_SIZES:
            cases = cases + LOCAL_FIRST_CASES
    (report, *_) = run_local(cp_worker, world_size, cases, backend=BACKEND, timeout=900)
    return report


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("case", BASE_CASES, ids=[c.id for c in BASE_CASES])
def test_cp_strategy_matches_single_process(world_size, case):
    result = _reports(world_size)[case.id]
    assert result == "ok", result


@pytest.mark.skipif(BACKEND == "nccl" and torch.cuda.device_count() < WIDE_WORLD_SIZE,
                    reason="world size 8 with NCCL needs 8 GPUs")
@pytest.mark.parametrize("case", WIDE_CASES, ids=[c.id for c in WIDE_CASES])
def test_cp_world_size_8_matches_single_process(case):
    result = _reports(WIDE_WORLD_SIZE)[case.id]
    assert result == "ok", result


_EDGE_PARAMS = [(w, c) for c in EDGE_CASES for w in EDGE_WORLD_SIZES
                if not c.strided_cu or w in STRIDED_CU_WORLD_SIZES]


@pytest.mark.parametrize("world_size, case", _EDGE_PARAMS, ids=[f"{c.id}-{w}" for w, c in _EDGE_PARAMS])
def test_cp_edge_cases_match_single_process(world_size, case):
    result = _reports(world_size)[case.id]
    assert result == "ok", result


@pytest.mark.parametrize("world_size", EDGE_WORLD_SIZES)
@pytest.mark.parametrize("case", FUZZ_CASES, ids=[c.id for c in FUZZ_CASES])
def test_cp_fuzz_matches_single_process(world_size, case):
    """Random document lengths (see _fuzz_cases), forward and backward, every strategy."""
    result = _reports(world_size)[case.id]
    assert result == "ok", result


@pytest.mark.parametrize("world_size", BALANCED_WORLD_SIZES)
@pytest.mark.parametrize("case", BALANCED_CASES, ids=[c.id for c in BALANCED_CASES])
def test_cp_balanced_matches_single_process(world_size, case):
    result = _reports(world_size)[case.id]
    assert result == "ok", result


_ULYSSES_PARAMS = [(w, c) for w in WORLD_SIZES for c in ULYSSES_CASES.get(w, [])]


@pytest.mark.parametrize("world_size, case", _ULYSSES_PARAMS, ids=[f"{c.id}-{w}" for w, c in _ULYSSES_PARAMS])
def test_cp_ulysses_matches_single_process(world_size, case):
    """ulysses at every world size, hybrid at 4 = 2 x 2 (heads chosen per world size)."""
    result = _reports(world_size)[case.id]
    assert result == "ok", result


@pytest.mark.parametrize("world_size", OPTION_WORLD_SIZES)
@pytest.mark.parametrize("case", OPTION_CASES, ids=[c.id for c in OPTION_CASES])
def test_cp_options_match_single_process(world_size, case):
    result = _reports(world_size)[case.id]
    assert result == "ok", result


@pytest.mark.parametrize("world_size", LOCAL_FIRST_WORLD_SIZES)
@pytest.mark.parametrize("case", LOCAL_FIRST_CASES, ids=[c.id for c in LOCAL_FIRST_CASES])
def test_cp_local_first_matches_single_process(world_size, case):
    result = _reports(world_size)[case.id]
    assert result == "ok", result


@pytest.mark.parametrize("world_size", API_WORLD_SIZES)
@pytest.mark.parametrize("case", API_CASES, ids=[c.id for c in API_CASES])
def test_ring_flash_attn_api_matches_single_process(world_size, case):
    result = _reports(world_size)[case.id]
    assert result == "ok", result


ERRORS = {
    "headdim differs across ranks": r"ValueError: q, k, v or options: differ across ranks",
    "dtype differs across ranks": r"ValueError: q, k, v or options: differ across ranks",
    "heads_k_stride": r"ValueError: heads_k_stride: got 3; expected a divisor of nheads_k=2",
    "group size": r"ValueError: group: has 1 ranks but the plan was built for 2",
    "cu_seqlens differ across ranks": r"ValueError: cu_seqlens and strategy: differ across ranks",
    "wrong local size": r"ValueError: q: has \d+ tokens; expected this rank's \d+",
    "window on stripe": r"NotImplementedError: window_size: stripe interleaves",
    "keep_gathered_kv on ring": r"ValueError: keep_gathered_kv: ring passes K/V around the ring and gathers nothing",
    "local_first on ring": r"ValueError: local_first: ring does not run the all-gather engine's local-keys-first "
                           r"split; expected False",
    "mode on ring": r"ValueError: mode: got 'two_kernels' for ring, whose ranks run one query group",
    "RINGFLASH_CP_LOCAL_FIRST=1 on ring": r"no error",
    "verify on llama3": r"ValueError: verify: got True for llama3, whose ranks run one query group",
    "local_first with a window": r"ValueError: local_first: a sliding window \(3, -1\) is not a prefix",
    "verify catches a mismatch": r"RuntimeError: zigzag_llama3 verify: modes 'grouped' and 'two_kernels' disagree",
    "verify mismatch on one rank": r"RuntimeError: zigzag_llama3 verify: modes|ValueError: zigzag_llama3 verify: rank\(s\) \[1\]",
    "verify passes when modes agree": r"no error",
    "heads_k_stride on ring": r"ValueError: heads_k_stride: got 1; ring passes K/V around the ring and gathers nothing",
    "verify on a rank without tokens": r"no error",
    "ulysses heads": r"ValueError: q: nheads=3 is not divisible by world_size=2",
    "ulysses kv heads": r"ValueError: k: nheads_k=3 neither divides nor is a multiple of world_size=2",
    "hybrid heads": r"ValueError: q: nheads=3 is not divisible by ulysses_degree=2",
    "ulysses_degree on llama3": r"ValueError: ulysses_degree: got 2 for strategy 'llama3'; expected None",
    "hybrid without a degree": r"ValueError: ulysses_degree: got None; expected a divisor of world_size=2",
    "hybrid degree": r"ValueError: ulysses_degree: got 3; expected a divisor of world_size=2",
    "hybrid verify passes": r"no error",
}


@once_per_session
def _error_reports() -> list:
    return run_local(error_worker, 2, None, backend=BACKEND, timeout=300)


@pytest.mark.parametrize("scenario", list(ERRORS))
def test_cp_errors_raise_on_every_rank(scenario):
    import re

    for rank, report in enumerate(_error_reports()):
        assert re.match(ERRORS[scenario], report[scenario]), f"rank {rank}: {report[scenario]}"
