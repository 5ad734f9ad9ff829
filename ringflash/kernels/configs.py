"""Every launch configuration in one place: per-GPU tables, the autotune candidate lists,
and the split-KV heuristic.

Three kernels are configured independently: ``fwd`` (forward), ``dkdv`` (dK/dV: block_n
keys per program, stepping block_m queries) and ``dq`` (dQ: block_m queries per program,
stepping block_n keys). Lookup order for a launch:

1. a ``configs.override(...)`` context (tests use it to exercise other block shapes);
2. with ``RINGFLASH_AUTOTUNE=1``, the fastest of the kernel's candidate list for the
   problem's bucketed key, timed once per process with ``triton.testing.do_bench``;
3. the table entry for this GPU architecture (chosen by ``ringflash bench tune`` on that
   GPU; see docs/benchmarks.md);
4. a conservative default that runs on any CUDA GPU.

Under Triton's interpreter, small blocks keep CPU runs fast and make tests span many blocks.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Optional

import torch

from .common import interpreting


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # Forward-only technique switches, kept so `ringflash bench tune` can measure them:
    kv_cache: str = ""  # cache modifier on K/V loads ("" or ".cg")
    split_phases: bool = True  # unmasked middle loop apart from the masked edge blocks
    exp2: bool = True  # exp2 with log2(e) folded into the scale, instead of exp
    # Grouped attention (forward and dQ): the order in which the groups' programs launch,
    # one of GROUP_ORDERS (see ``common.schedule``); with one group all orders are the same.
    group_order: str = "global"
    # dK/dV kernel: 1 computes dK and dV in one pass; 2 launches it twice, dV and then dK,
    # each pass holding one float32 accumulator (and recomputing P): for head dims where
    # both accumulators and the K/V tiles do not fit the registers (d=256 spills).
    dkdv_passes: int = 1
    # Forward: K and V through TMA descriptors instead of pointer loads, where the GPU has
    # TMA (``fwd_kv_tma``; the plan then runs split phases). RINGFLASH_FWD_KV_TMA overrides it.
    kv_tma: bool = False

    def __post_init__(self) -> None:
        if self.group_order not in GROUP_ORDERS:
            raise ValueError(f"KernelConfig.group_order: got {self.group_order!r}; expected one of {GROUP_ORDERS}")
        if self.dkdv_passes not in (1, 2):
            raise ValueError(f"KernelConfig.dkdv_passes: got {self.dkdv_passes!r}; expected 1 or 2")

    @property
    def group_order_code(self) -> int:
        """The kernels' GROUP_ORDER constexpr."""
        return GROUP_ORDERS.index(self.group_order)

    def launch_args(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, num_warps=self.num_warps, num_stages=self.num_stages)


#: "global": every program of the last group (all heads and sequences) before the previous
#: group's; "head": the same within each head; "interleaved": the groups of one query-block
#: index side by side. Measured on an H100 in docs/benchmarks.md (grouped attention).
GROUP_ORDERS = ("global", "head", "interleaved")


#: CUDA's limit on grid axes 1 and 2.
MAX_GRID_YZ = 65535


def fit_grid(cfg: KernelConfig, prob) -> KernelConfig:
    """``cfg``, in the "head" order where the "global" order's axis 2 (batch x groups) would
    pass CUDA's limit. Raises if the batch alone does."""
    for name, size in (("nheads", prob.nheads), ("batch (sequences per call)", prob.batch)):
        if size > MAX_GRID_YZ:
            raise ValueError(f"{name}: got {size}; the kernels take at most {MAX_GRID_YZ} per call")
    if cfg.group_order == "global" and prob.batch * prob.num_groups > MAX_GRID_YZ:
        return replace(cfg, group_order="head")
    return cfg


def program_grid(cfg: KernelConfig, programs_per_head: int, prob) -> tuple[int, int, int]:
    """Launch grid of the query-block kernels (forward, dQ) for ``cfg`` (from ``fit_grid``):
    axis 0 holds ``programs_per_head`` programs per group and head (query blocks x splits),
    axis 1 the heads, axis 2 the batch; the groups multiply axis 2 in the "global" order and
    axis 0 otherwise."""
    if cfg.group_order == "global":
        return programs_per_head, prob.nheads, prob.batch * prob.num_groups
    return programs_per_head * prob.num_groups, prob.nheads, prob.batch


KINDS = ("fwd", "dkdv", "dq")

INTERPRETER = {
    "fwd": KernelConfig(32, 16, 4, 1),
    "dkdv": KernelConfig(16, 32, 4, 1),
    "dq": KernelConfig(32, 16, 4, 1),
}

# Runs on any CUDA GPU with >= ~100 KB of shared memory per block.
DEFAULT = {
    "fwd": KernelConfig(64, 64, 4, 2),
    "dkdv": KernelConfig(32, 64, 4, 2),
    "dq": KernelConfig(64, 32, 4, 2),
}


def headdim_bucket(d: int) -> int:
    return 64 if d <= 64 else 128 if d <= 128 else 256


# (compute capability) -> kind -> (head-dim bucket, causal[, gqa]) -> config. The sm_90
# entries are the winners of `ringflash bench tune` on an H100 (bf16, 16k tokens at seqlen
# 4k, and `--llama-varlen` for the GQA entries; summarized in docs/benchmarks.md). Causal
# and full attention favour different shapes; under GQA the dK/dV program loops over the
# query heads of its group and prefers wider key blocks. Lookup tries the GQA key first.
_C = KernelConfig
TABLE: dict[tuple[int, int], dict[str, dict[tuple, KernelConfig]]] = {
    (9, 0): {
        "fwd": {
            (64, False): _C(64, 64, 4, 3), (64, True): _C(128, 64, 4, 3),
            (128, False): _C(128, 64, 8, 3), (128, True): _C(128, 64, 8, 3),
            (256, False): _C(128, 64, 8, 2), (256, True): _C(128, 64, 8, 2),
        },
        "dkdv": {
            (64, False): _C(64, 128, 4, 3), (64, True): _C(64, 64, 4, 2),
            (128, False): _C(64, 128, 8, 3), (128, True): _C(64, 64, 4, 2), (128, True, True): _C(64, 128, 8, 3),
            # Two passes (dV, then dK): run 37, below.
            (256, False): _C(32, 128, 8, 2, dkdv_passes=2), (256, True): _C(32, 128, 8, 2, dkdv_passes=2),
        },
        "dq": {
            (64, False): _C(64, 64, 4, 3), (64, True): _C(128, 64, 4, 4),
            (128, False): _C(128, 64, 8, 4), (128, True): _C(128, 64, 8, 3), (128, True, True): _C(128, 64, 8, 4),
            (256, False): _C(128, 32, 8, 2), (256, True): _C(128, 32, 8, 2),
        },
    },
}
# The d=256 backward entries (d=192 shares them): run 37 on an H200 timed every candidate
# (``scripts/probe_tiles.py --dropout 0 --headdim 256 --seqlen 8192 --batch 1``, causal,
# 16 heads): the backward took 7.75 ms with the previous entries (64x64 dK/dV, which spills
# 576 bytes, and 64x64 dQ), 6.83 ms with the two-pass 32x128 dK/dV, and 5.71 ms with the
# 128x32 dQ as well (SDPA FA2: 5.54 ms). The one-pass 32x128 dK/dV took 16.5 ms. Full
# attention was not probed; it takes the same tiles, whose register use is the same.


