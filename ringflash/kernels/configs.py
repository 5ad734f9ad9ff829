"""Every launch configuration in one place: per-GPU tables, the autotune candidate lists,
and the split-KV heuristic.

Lookup order for a launch:
1. a ``configs.override(...)`` context (tests use it to exercise other block shapes);
2. with ``RINGFLASH_AUTOTUNE=1``, the fastest of the candidate list for the problem's
   bucketed key (timed once per process with ``triton.testing.do_bench``);
3. the table entry for this GPU architecture, measured on that GPU (docs/benchmarks.md);
4. a conservative default that runs on any CUDA GPU.
Under Triton's interpreter, small blocks keep CPU runs fast and make tests span many blocks.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Optional, Sequence

import torch

from .common import interpreting


@dataclass(frozen=True)
class FwdConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    kv_cache: str = ""  # cache modifier on K/V loads ("" or ".cg")


@dataclass(frozen=True)
class BwdConfig:
    # dK/dV kernel: block_n keys per program, stepping through queries block_m at a time.
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # dQ kernel: block_m_dq queries per program, stepping through keys block_n_dq at a time.
    block_m_dq: int
    block_n_dq: int
    num_warps_dq: int
    num_stages_dq: int


INTERPRETER_FWD = FwdConfig(32, 16, 4, 1)
INTERPRETER_BWD = BwdConfig(16, 32, 4, 1, 32, 16, 4, 1)

# Any CUDA GPU with >= ~100 KB shared memory per block.
DEFAULT_FWD = FwdConfig(64, 64, 4, 2)
DEFAULT_BWD = BwdConfig(32, 64, 4, 2, 64, 32, 4, 2)


def _headdim_bucket(d: int) -> int:
    return 64 if d <= 64 else 128 if d <= 128 else 256


# Tables keyed by (major, minor) compute capability, then by head-dim bucket. Values were
# chosen by `ringflash bench tune` on the GPU named in docs/benchmarks.md.
FWD_TABLE: dict[tuple[int, int], dict[int, FwdConfig]] = {
    (9, 0): {
        64: FwdConfig(128, 64, 4, 3),
        128: FwdConfig(128, 64, 8, 3),
        256: FwdConfig(64, 64, 4, 2),
    },
    (8, 0): {
        64: FwdConfig(128, 64, 4, 3),
        128: FwdConfig(128, 32, 4, 3),
        256: FwdConfig(64, 32, 4, 2),
    },
}
BWD_TABLE: dict[tuple[int, int], dict[int, BwdConfig]] = {
    (9, 0): {
        64: BwdConfig(64, 128, 8, 3, 128, 64, 8, 3),
        128: BwdConfig(64, 128, 8, 3, 128, 64, 8, 3),
        256: BwdConfig(32, 64, 4, 2, 64, 32, 4, 2),
    },
    (8, 0): {
        64: BwdConfig(64, 128, 8, 2, 128, 64, 8, 2),
        128: BwdConfig(32, 128, 8, 2, 128, 32, 8, 2),
        256: BwdConfig(32, 64, 4, 1, 64, 32, 4, 1),
    },
}


def fwd_candidates(headdim: int) -> list[FwdConfig]:
    """The pruned autotune list for the forward."""
    big_d = headdim > 128
    out = []
    for bm in (64, 128):
        for bn in (32, 64, 128):
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    if big_d and (bn > 64 or stages > 2 or bm > 64):
                        continue
                    if warps == 8 and bm * bn < 128 * 64:
                        continue
                    out.append(FwdConfig(bm, bn, warps, stages))
    return out


def bwd_candidates(headdim: int) -> list[BwdConfig]:
    big_d = headdim > 128
    out = []
    for bm, bn in ((32, 64), (32, 128), (64, 64), (64, 128), (128, 128)):
        for warps in (4, 8):
            for stages in (1, 2, 3):
                if big_d and (bn > 64 or stages > 2):
                    continue
                if warps == 8 and bm * bn < 64 * 64:
                    continue
                out.append(BwdConfig(bm, bn, warps, stages, bn, bm, warps, stages))
    return out


_override: dict[str, object] = {}


@contextlib.contextmanager
def override(fwd: Optional[FwdConfig] = None, bwd: Optional[BwdConfig] = None, num_splits: Optional[int] = None) -> Iterator[None]:
    """Force configurations inside the block (tests, tuning)."""
    saved = dict(_override)
    if fwd is not None:
        _override["fwd"] = fwd
    if bwd is not None:
        _override["bwd"] = bwd
    if num_splits is not None:
        _override["num_splits"] = num_splits
    try:
        yield
    finally:
        _override.clear()
        _override.update(saved)


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


_sm_count: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sm_count:
        _sm_count[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _sm_count[idx]


_tuned: dict[tuple, object] = {}


def _seqlen_bucket(n: int) -> int:
    b = 128
    while b < n and b < 65536:
        b *= 2
    return b


def tuning_key(kind: str, q: torch.Tensor, prob) -> tuple:
    return (
        kind, _capability(q.device), q.dtype, _headdim_bucket(prob.headdim), prob.causal,
        prob.has_left, prob.softcap > 0, prob.is_varlen,
        _seqlen_bucket(prob.max_seqlen_q), _seqlen_bucket(prob.max_seqlen_k),
    )


def autotune_enabled() -> bool:
    return os.environ.get("RINGFLASH_AUTOTUNE", "0") == "1" and not interpreting()


def pick_fastest(key: tuple, candidates: Sequence[object], run: Callable[[object], None]) -> object:
    """Time every candidate once (median of do_bench) and remember the fastest for ``key``.

    A candidate that fails to compile or launch (e.g. too much shared memory) is skipped.
    """
    if key in _tuned:
        return _tuned[key]
    import triton.testing

    best, best_ms = None, float("inf")
    for cfg in candidates:
        try:
            ms = triton.testing.do_bench(lambda: run(cfg), warmup=5, rep=20, return_mode="median")
        except Exception:  # out of resources for this shape: not a candidate here
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise RuntimeError(f"ringflash autotune: no candidate configuration ran for {key}")
    _tuned[key] = best
    return best


def forward_config(q: torch.Tensor, prob) -> FwdConfig:
    if "fwd" in _override:
        return _override["fwd"]  # type: ignore[return-value]
    if interpreting() or q.device.type != "cuda":
        return INTERPRETER_FWD
    table = FWD_TABLE.get(_capability(q.device), {})
    return table.get(_headdim_bucket(prob.headdim), DEFAULT_FWD)


def backward_config(q: torch.Tensor, prob) -> BwdConfig:
    if "bwd" in _override:
        return _override["bwd"]  # type: ignore[return-value]
    if interpreting() or q.device.type != "cuda":
        return INTERPRETER_BWD
    table = BWD_TABLE.get(_capability(q.device), {})
    return table.get(_headdim_bucket(prob.headdim), DEFAULT_BWD)


#: Upper bound on split-KV fan-out (the combine kernel holds all splits of a row at once).
MAX_SPLITS = 16


def choose_num_splits(device: torch.device, prob, num_m_blocks: int, cfg: FwdConfig) -> int:
    """Split the key range across programs when (batch x heads x query blocks) leaves SMs idle.

    Each split should still loop over several key blocks, or the combine costs more than it saves.
    """
    if "num_splits" in _override:
        return int(_override["num_splits"])  # type: ignore[arg-type]
    if device.type != "cuda" or interpreting():
        return 1
    work = prob.batch * prob.nheads * num_m_blocks
    sms = sm_count(device)
    if work >= 0.8 * sms:
        return 1
    key_blocks = -(-max(prob.max_seqlen_k, 1) // cfg.block_n)
    splits = min(-(-sms // work), key_blocks // 4, MAX_SPLITS)
    return max(1, splits)


def input_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use tf32 matmuls unless RINGFLASH_FP32_PRECISION=ieee asks for exact fp32."""
    if dtype != torch.float32:
        return "ieee"  # ignored by tl.dot for 16-bit operands
    value = os.environ.get("RINGFLASH_FP32_PRECISION", "tf32")
    if value not in ("tf32", "tf32x3", "ieee"):
        raise ValueError(f"RINGFLASH_FP32_PRECISION: got {value!r}; expected tf32, tf32x3 or ieee")
    return value


def with_block_sizes(cfg: FwdConfig, block_m: int, block_n: int) -> FwdConfig:
    return replace(cfg, block_m=block_m, block_n=block_n)