# Entries for one pair of head-dim tiles (``head_parts``: the split head dims) rather than
# the bucket, where the bucket's entry lost to another candidate on the GPU: (compute
# capability) -> kind -> ((BLOCK_D, BLOCK_D2), banded) -> (longest query length it was
# measured up to, 0 for any; config). Looked up before ``TABLE``; with the split off
# (``RINGFLASH_HEAD_PARTS=0``) these head dims run one padded tile and take the bucket's.
# - dQ at d=192 (split 128 + 64, ``head_parts``; d=160's 128 + 32 no longer splits): run 43 on an
#   H100 (``scripts/probe_tiles.py --dropout 0 --kinds dq``; b=1 s=8k h=16, causal and full,
#   d=192 also at b=32 s=2k h=10 causal and b=128 s=512 h=10 full) timed all 28 dQ
#   candidates: 128x64 w8 s2 was the fastest in all six cases, the backward 7-10% faster
#   than with the d=256 bucket's 128x32 (e.g. d=192 causal 8k: 4.50 -> 4.10 ms).
# - Not kept: the forward at d=96 below 512 query rows (longer calls take the Gluon
#   kernels). Run 43 (b=128 s=512 h=21) timed full 1.056 -> 0.873 ms with 128x64 w4 s3 and
#   causal 0.786 -> 0.671 ms with 128x32 w4 s4, but the GPU property test of run 46 found
#   the split d=96 forward's lse wrong under them in bf16 (seqlen 1: the score itself,
#   0.85 relative), a miscompile like run 41's; the bucket's 128x64 w8 s3 is the tile
#   ``scripts/probe_head_parts.py`` checked (runs 42-43). Run 49 then found the split d=96
#   wrong under that tile too, and d=96 no longer splits (``HEAD_PART_MIN``).
HEAD_PARTS_TABLE: dict[tuple[int, int], dict[str, dict[tuple[tuple[int, int], bool], tuple[int, KernelConfig]]]] = {
    (9, 0): {
        "dq": {((128, 64), banded): (0, _C(128, 64, 8, 2)) for banded in (False, True)},
    },
}


# Entries for calls whose every sequence has few keys (packed short documents), where a
# program's loop runs only a few key blocks: (compute capability) -> kind -> ((BLOCK_D,
# BLOCK_D2), banded) -> (longest key length ``max_seqlen_k`` it was measured up to; config).
# Looked up after ``HEAD_PARTS_TABLE``, for calls without dropout (measured without).
# - The forward of one 128-wide head tile (d=128; d=65..127 pad to the same tiles), full
#   attention, with K and V through TMA descriptors (``KernelConfig.kv_tma``). Run 56 (H100,
#   ``scripts/probe_tiles.py --dropout 0 --pack 64x256 --heads 32 --kv-heads 8 --full --kinds
#   fwd --cudagraph``, 24 tiles each way): 128x64 w4 s2 took 0.240 ms against FA2 varlen's
#   0.252 (1.05x); with descriptors 64x64 w4 s3 took 0.244 and 128x32 w4 s3 0.264; the
#   pointer loads' fastest (``SHORT_KEYS_POINTER_TABLE``) 0.269. Run 57 ran the GPU tests on
#   this tile (docs/benchmarks.md).
SHORT_KEYS_TABLE: dict[tuple[int, int], dict[str, dict[tuple[tuple[int, int], bool], tuple[int, KernelConfig]]]] = {
    (9, 0): {
        "fwd": {((128, 0), False): (256, _C(128, 64, 4, 2, kv_tma=True))},
    },
}

# ``SHORT_KEYS_TABLE``'s entries for the pointer loads, taken in its place under
# RINGFLASH_FWD_KV_TMA=0. Run 49 on an H100 (``probe_tiles.py ... --one-loop``, with and
# without ``--cudagraph``) timed the bucket table's 128x64 w8 s3 at 0.306 ms as CUDA graph
# replays (0.317 eager) and 128x32 w4 s3 with one key loop at 0.268 (0.272); PyTorch's FA2
# varlen took 0.250. The graph replays put the host's part of the eager call at about 0.01 ms:
# the kernel is the gap. The table's tile holds about 128 KB of shared memory
# (``shared_memory_estimate``: one program per SM) for four key blocks a program; the 128x32
# 3-stage tile about 80 KB (two).
SHORT_KEYS_POINTER_TABLE: dict[tuple[int, int], dict[str, dict[tuple[tuple[int, int], bool], tuple[int, KernelConfig]]]] = {
    (9, 0): {
        "fwd": {((128, 0), False): (256, _C(128, 32, 4, 3, split_phases=False))},
    },
}


# With dropout the kernels also compute the mask's words per score entry: more registers
# and integer work, so other tiles win. Run 36 on an H200 (``scripts/probe_tiles.py``,
# b=4 s=4k h=16 d=128 causal bf16, dropout 0.1): the forward took 0.909 ms with the table's
# (128, 64, 8, 3) and 0.779 ms with (64, 64, 4, 3); dK/dV 2.572 -> 2.511 ms (the whole
# backward) with (64, 128, 8, 4); dQ's table entry was already the fastest. Only measured
# keys are here: (compute capability) -> kind -> (head-dim bucket, causal) -> config.
DROPOUT_TABLE: dict[tuple[int, int], dict[str, dict[tuple, KernelConfig]]] = {
    (9, 0): {
        "fwd": {(128, True): _C(64, 64, 4, 3)},
        "dkdv": {(128, True): _C(64, 128, 8, 4)},
    },
}


# The portable 5-GEMM backward (``RINGFLASH_BACKWARD=atomic``) holds a float32 dQ tile beside
# dK and dV, and on the deterministic dK/dV kernel's tiles it spilled: compiled for sm_90
# (``RINGFLASH_BACKWARD=atomic python scripts/compile_sm90.py --headdims 40 48 64 72 112 128
# --no-extras`` before this table, on b5adad1), 1016-1072 bytes of stack at d=40-64 full and
# 568-648 at d=72-128 causal, and run 52 (H100) timed those cases at 0.21-0.26x and
# 0.30-0.38x the deterministic backward (the cases with 104-328 bytes ran 0.83-1.04x). The
# same tiles on 8 warps compile to 0 bytes at d=40-64 full and 144-152 at d=72-128 causal;
# run 53 (H100) timed them at 0.91-0.98x the deterministic backward at d=40/48 full and
# 0.60-0.76x at d=72/112 causal. (compute capability) -> (head-dim bucket, causal) -> dK/dV
# config, over every other table.
ATOMIC_DQ_TABLE: dict[tuple[int, int], dict[tuple, KernelConfig]] = {
    (9, 0): {(64, False): _C(64, 128, 8, 3), (128, True): _C(64, 64, 8, 2)},
}


# Exact fp32 (ieee dots, the default for fp32 inputs: ``input_precision``) runs its dots
# as FMA loops on tiles held in registers, not on tensor cores, so the 16-bit tables' big
# tiles spill. Run 35 on an H200 (``scripts/probe_fp32.py``, b=2 s=4k h=8 causal): at d=64
# the table's shapes took 7.49 ms forward and 67.2 ms backward, (64, 64, 4, 1) forward 2.40
# ms and (32, 32, 4, 2) backward 12.5 ms; at d=128 the table's 79.0 / 273 ms, (32, 32, 4, 1)
# 8.49 / 25.3 ms. d=256 halves the d=128 rows: 24.0 / 81.3 ms in run 36 (SDPA: 3.59 /
# 10.6), ahead of (16, 64, 4, 1) and (32, 32, 4, 1) at 129 and 178 ms forward, the only
# other tiles timed. Any GPU: head-dim bucket -> kind -> config.
FP32_EXACT: dict[int, dict[str, KernelConfig]] = {
    64: {"fwd": _C(64, 64, 4, 1), "dkdv": _C(32, 32, 4, 2), "dq": _C(32, 32, 4, 2)},
    128: {"fwd": _C(32, 32, 4, 1), "dkdv": _C(32, 32, 4, 1), "dq": _C(32, 32, 4, 1)},
    256: {"fwd": _C(16, 32, 4, 1), "dkdv": _C(32, 16, 4, 1), "dq": _C(16, 32, 4, 1)},
}


# The Gluon sm_90 forward (``kernels.sm90``): (head dim, causal) -> config. 128 query rows
# (64 per consumer warpgroup in the specialized variants, whose warps the kernel sets; 8
# warps in the pipelined one), 128 keys per block, and ``num_stages`` K/V buffers in the TMA
# ring: at d=128, Q and three stages of K and V take 224 KB of shared memory. Run 37 on an
# H200 (``scripts/probe_sm90.py``, docs/benchmarks.md) timed three variants and three
# tiles; the pingpong variant with three stages was the fastest in all 12 cases.
SM90_FORWARD: dict[tuple[int, bool], KernelConfig] = {
    (64, False): _C(128, 128, 4, 3), (64, True): _C(128, 128, 4, 3),
    (128, False): _C(128, 128, 4, 3), (128, True): _C(128, 128, 4, 3),
    # Head dims past 128 (256-column tiles): 64 keys per block, two stages (Q and the ring
    # take 192 KB); spill-free for sm_90 (Triton 3.6). Run 47 (H100) timed it at 1.03-1.16x
    # the portable forward at d=192 and 1.14-1.38x at d=256 (seqlen 512-16k).
    (256, False): _C(128, 64, 4, 2), (256, True): _C(128, 64, 4, 2),
}
#: Fewest query rows (seqlen_q) from which the default backend takes the Gluon sm_90
#: forward and backward, per head dim (bf16, 16k tokens per call, against the portable
#: kernels). Forward, run 37 (pingpong, 3 stages): d=128 1.31-1.41x at seqlen 1k-16k; d=64
#: 1.14-1.24x at 4k-16k, but at 1k 1.02x full and 0.82x causal (short causal programs: the
#: warp-specialized prologue and the 12 warps do not pay off). Backward, run 38 (64x128x2 /
#: 128x128x2 tiles): d=128 1.15-1.34x at 1k-16k; d=64 1.04-1.13x at 4k-16k, and at 1k 0.97x
#: full, 1.08x causal. Run 39 added d=80 and 96 (the d=128 tiles, padded): forward
#: 1.20-1.44x and backward 1.17-1.36x the portable kernels at every seqlen 1k-16k. Run 47
#: (H100, ``bench kernels --grid wide`` under RINGFLASH_BACKEND=sm90 against run 46's
#: portable rows, and ``scripts/probe_sm90.py``): at seqlen 512 the Gluon kernels ran d=80,
#: 96 and 128 at 1.04-1.38x the portable ones in both passes (d=64: 0.88-1.06x, kept at
#: 4k); past d=128 (256-column tiles, ``SM90_BACKWARD_WIDE``) d=192 at 1.02-1.38x and d=256
#: at 1.05-1.72x from 512 to 16k, except d=192 causal at 16k (0.99-1.00x, a tie). Run 51
#: (H100, ``bench kernels --grid wide --families dense``, s=512 to 8k, against FA2): d=112
#: (padded to 128) forward 1.56-2.08x and backward 1.50-1.58x, where the portable kernels ran
#: 1.15-1.54x and 1.10-1.24x; d=160 and d=224 (padded to 256) forward 1.27-1.45x and
#: 1.45-2.07x, backward 1.20-1.30x and 1.58-1.68x, where the portable kernels' backward ran
#: 0.73-0.80x (d=160, run 50) and 0.90-1.16x (d=224). Head dims not listed take the entry
#: of the next measured one up (``sm90_min_seqlen_q``).
SM90_MIN_SEQLEN_Q: dict[int, int] = {64: 4096, 80: 512, 96: 512, 112: 512, 128: 512, 160: 512, 192: 512, 224: 512,
                                     256: 512}


def sm90_min_seqlen_q(headdim: int) -> int:
    """The query length from which the default backend takes the Gluon kernels at
    ``headdim``: ``SM90_MIN_SEQLEN_Q``'s entry, or for a head dim it does not list (d=72,
    200, ...) the entry of the next measured head dim up, which runs on the same or a wider
    zero-padded tile (d=40..56 take d=64's 4096, whose short-sequence loss comes from the
    warp-specialized prologue, not from the width)."""
    measured = SM90_MIN_SEQLEN_Q.get(headdim)
    if measured is None:
        measured = SM90_MIN_SEQLEN_Q[min((d for d in SM90_MIN_SEQLEN_Q if d >= headdim), default=max(SM90_MIN_SEQLEN_Q))]
    return measured
#: Head dims at which the default backend also takes the Gluon kernels with dropout (from
#: the same seqlen): run 39's `bench dropout` (b=4 s=4k h=16 d=128 causal) timed their
#: fwd+bwd with the PTX mask at 3.19 ms against the portable kernels' 3.28. Others unmeasured.
SM90_DROPOUT_HEADDIMS: tuple[int, ...] = (128,)
#: Whether the default backend takes the Gluon kernels for softcap calls (where it takes them
#: without softcap). Run 45 (H100, b=4 s=4k h=16 causal bf16, softcap 30) timed them against
#: the portable kernels' softcap: d=128 forward 1.31x and backward 1.55x faster, d=64 1.09x
#: and 1.02x (the same call without softcap: 0.89x and 0.93x of these times at d=128).
SM90_SOFTCAP: bool = True


# The Gluon sm_90 backward (``kernels.sm90``), one config per kernel: dK/dV owns block_n
# keys (two consumer warpgroups of block_n / 2) and streams block_m query rows per step; dQ
# owns block_m query rows (two of block_m / 2) and streams block_n keys. At d=128 each takes
# 128-160 KB of shared memory with these stages. Run 38 on an H200 (``scripts/probe_sm90.py
# --parts bwd``, docs/benchmarks.md) timed three tile pairs and the atomic 5-GEMM variant at
# d=64/128, seqlen 1k-16k: 64x128x2 / 128x128x2 was the fastest or within 1.4% in all 12
# cases; the atomic variant ran at 0.62-0.75x of it.
SM90_BACKWARD: dict[str, KernelConfig] = {"dkdv": _C(64, 128, 4, 2), "dq": _C(128, 128, 4, 2)}
#: With softcap the dK/dV kernel also holds the capped scores' tile (for dS's 1 - t^2)
#: beside P, dP in flight, dK and dV: compiled for sm_90 (Triton 3.6) at d=128, the 64-row
#: step spilled 38-129 stores (54 reloads in the causal loop); the 32-row step spills none in
#: dense calls, with or without softcap and dropout (2 stores in the varlen causal softcap
#: dK/dV kernel). Run 45 timed this pair with softcap (``SM90_SOFTCAP``). Without softcap
#: the 32-row step ran 0.86-0.94x the 64-row one (run 46, H100, d=128), so it stays here.
SM90_BACKWARD_SOFTCAP: dict[str, KernelConfig] = {"dkdv": _C(32, 128, 4, 2), "dq": _C(128, 128, 4, 2)}
#: Head dims past 128 (tiles of 256 columns; no dropout or softcap): dK/dV owns 64 keys,
#: both consumers over all of them, each accumulating a column half of d (``SPLIT_D``), and
#: streams 64 query rows per step (K, V, two stages of Q and dO and the score tiles: 224 KB
#: of shared memory); dQ streams 32 keys per step beside its 2 x 64 query rows (192 KB).
#: Compiled for sm_90 (Triton 3.6), neither spills in its loops (the varlen causal dK/dV
#: kernel keeps 16 bytes of stack in its prologue, around the per-sequence descriptors).
#: Run 47 (H100, ``scripts/probe_sm90.py``, d=192 and 256, seqlen 512-16k) timed dQ with
#: two and three 32-key stages: within 3% of each other but at d=256 full 16k (two: 1.85x
#: the portable backward, three: 1.72x); with two, the pair ran 1.42-1.85x the portable
#: backward at d=256 and 1.08-1.43x at d=192. An ``override`` of the dK/dV tile must keep 64 x 64.
SM90_BACKWARD_WIDE: dict[str, KernelConfig] = {"dkdv": _C(64, 64, 4, 2), "dq": _C(128, 32, 4, 2)}


BACKENDS = ("", "portable", "sm90")


def backend() -> str:
    """``RINGFLASH_BACKEND``: "" (unset: the default choice of ``kernels.dispatch``),
    "portable" or "sm90"."""
    name = os.environ.get("RINGFLASH_BACKEND", "")
    if name not in BACKENDS:
        raise ValueError(f"RINGFLASH_BACKEND: got {name!r}; expected portable, sm90 or unset")
    return name


def fwd_kv_tma_setting() -> Optional[bool]:
    """``RINGFLASH_FWD_KV_TMA``: "1" forces the portable forward's K/V TMA descriptors on,
    "0" off (and takes ``SHORT_KEYS_POINTER_TABLE``'s tiles); unset (None) leaves it to the
    config's ``kv_tma``."""
    value = os.environ.get("RINGFLASH_FWD_KV_TMA", "")
    if value not in ("", "0", "1"):
        raise ValueError(f"RINGFLASH_FWD_KV_TMA: got {value!r}; expected 0, 1 or unset")
    return None if value == "" else value == "1"


def fwd_kv_tma(device: torch.device, wanted: bool = False) -> bool:
    """Whether the portable forward reads K and V through TMA descriptors (``fwd._fwd_kernel``'s
    KV_TMA): where its config asks (``wanted``: ``KernelConfig.kv_tma``) or
    ``RINGFLASH_FWD_KV_TMA`` forces it (``fwd_kv_tma_setting``), on GPUs that have TMA (sm_90
    on) and under the interpreter. Run 53 (Nsight Compute, the varlen 64 x 256 forward) found
    the pointer loads' cp.async pipeline paying a CTA barrier at every key block and the
    per-thread address arithmetic, where FA2's forward stalls less; run 56 timed the
    descriptors there (``SHORT_KEYS_TABLE``)."""
    setting = fwd_kv_tma_setting()
    if not (wanted if setting is None else setting):
        return False
    return interpreting() or (device.type == "cuda" and _capability(device) >= (9, 0))


def sm90_varlen_enabled() -> bool:
    """``RINGFLASH_SM90_VARLEN``: "1" lets ``RINGFLASH_BACKEND=sm90`` take plain varlen calls
    to the Gluon kernels; "0" or unset keeps every varlen call on the portable ones (the
    default backend never preferred them). Off since run 47 (H100): the GPU property test of
    varlen calls under RINGFLASH_BACKEND=sm90 (``test_gpu_varlen``, 20 random packed batches)
    ended once in an illegal memory access and passed twice with the same seed (once with
    CUDA_LAUNCH_BLOCKING=1): a fault that comes and goes, in the only kernels that make TMA
    descriptors on the device (one per sequence, in global scratch that launches reuse). The
    suspect, not yet confirmed on a GPU: Triton fences each descriptor for the warp that
    writes it, while the loader and second consumer warps of the warp-specialized kernels
    read it through TMA without an acquire of their own (docs/benchmarks.md, run 47). Since
    then each partition makes the descriptors it reads (the PTX shows each one's own
    acquire before its TMA). Run 48 ran that once: one seed of ``test_gpu_varlen`` and the
    15 ``sm90_varlen`` GPU tests passed, too little against a fault that came once in three
    runs of a seed, so the switch stays off."""
    value = os.environ.get("RINGFLASH_SM90_VARLEN", "0")
    if value not in ("0", "1"):
        raise ValueError(f"RINGFLASH_SM90_VARLEN: got {value!r}; expected 0 or 1")
    return value == "1"


#: How the Gluon 5-GEMM backward (``RINGFLASH_BACKWARD=atomic``) adds its dQ tiles into the
#: float32 accumulator: "tma" (the default) stages each consumer's dQ half in shared memory
#: for asynchronous TMA adds; "red" adds it by vector reductions from the consumers'
#: registers. Run 51 (H100, d=128, s=4k and 16k): "tma" ran 1.02-1.16x "red"; against the
#: deterministic pair, which stays the default backward, "tma" ran 0.83-0.89x and "red"
#: 0.73-0.81x.
SM90_DQ_WRITERS = ("tma", "red")


def sm90_dq_writer() -> str:
    """``RINGFLASH_SM90_DQ_WRITER`` (default "tma"; an ``override(sm90_dq_writer=...)``
    context wins): see ``SM90_DQ_WRITERS``."""
    value = _override.get("sm90_dq_writer") or os.environ.get("RINGFLASH_SM90_DQ_WRITER", "tma")
    if value not in SM90_DQ_WRITERS:
        raise ValueError(f"RINGFLASH_SM90_DQ_WRITER: got {value!r}; expected one of {SM90_DQ_WRITERS}")
    return value


def sm90_backward_overlap() -> bool:
    """``RINGFLASH_SM90_BWD_OVERLAP`` ("1" or unset on, "0" off; an
    ``override(sm90_backward_overlap=...)`` context wins): whether the two-kernel Gluon
    backward launches its dQ kernel as a programmatic dependent launch of its dK/dV kernel
    (sm_90's PDL; dense calls). dQ reads nothing dK/dV writes, so its programs may start on
    the SMs that the dK/dV launch's last programs leave idle (a causal launch's tail, a
    launch's last partial wave) instead of after the whole launch; each dQ program waits for
    the dK/dV launch before it exits, so what follows in the stream still sees both done.
    Run 56 (H100, ``probe_sm90.py --parts bwd``, d=128, each A/B bracketed by two serial
    readings): 16/4 heads at 8k tokens, causal s=8k (batch 1) 1.06x (0.84 -> 0.88x cuDNN),
    causal s=4k (batch 2) 1.04-1.07x, full s=8k 1.02x, full s=4k level; MHA and GQA 32/8
    at 4k-16k within the drift between the brackets."""
    value = _override.get("sm90_backward_overlap")
    if value is not None:
        return bool(value)
    env = os.environ.get("RINGFLASH_SM90_BWD_OVERLAP", "1")
    if env not in ("0", "1"):
        raise ValueError(f"RINGFLASH_SM90_BWD_OVERLAP: got {env!r}; expected 0 or 1")
    return env == "1"


def sm90_backward_config(kind: str, softcap: bool = False, wide: bool = False) -> KernelConfig:
    """The Gluon sm_90 backward's config for ``kind`` ("dkdv" or "dq"): with softcap
    ``SM90_BACKWARD_SOFTCAP``'s, past d=128 (``wide``) ``SM90_BACKWARD_WIDE``'s; an
    ``override(sm90_dkdv=..., sm90_dq=...)`` context wins."""
    table = SM90_BACKWARD_WIDE if wide else SM90_BACKWARD_SOFTCAP if softcap else SM90_BACKWARD
    return _override.get(f"sm90_{kind}") or table[kind]


def sm90_forward_config(headdim: int, causal: bool) -> KernelConfig:
    """The Gluon sm_90 forward's config (an ``override(sm90_fwd=...)`` context wins)."""
    return _override.get("sm90_fwd") or SM90_FORWARD[(headdim, causal)]


#: The most bytes a Gluon kernel's programs stream in common (K and V for the forward and
#: dQ, Q and dO for dK/dV; all heads and sequences) for which a causal launch orders its
#: programs heaviest block first across every head and sequence (``sm90_heads_first``);
#: past it, each head's blocks stay together so that the programs in flight share their
#: streams in L2 (50 MB on an H100 or H200).
SM90_HEADS_FIRST_MAX_BYTES = 24 << 20


def sm90_heads_first(causal: bool, streamed_bytes: int, blocks: int) -> bool:
    """Whether a Gluon kernel launches its programs block by block (heaviest first, every
    head and sequence of one block before the next: grid (heads, batch, blocks)) rather
    than head by head. Causal programs range from one block of the other side to all of
    them; head by head, the heaviest programs of the last heads start late. Run 39's
    one-head case (4 sequences of 8k, 256 programs, forward 0.41x FA2's speed) and
    transformers' batch-1 step (16 heads of 4k) are such launches; a longest-first order
    over all of them bounds the tail by one program. Small problems only (their streams
    fit L2 whatever the order), causal only (full programs are alike); ``blocks`` must fit
    grid axis 2. Compiled, not yet timed; an ``override(sm90_heads_first=False)`` context
    keeps the head-by-head order (an A/B for the probes)."""
    if _override.get("sm90_heads_first") is False:
        return False
    return causal and streamed_bytes <= SM90_HEADS_FIRST_MAX_BYTES and blocks <= MAX_GRID_YZ


def sm90_dkdv_head_splits(programs: int, kv_group: int, device: torch.device) -> int:
    """How many programs share one (key block, KV head, sequence) of the Gluon dK/dV
    kernel, each over its own slice of the group's query heads into a partial dK/dV (in the
    inputs' dtype, as flash-attn's per-head ones for GQA) that the launcher sums in float32
    (in a fixed order: deterministic). One program per key block and KV
    head underfills the GPU when those are few: transformers' Llama step at batch 1 (16/4
    heads, 4k tokens) launched 128 programs on 132 SMs, and the causal ones run from one
    query block to all of them, so its dK/dV kernel took 0.41 ms of a 0.77 ms fwd+bwd
    (run 39's profile; split 4 ways, 0.29 ms). The smallest divisor of the group that brings the launch to two
    programs per SM; the whole group where none does; 1 from two programs per SM on. An
    ``override(sm90_head_splits=...)`` context wins (it must divide the group)."""
    forced = _override.get("sm90_head_splits")
    if forced is not None:
        if kv_group % int(forced):  # type: ignore[arg-type]
            raise ValueError(f"sm90_head_splits: got {forced}; expected a divisor of the group size {kv_group}")
        return int(forced)  # type: ignore[arg-type]
    if kv_group == 1 or device.type != "cuda":
        return 1
    wanted = 2 * sm_count(device)
    if programs >= wanted:
        return 1
    return next((d for d in range(2, kv_group + 1) if kv_group % d == 0 and programs * d >= wanted), kv_group)


def portable_tiles_forced(kind: str) -> bool:
    """Whether an ``override`` context names the portable kernels' tiles for ``kind``:
    "fwd" (``fwd=``) or "bwd" (``dkdv=`` or ``dq=``); a test forcing them means that kernel."""
    return "fwd" in _override if kind == "fwd" else ("dkdv" in _override or "dq" in _override)


#: Registers per thread that a program's resident tiles may take (``tile_registers``): the
#: rest of the 255 go to the score tile and addresses. Every tuned sm_90 entry sits at or
#: below it; the d=256 entries before run 27, at 192-384 (4 warps), ran the backward at 0.4x
#: FA2's speed and the forward at 0.5-0.9x (docs/benchmarks.md).
TILE_REGISTER_BUDGET = 192


def tile_registers(kind: str, cfg: KernelConfig, block_d: int) -> float:
    """32-bit registers per thread of the tiles a program keeps for its whole loop, 16-bit
    inputs: the float32 accumulators (out for the forward, dK and dV, dQ) and the input
    tiles held beside them (q; k and v; q and dO), spread over 32 x num_warps threads.
    Above ``TILE_REGISTER_BUDGET`` the kernel spills."""
    rows = cfg.block_n if kind == "dkdv" else cfg.block_m
    words = {"fwd": 1.0 + 0.5, "dkdv": 2.0 + 1.0, "dq": 1.0 + 1.0}[kind]  # fp32 acc + packed 16-bit tiles
    return words * rows * block_d / (32 * cfg.num_warps)


def candidates(kind: str, headdim: int) -> list[KernelConfig]:
    """The pruned autotune list of one kernel: tile shapes and warps whose resident tiles
    fit the register budget at this head dim's padded width, and, among those, not more
    warps than the tiles can use (8 warps for tiles under 64 x 64 rows x keys only where 4
    would spill)."""
    # The tiles' width: the padded head dim, or its two parts' sum (``head_parts``).
    block_d = sum(head_parts(headdim))
    if block_d > 128:
        # 128-row tiles fit the budget only with 8 warps (the forward's: FA2's d=256 shape).
        shapes = [(32, 32), (64, 32), (32, 64), (64, 64), (16, 64), (64, 16), (128, 32), (128, 64)]
        stage_opts = (1, 2)
    else:
        shapes = [(64, 64), (128, 64), (64, 128), (128, 128), (128, 32), (32, 128)]
        stage_opts = (2, 3, 4)
    out = []
    for bm, bn in shapes:
        for warps in (4, 8):
            cfg = KernelConfig(bm, bn, warps, 1)
            if tile_registers(kind, cfg, block_d) > TILE_REGISTER_BUDGET:
                continue
            # At d=256 a 4-warp tile at the budget still spills: the (64, 32, 4) dK/dV kernel
            # took 1016 bytes of stack, the 8-warp one 16 (scripts/compile_sm90.py, Triton 3.6).
            if warps == 8 and bm * bn < 64 * 128 and block_d <= 128 and \
                    tile_registers(kind, replace(cfg, num_warps=4), block_d) <= TILE_REGISTER_BUDGET:
                continue
            if warps == 4 and bm * bn > 128 * 64:
                continue
            out += [replace(cfg, num_stages=s) for s in stage_opts]
    if block_d > 128:
        out += [KernelConfig(bm, bn, 8, s) for bm, bn in WIDE_HEAD_EXTRA_SHAPES.get(kind, ()) for s in stage_opts]
        if kind == "dkdv":  # every shape in two passes too
            out = [replace(cfg, dkdv_passes=p) for cfg in out for p in (1, 2)]
    return list(dict.fromkeys(out))


#: Head dims above 128, 8 warps: (BLOCK_M, BLOCK_N) shapes that the register estimate
#: refuses but that compile for sm_90 without (or with few) spills and on warpgroup MMAs
#: (``scripts/compile_sm90.py`` with Triton 3.6, d=256, 2 stages): dQ (128, 32); dK/dV at
#: (16, 128) and (32, 128) in two passes (one accumulator each; (16, 64) as well). The
#: tuner takes them as candidates (``candidates``). The one-pass d=256 dK/dV kernel spills
#: at every shape on warpgroup MMAs: the table's (64, 64, 8, 2) took 576 bytes of stack,
#: 48 and 208 in two passes; (64, 32, 8, 2) has 16 but runs per-warp MMAs (a 32-key tile
#: is too small). docs/benchmarks.md, after run 36, has the table.
WIDE_HEAD_EXTRA_SHAPES: dict[str, list[tuple[int, int]]] = {"dq": [(128, 32)], "dkdv": [(16, 128), (32, 128)]}


_override: dict[str, object] = {}


@contextlib.contextmanager
def override(
    fwd: Optional[KernelConfig] = None,
    dkdv: Optional[KernelConfig] = None,
    dq: Optional[KernelConfig] = None,
    num_splits: Optional[int] = None,
    sm90_fwd: Optional[KernelConfig] = None,
    sm90_dkdv: Optional[KernelConfig] = None,
    sm90_dq: Optional[KernelConfig] = None,
    sm90_head_splits: Optional[int] = None,
    sm90_heads_first: Optional[bool] = None,
    sm90_dq_writer: Optional[str] = None,
    sm90_backward_overlap: Optional[bool] = None,
    head_parts: Optional[bool] = None,
) -> Iterator[None]:
    """Force configurations inside the block (tests, tuning). ``fwd`` is the portable
    forward's, and also keeps the default backend on the portable forward (a test forcing
    its tiles means that kernel); ``sm90_*`` are the Gluon sm_90 kernels' (``sm90_head_splits``:
    ``sm90_dkdv_head_splits``; ``sm90_dq_writer``: ``sm90_dq_writer``;
    ``sm90_backward_overlap``: ``sm90_backward_overlap``); ``head_parts``:
    whether the portable kernels split the head dim in two (``head_parts``)."""
    saved = dict(_override)
    for key, value in (("fwd", fwd), ("dkdv", dkdv), ("dq", dq), ("num_splits", num_splits), ("sm90_fwd", sm90_fwd),
                       ("sm90_dkdv", sm90_dkdv), ("sm90_dq", sm90_dq), ("sm90_head_splits", sm90_head_splits),
                       ("sm90_heads_first", sm90_heads_first), ("sm90_dq_writer", sm90_dq_writer),
                       ("sm90_backward_overlap", sm90_backward_overlap), ("head_parts", head_parts)):
        if value is not None:
            _override[key] = value
    try:
        yield
    finally:
        _override.clear()
        _override.update(saved)


def override_key() -> tuple:
    """The ``override`` context in force, hashable (empty outside one): part of the key of a
    launcher's memo of its host work (``sm90._PLANS``), so that a test's forced tiles
    never reuse a plan made without them."""
    return tuple(_override.items()) if _override else ()


#: The narrowest second head-dim part (``head_parts``). 64 since run 49 (H100): a 32-wide
#: second part gave wrong outputs on the GPU for a varlen call of one or two queries over
#: 192 keys, GQA 3/1, fp16 and bf16 (``test_properties.py::test_gpu_varlen``, seed 4):
#: d=96 (64 + 32) and d=160 (128 + 32) failed, 0.32 off where PyTorch's own error is 0.004,
#: with the table's tiles and with one pipeline stage; the same call at d=96 with the split
#: off, at d=128 and at d=192 (128 + 64) passed. Run 46 had found the split d=96 forward
#: wrong under other tiles in the same way (one query: the score itself).
HEAD_PART_MIN = 64
#: Whether ``head_parts`` splits by default ("1") or only under RINGFLASH_HEAD_PARTS=1 ("0").
#: On since run 42 (H100): the d=192 split matched the float64 reference in bf16 and fp16
#: (``scripts/probe_head_parts.py`` and the GPU tests) and ran the wide grid's d=192 rows
#: clean, 13-28% faster than one padded tile.
HEAD_PARTS_DEFAULT = "1"


def head_parts(headdim: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_D2): the widths of the two head-dim parts the portable kernels hold
    as separate tiles, columns [0, BLOCK_D) and [BLOCK_D, BLOCK_D + BLOCK_D2); BLOCK_D2 = 0
    is one tile, the head dim padded to a power of two (Triton's tiles have power-of-two
    shapes). Padding runs every GEMM on zero columns: d=192 as 256 costs a third more work
    and the registers of 256 columns, which forced the d=256 tiles' two-pass dK/dV on it
    (run 39's wide grid: d=192 cost 0.91x d=256's time per head, its backward 0.62-0.75x
    FA2's speed). Split, d=192 is 128 + 64: 15-25% faster on an H200 (runs 40 and 41),
    13-28% on an H100 (run 42).

    Only head dims that are exactly two powers of two, the second at least
    ``HEAD_PART_MIN`` wide, split: other splits miscompile in Triton 3.6 for sm_90. Run 41
    (``scripts/probe_head_parts.py``) found an illegal memory access at d=80 as 64 + 16 (no
    padding) and d=136 as 128 + 32, and wrong outputs at d=40 as 32 + 16 and d=72 as
    64 + 32, where the interpreter's runs and the unsplit kernels are right; d=96 as 64 + 32
    ran clean there, but run 49 found it and d=160 as 128 + 32 wrong on a varlen call of
    one query (``HEAD_PART_MIN``), so only d=192 splits; run 42 (H100) checked it at real
    sizes. The kernels load the second part without column masks. On by default
    (``HEAD_PARTS_DEFAULT``): ``RINGFLASH_HEAD_PARTS=0`` turns it off,
    ``override(head_parts=...)`` forces either way."""
    padded = max(16, 1 << (max(headdim, 1) - 1).bit_length())
    enabled = _override.get("head_parts")
    if enabled is None:
        mode = os.environ.get("RINGFLASH_HEAD_PARTS", HEAD_PARTS_DEFAULT)
        if mode not in ("0", "1"):
            raise ValueError(f"RINGFLASH_HEAD_PARTS: got {mode!r}; expected 0 or 1")
        enabled = mode == "1"
    first = padded // 2
    second = headdim - first
    if not enabled or headdim == padded or second < HEAD_PART_MIN or second & (second - 1):
        return padded, 0
    return first, second


_capabilities: dict[int, tuple[int, int]] = {}


def _capability(device: torch.device) -> tuple[int, int]:
    """The device's compute capability, read once per device (a few us per call otherwise,
    three calls a training step)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _capabilities:
        _capabilities[idx] = torch.cuda.get_device_capability(idx)
    return _capabilities[idx]


_sm_count: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sm_count:
        _sm_count[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _sm_count[idx]


def _seqlen_bucket(n: int) -> int:
    b = 128
    while b < n and b < 65536:
        b *= 2
    return b


def tuning_key(kind: str, q: torch.Tensor, prob) -> tuple:
    return (
        # The head-dim tiles (``head_parts``) as well: a split d=192 runs other kernels.
        kind, _capability(q.device), q.dtype, headdim_bucket(prob.headdim), head_parts(prob.headdim), prob.causal,
        prob.has_left, prob.softcap > 0, prob.is_varlen,
        _seqlen_bucket(prob.max_seqlen_q), _seqlen_bucket(prob.max_seqlen_k),
    )


def autotune_enabled() -> bool:
    return os.environ.get("RINGFLASH_AUTOTUNE", "0") == "1" and not interpreting()


#: key -> chosen config; key -> [(config, ms or None)] for reporting.
_tuned: dict[tuple, KernelConfig] = {}
tuning_log: dict[tuple, list[tuple[KernelConfig, Optional[float]]]] = {}


def pick_fastest(key: tuple, cands: list[KernelConfig], run: Callable[[KernelConfig], object]) -> KernelConfig:
    """Time every candidate (median of do_bench) and remember the fastest for ``key``.

    A candidate that fails to compile or launch (e.g. too much shared memory) is skipped.
    """
    if key in _tuned:
        return _tuned[key]
    import triton.testing

    log: list[tuple[KernelConfig, Optional[float]]] = []
    for cfg in cands:
        try:
            ms = float(triton.testing.do_bench(lambda: run(cfg), warmup=5, rep=25, return_mode="median"))
        except Exception:  # out of resources for this shape: not a candidate here
            ms = None
        log.append((cfg, ms))
    timed = [(ms, i) for i, (_, ms) in enumerate(log) if ms is not None]
    if not timed:
        raise RuntimeError(f"ringflash autotune: no candidate configuration ran for {key}")
    best = log[min(timed)[1]][0]
    _tuned[key] = best
    tuning_log[key] = log
    return best


def config_for(kind: str, q: torch.Tensor, prob, run: Optional[Callable[[KernelConfig], object]] = None,
               dropout: bool = False, atomic_dq: bool = False) -> KernelConfig:
    """The launch configuration of kernel ``kind`` for this problem (see the module doc);
    ``dropout``: the kernel generates a dropout mask (``DROPOUT_TABLE`` first);
    ``atomic_dq``: the dK/dV kernel also adds dQ by atomics (``ATOMIC_DQ_TABLE`` over all)."""
    if kind in _override:
        return _override[kind]  # type: ignore[return-value]
    if interpreting() or q.device.type != "cuda":
        return INTERPRETER[kind]
    if run is not None and autotune_enabled():
        return pick_fastest(tuning_key(kind, q, prob) + (dropout, atomic_dq), candidates(kind, prob.headdim), run)
    if q.dtype == torch.float32 and input_precision(q.dtype) == "ieee":
        cfg = FP32_EXACT[headdim_bucket(prob.headdim)][kind]
        return fit_shared_memory(kind, cfg, sum(head_parts(prob.headdim)), q.element_size(), _device_index(q.device))
    table = TABLE.get(_capability(q.device), {}).get(kind, {})
    # A sliding window behaves like the causal band: few blocks per row, masked edges.
    banded = prob.causal or prob.has_left or prob.has_right
    key = (headdim_bucket(prob.headdim), banded)
    gqa_key = key + (prob.nheads > prob.nheads_k,)
    cfg = table.get(gqa_key, table.get(key, DEFAULT[kind]))
    parts = head_parts(prob.headdim)
    longest, entry = HEAD_PARTS_TABLE.get(_capability(q.device), {}).get(kind, {}).get((parts, banded), (0, None))
    if entry is not None and (longest == 0 or prob.max_seqlen_q <= longest):
        cfg = entry
    short_keys = SHORT_KEYS_POINTER_TABLE if fwd_kv_tma_setting() is False else SHORT_KEYS_TABLE
    longest_k, entry = short_keys.get(_capability(q.device), {}).get(kind, {}).get((parts, banded), (0, None))
    if entry is not None and prob.max_seqlen_k <= longest_k and not dropout:
        cfg = entry
    if dropout:
        cfg = DROPOUT_TABLE.get(_capability(q.device), {}).get(kind, {}).get(key, cfg)
    if atomic_dq and kind == "dkdv":
        cfg = ATOMIC_DQ_TABLE.get(_capability(q.device), {}).get(key, cfg)
    # The tiles' width: a split d=192 holds 128 + 64 columns, not the padded 256 (whose
    # estimate cut the measured two stages of its dQ tile to one).
    return fit_shared_memory(kind, cfg, sum(parts), q.element_size(), _device_index(q.device))


def shared_memory_estimate(kind: str, cfg: KernelConfig, block_d: int, element_size: int) -> int:
    """Bytes of shared memory a launch needs, to first order: the tiles a program keeps
    (q for the forward and dQ, k and v for dK/dV) plus ``num_stages`` copies of the tiles
    its loop streams (k and v; q and dO for dK/dV). Matches Triton's figure for the
    forward (fp32, d=128, (128, 64) tiles, 3 stages: 262144 bytes on an H200)."""
    streamed = cfg.block_m if kind == "dkdv" else cfg.block_n
    kept = cfg.block_n if kind == "dkdv" else cfg.block_m
    held = (2 if kind != "fwd" else 1) * kept * block_d * element_size
    return held + cfg.num_stages * 2 * streamed * block_d * element_size


@functools.lru_cache(maxsize=None)
def fit_shared_memory(kind: str, cfg: KernelConfig, block_d: int, element_size: int, device_index: int) -> KernelConfig:
    """``cfg`` with fewer pipeline stages (then smaller streamed tiles) until its estimate
    fits the GPU's shared memory per block. The tables are tuned for 16-bit inputs; float32
    tiles are twice as large and used to fail to launch ("out of resources") at d=128."""
    limit = _shared_memory_limit(device_index)
    while shared_memory_estimate(kind, cfg, block_d, element_size) > limit:
        if cfg.num_stages > 1:
            cfg = replace(cfg, num_stages=cfg.num_stages - 1)
        elif kind == "dkdv" and cfg.block_m > 16:
            cfg = replace(cfg, block_m=cfg.block_m // 2)
        elif kind != "dkdv" and cfg.block_n > 16:
            cfg = replace(cfg, block_n=cfg.block_n // 2)
        else:
            break  # nothing left to shrink: let Triton report it
    return cfg


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _shared_memory_limit(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024)


#: Upper bound on split-KV fan-out (the combine kernel holds all splits of a row at once).
MAX_SPLITS = 16
#: The decode kernels' bound: one long sequence (b=1, 8 KV heads, 32k keys) has 8 programs
#: before splitting, and 16 splits left it at 0.75x FA2's speed (run 35,
#: ``scripts/probe_decode_splits.py``); with up to 64 the heuristic's choice took 48.2 us
#: against FA2's 46.9 (run 36). The combine kernel loops over the splits.
MAX_DECODE_SPLITS = 64
#: A decode program's fixed cost (its query rows, its partial output) in key blocks of 64:
#: run 35's fan-out sweep at b=8 sk=8k on an H200 took 5.3 us more with 16 splits than
#: with 8 (the same keys per SM, twice the programs) and 2.6 us more with 5 than with 6
#: (12 more key blocks on the busiest SM, as many programs), about 6 blocks a program.
DECODE_PROGRAM_BLOCKS = 6


def choose_num_splits(device: torch.device, prob, num_m_blocks: int, cfg: KernelConfig) -> int:
    """Split the key range across programs when (batch x heads x query blocks) leaves most SMs idle.

    Measured on an H100 (docs/benchmarks.md): 16 programs over 32k keys ran 3.4x faster
    split 8-16 ways, but 64 programs over 8k keys ran slower split any way, so splitting
    starts only below a quarter of the SMs. Each split keeps at least 4 key blocks.
    """
    if "num_splits" in _override:
        return int(_override["num_splits"])  # type: ignore[arg-type]
    if device.type != "cuda" or interpreting():
        return 1
    work = prob.batch * prob.nheads * num_m_blocks
    sms = sm_count(device)
    if 4 * work > sms:
        return 1
    key_blocks = -(-max(prob.max_seqlen_k, 1) // cfg.block_n)
    return max(1, min(-(-sms // work), key_blocks // 4, MAX_SPLITS))


#: The dK/dV kernel's query split (see ``dkv_splits``): "off" until a GPU run has measured
#: it against one program per key block on a batch that underfills the GPU (run 26's wide
#: grid has none); ``RINGFLASH_DKV_SPLITS`` overrides it ("off", "auto", or a count).
DKV_SPLITS_DEFAULT = "off"


def dkv_splits(prob, cfg: KernelConfig, device: torch.device) -> int:
    """How many programs share one (key block, KV head, sequence) in the dK/dV kernel, each
    summing the query blocks whose index is its own modulo the count (every query head and
    group) into a float32 partial; the launcher adds the partials in a fixed order
    (deterministic).

    One program per key block, KV head and sequence underfills the GPU when those are few:
    issue 15's profile had a 4k-token GQA 16/4 batch at 128 programs on 132 SMs, and the
    seed-004 interface has one head. "auto" splits until the launch has about two programs
    per SM; never more splits than query blocks, nor than grid axis 1 (KV heads x splits)
    holds."""
    mode = os.environ.get("RINGFLASH_DKV_SPLITS", DKV_SPLITS_DEFAULT)
    if mode == "off":
        return 1
    query_blocks = max(1, min(-(-prob.max_seqlen_q // cfg.block_m), MAX_GRID_YZ // max(1, prob.nheads_k)))
    if mode != "auto":
        try:
            wanted = int(mode)
        except ValueError:
            wanted = 0
        if wanted < 1:
            raise ValueError(f"RINGFLASH_DKV_SPLITS: got {mode!r}; expected off, auto or a positive int")
        return min(wanted, query_blocks)
    if device.type != "cuda" or interpreting():
        return 1
    programs = -(-max(prob.max_seqlen_k, 1) // cfg.block_n) * prob.nheads_k * prob.batch
    sms = sm_count(device)
    if programs >= 2 * sms:
        return 1
    return max(1, min(query_blocks, -(-2 * sms // programs)))


#: The backward's default: "deterministic" (separate dK/dV and dQ kernels, no atomics, 7
#: GEMMs) or "atomic" (dQ accumulated by atomics in the dK/dV kernel, 5 GEMMs, as flash-attn,
#: FA3 and cuDNN do). Deterministic: on an H200 it was the faster in 82 of the wide grid's 83
#: cases (run 26 in docs/benchmarks.md); ``RINGFLASH_BACKWARD`` overrides it.
BACKWARD_DEFAULT = "deterministic"


def use_atomic_dq(deterministic: bool) -> bool:
    """Whether a backward uses the atomic dQ path; ``deterministic=True`` (flash-attn's flag)
    always refuses it."""
    if deterministic:
        return False
    mode = os.environ.get("RINGFLASH_BACKWARD", BACKWARD_DEFAULT)
    if mode not in ("deterministic", "atomic"):
        raise ValueError(f"RINGFLASH_BACKWARD: got {mode!r}; expected deterministic or atomic")
    return mode == "atomic"


#: PyTorch's float32 matmul precision setting -> the Triton dots' input precision.
#: "highest" (PyTorch's default) is exact fp32; "high" and "medium" allow tf32, as they do
#: for PyTorch's own matmuls (torch.set_float32_matmul_precision).
_FP32_PRECISION_FOR_TORCH = {"highest": "ieee", "high": "tf32", "medium": "tf32"}


def input_precision(dtype: torch.dtype) -> str:
    """The precision of the kernels' fp32 matmuls, following PyTorch's.

    fp32 inputs use exact fp32 dots unless ``torch.set_float32_matmul_precision("high")``
    (or "medium") allows tf32, about 1e-3 relative error and several times faster on tensor
    cores. ``RINGFLASH_FP32_PRECISION`` (tf32, tf32x3 or ieee) overrides either way.
    """
    if dtype != torch.float32:
        return "ieee"  # ignored by tl.dot for 16-bit operands
    value = os.environ.get("RINGFLASH_FP32_PRECISION")
    if value is None:
        return _FP32_PRECISION_FOR_TORCH.get(torch.get_float32_matmul_precision(), "ieee")
    if value not in ("tf32", "tf32x3", "ieee"):
        raise ValueError(f"RINGFLASH_FP32_PRECISION: got {value!r}; expected tf32, tf32x3 or ieee")
    return value
