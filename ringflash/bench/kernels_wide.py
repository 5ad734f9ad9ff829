"""``ringflash bench kernels --grid wide`` (issue 15): our kernels against PyTorch's FA2
(SDPA flash backend), cuDNN (SDPA cuDNN backend) and, for varlen, PyTorch's FA2 varlen
kernels (``aten._flash_attention_forward/backward``), forward and backward, over a wide grid.

Grid on a GPU (bf16; ``--quick`` a subset):

* dense MHA: head dims 64, 80, 96, 128, 192, 256; causal and full; seqlen 512, 1k, 2k, 4k,
  16k (and 64k for head dims 64 and 128 only, ``--long-headdims``, to fit the time budget);
  64k tokens per case (batch = 64k / seqlen), nheads = 2048 // d as in the default grid;
* dense GQA 32/8 heads, d=128, seqlen 512..16k, 64k tokens per case;
* varlen 32/8 heads, d=128, 16k tokens: the Llama-3 pack of the default grid
  (8192+4096+2048+1024+512+512), 64 x 256, 16 x 1024 and a seeded random mix;
* the seed-004 3-D interface (``FlashAttentionTritonFunc``: one head, batch 4, n=8k, d=64,
  causal) against SDPA on (batch, 1, n, d) views;
* underfill: GQA 16/4, d=128, one sequence of 4k or 8k tokens, causal and full: the
  backward's dK/dV kernel then has fewer programs than two per SM (issue 15's profile),
  the case ``ours_split`` exists for, which no other family reaches. On sm_90 these calls
  take the Gluon backward, which does not split: there ``ours_split`` runs the default's
  kernels, and the two columns differ only by the reading's noise (up to 23%, run 57).

Implementations: ``ours`` (flash_attn_func / flash_attn_varlen_func / the 3-D function; its
backward is the library default, ``deterministic=True`` gives the same kernels today),
the backward variants (backward only, the forward is ours): ``ours_atomic`` (the same
calls under ``RINGFLASH_BACKWARD=atomic``: the 5-GEMM backward) and ``ours_split`` (under
``RINGFLASH_DKV_SPLITS=auto``: several dK/dV programs share a key block, each over some
of its query blocks, where the grid underfills the GPU), ``fa2`` and ``cudnn``. GQA baselines use
``enable_gqa=True`` where the torch and backend accept it, else repeated K/V heads (the
row's note says which). Each case also records the relative error of our output and
gradients against FA2's (and of each backward variant's against ours): a guard on the
numbers, not a test.

On a GPU the Triton variants of every case are first compiled in parallel worker
processes (Triton's on-disk cache), so the timed pass only loads them. ``--estimate``
prints the grid with its estimated time and exits.

``--out DIR`` writes kernels_wide.csv (one row per case x implementation x pass), the
markdown report and kernels_wide_speed_ratios.png; the CSV is rewritten after every case,
so a run stopped by its time limit keeps the cases it finished. ``--from-csv`` redraws.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..kernels import dispatch
from .common import (
    BWD_FLOP_FACTOR, MIN_TIMED_CALLS, AtenFlashVarlen, attn_flops, bench_call_count, device_description, free_memory,
    tflops, write_csv,
)
from .harness import (
    interruptible, publish, redraw,
    BASE_COLUMNS, GQA_NOTES, add_device_options, cell, classify_failure, cpu_threads, environ, first_working,
    fmt_ratio, fmt_tflops, gqa_modes, index_rows, make_timer, measure_passes, not_measured, ordered, rel_err,
    resolve_device, rows_device_timer, sdpa_call, speed_ratio, sync, table,
)
from .progress import progress_bar, show, write

NAME = "kernels_wide"
COLUMNS = BASE_COLUMNS + ["tflops", "rel_err", "family", "headdim", "causal", "seqlen", "batch", "nheads",
                          "nheads_k", "tokens"]
#: Backward-only variants of ours: the same calls under an environment setting, for the
#: A/B of backward choices that wait for a GPU measurement. impl -> (environment, label).
BWD_VARIANTS = {
    "ours_atomic": ({"RINGFLASH_BACKWARD": "atomic"}, "atomic"),
    "ours_split": ({"RINGFLASH_DKV_SPLITS": "auto"}, "split dK/dV"),
}
IMPLS = ("ours", *BWD_VARIANTS, "fa2", "cudnn")
IMPL_DESCRIPTIONS = {
    "ours": "ringflash, default backward (deterministic: separate dK/dV and dQ kernels)",
    "ours_atomic": "ringflash under RINGFLASH_BACKWARD=atomic (5-GEMM backward, dQ by atomics); backward only",
    "ours_split": "ringflash under RINGFLASH_DKV_SPLITS=auto (several dK/dV programs per key block, each over "
                  "some of its query blocks, where the grid underfills the GPU); backward only",
    "fa2": "SDPA with SDPBackend.FLASH_ATTENTION (varlen: aten._flash_attention_forward/backward)",
    "cudnn": "SDPA with SDPBackend.CUDNN_ATTENTION (no varlen entry point)",
}

# --- the grid ------------------------------------------------------------------------------

HEADDIMS = [64, 80, 96, 128, 192, 256]
SEQLENS = [512, 1024, 2048, 4096, 16384, 65536]
TOKENS = 65536
HIDDEN = 2048
#: Sequence lengths from which a dense case runs only for LONG_HEADDIMS (time budget: one
#: 64k case of each other head dim costs ~15 s with every implementation).
LONG_SEQLEN = 65536
LONG_HEADDIMS = [64, 128]
GQA_HEADS = (32, 8, 128)
GQA_SEQLENS = [512, 1024, 2048, 4096, 16384]
VARLEN_TOKENS = 16384
LLAMA_LENGTHS = [8192, 4096, 2048, 1024, 512, 512]
PACKS = ["llama3", "64x256", "16x1024", "random"]
SEED3D = dict(batch=4, seqlen=8192, headdim=64)
#: (nheads, nheads_k, headdim) and sequence lengths of the one-sequence "underfill" family.
UNDERFILL_HEADS = (16, 4, 128)
UNDERFILL_SEQLENS = [4096, 8192]
#: Every family, in the order reports list them.
FAMILIES = ("dense", "gqa", "varlen", "seed3d", "underfill")

QUICK_HEADDIMS = [64, 128]
QUICK_SEQLENS = [1024, 16384]
QUICK_GQA_SEQLENS = [4096]
QUICK_PACKS = ["llama3", "random"]

#: The CPU smoke grid (interpreted kernels, float32): the same families at toy sizes (a
#: random pack of three documents: the interpreter's time grows with the documents).
#: Head dim 24 is padded to 32 inside the kernels, as 80, 96 and 192 are on the GPU.
CPU = dict(tokens=64, hidden=48, headdims=[24], seqlens=[32], gqa=(4, 2, 16), gqa_seqlens=[32],
           varlen_tokens=64, packs=["random"], min_doc=8, seed3d=dict(batch=2, seqlen=32, headdim=16),
           underfill=(4, 2, 16), underfill_seqlens=[48])


@dataclass(frozen=True)
class Case:
    family: str  # "dense", "gqa", "varlen", "seed3d" or "underfill"
    headdim: int
    causal: bool
    seqlen: int  # per sequence (varlen: the longest document)
    batch: int  # sequences (varlen: documents)
    nheads: int
    nheads_k: int
    lengths: tuple = ()  # varlen document lengths
    pack: str = ""

    @property
    def tokens(self) -> int:
        return sum(self.lengths) if self.lengths else self.batch * self.seqlen

    @property
    def name(self) -> str:
        mask = "causal" if self.causal else "full"
        if self.family == "varlen":
            return (f"varlen {self.pack} {mask} {self.nheads}/{self.nheads_k} d={self.headdim} "
                    f"({len(self.lengths)} docs, {_size(self.tokens)})")
        if self.family == "seed3d":
            return f"seed3d {mask} b={self.batch} n={_size(self.seqlen)} d={self.headdim}"
        heads = f"{self.nheads}/{self.nheads_k}" if self.nheads != self.nheads_k else f"h={self.nheads}"
        prefix = {"gqa": "gqa ", "underfill": "underfill "}.get(self.family, "")
        return f"{prefix}d={self.headdim} {mask} s={_size(self.seqlen)} b={self.batch} {heads}"

    def fwd_flops(self) -> float:
        if self.lengths:
            return sum(attn_flops(1, self.nheads, n, n, self.headdim, self.causal) for n in self.lengths)
        return attn_flops(self.batch, self.nheads, self.seqlen, self.seqlen, self.headdim, self.causal)


def _size(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def pack_lengths(pack: str, tokens: int, seed: int = 0, min_len: int = 1) -> list[int]:
    """Document lengths of a varlen pack of ``tokens`` tokens: "llama3" (the default grid's
    8192+4096+2048+1024+512+512, scaled to ``tokens``), "NxL" (N documents of L tokens), or
    "random": log-uniform lengths between max(tokens/128, min_len) and tokens/2 drawn from a
    seeded generator, the last one cut to fill the pack exactly (and merged into the one
    before when that would leave it shorter than ``min_len``)."""
    if pack == "llama3":
        scale = tokens / sum(LLAMA_LENGTHS)
        lengths = [max(1, int(n * scale)) for n in LLAMA_LENGTHS]
        lengths[0] += tokens - sum(lengths)
        return lengths
    if pack == "random":
        rng = random.Random(seed)
        lo = max(1, min_len, tokens // 128)
        hi = max(lo + 1, tokens // 2)
        lengths: list[int] = []
        while sum(lengths) < tokens:
            n = int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
            lengths.append(min(n, tokens - sum(lengths)))
        if len(lengths) > 1 and lengths[-1] < min_len:
            tail = lengths.pop()
            lengths[-1] += tail
        return lengths
    count, length = (int(x) for x in pack.split("x"))
    return [length] * count


def build_grid(device: str, quick: bool, long_headdims: Sequence[int] = LONG_HEADDIMS,
               headdims: Optional[Sequence[int]] = None, seqlens: Optional[Sequence[int]] = None,
               families: Sequence[str] = FAMILIES) -> list[Case]:
    """The cases in the order they run (``RUN_FAMILIES``; d=128 and 64 first within a family)."""
    if device == "cpu":
        tokens, hidden = CPU["tokens"], CPU["hidden"]
        hds, sls = CPU["headdims"], CPU["seqlens"]
        (gh, ghk, gd), gsl = CPU["gqa"], CPU["gqa_seqlens"]
        vtokens, packs, s3 = CPU["varlen_tokens"], CPU["packs"], CPU["seed3d"]
        (uh, uhk, ud), usl = CPU["underfill"], CPU["underfill_seqlens"]
        causals, gqa_causals, vcausals = [False, True], [True], [True]
    else:
        tokens, hidden = TOKENS, HIDDEN
        hds, sls = (QUICK_HEADDIMS, QUICK_SEQLENS) if quick else (HEADDIMS, SEQLENS)
        (gh, ghk, gd), gsl = GQA_HEADS, (QUICK_GQA_SEQLENS if quick else GQA_SEQLENS)
        vtokens, packs, s3 = VARLEN_TOKENS, (QUICK_PACKS if quick else PACKS), SEED3D
        (uh, uhk, ud), usl = UNDERFILL_HEADS, UNDERFILL_SEQLENS[:1] if quick else UNDERFILL_SEQLENS
        causals = gqa_causals = vcausals = [False, True]
    hds, sls = list(headdims or hds), list(seqlens or sls)
    cases: list[Case] = []
    if "dense" in families:
        for d in hds:
            for causal in causals:
                for s in sls:
                    if s >= LONG_SEQLEN and d not in long_headdims:
                        continue
                    cases.append(Case("dense", d, causal, s, max(1, tokens // s), max(1, hidden // d),
                                      max(1, hidden // d)))
    if "gqa" in families:
        for causal in gqa_causals:
            for s in gsl:
                cases.append(Case("gqa", gd, causal, s, max(1, tokens // s), gh, ghk))
    if "varlen" in families:
        for pack in packs:
            lengths = pack_lengths(pack, vtokens, min_len=CPU["min_doc"] if device == "cpu" else 1)
            for causal in vcausals:
                cases.append(Case("varlen", gd, causal, max(lengths), len(lengths), gh, ghk, tuple(lengths), pack))
    if "seed3d" in families:
        cases.append(Case("seed3d", s3["headdim"], True, s3["seqlen"], s3["batch"], 1, 1))
    if "underfill" in families:
        for causal in gqa_causals:
            for s in usl:
                cases.append(Case("underfill", ud, causal, s, 1, uh, uhk))
    # Run order: should a time limit stop the run, the small families and d=128, the head dim
    # of issue 15's bars, are already measured (reports list the cases in grid order).
    first = (128, 64)
    return sorted(cases, key=lambda c: (RUN_FAMILIES.index(c.family),
                                        first.index(c.headdim) if c.headdim in first else len(first)))


#: The order families run in, and the order reports list them in.
RUN_FAMILIES = ("seed3d", "underfill", "varlen", "gqa", "dense")
REPORT_FAMILIES = FAMILIES


# --- time estimate -----------------------------------------------------------------------

#: Assumed rates for the estimate (TFLOP/s as counted: forward, backward) and per-case costs.
EST_FWD_TFLOPS, EST_BWD_TFLOPS = 400.0, 300.0
#: ``run_case`` times a case a second time when our forward+backward took less (ms).
SECOND_ROUND_MS = 3.0


def _small(ours_cells: dict) -> bool:
    times = [ours_cells.get(p, (None,))[0] for p in ("fwd", "bwd")]
    return all(t is not None for t in times) and sum(times) < SECOND_ROUND_MS


def _wants_round(round_index: int, min_rounds: int, device: str, ours_cells: dict) -> bool:
    """Whether ``run_case`` times round ``round_index`` (from 0) of a case: the first
    ``min_rounds`` (``--rounds``), and a second one on a GPU for a small case."""
    return round_index < min_rounds or (round_index == 1 and device == "cuda" and _small(ours_cells))


def _do_bench_s(ms: float, warmup: float = 25, rep: float = 100) -> float:
    """Wall seconds of one ``bench_ms`` (``bench_call_count`` calls), plus ~50 us of cache
    flush and host gap per call."""
    ms = max(ms, 0.02)
    return bench_call_count(ms, warmup, rep) * (ms + 0.05) / 1e3 + 0.02


def estimate_seconds(cases: Sequence[Case], workers: int = 12, min_rounds: int = 1) -> tuple[float, list[float]]:
    """(total, per case) seconds on an H200, from FLOP counts at the rates above: every
    do_bench (in ``min_rounds`` rounds, ``--rounds``; two for a small case), the sanity
    calls, allocation, and the parallel precompile phase."""
    per_case = []
    for c in cases:
        width = 2 ** math.ceil(math.log2(c.headdim))  # the kernels pad d to a power of two
        f = c.fwd_flops() * width / c.headdim
        tf, tb = f / EST_FWD_TFLOPS / 1e9, BWD_FLOP_FACTOR * f / EST_BWD_TFLOPS / 1e9
        baselines = 1 if c.family == "varlen" else 2
        rounds = max(min_rounds, 2 if tf + tb < SECOND_ROUND_MS else 1)  # tf, tb: ms
        s = rounds * (1 + baselines) * (_do_bench_s(tf) + _do_bench_s(tb) + tf / 1e3)  # + the graph's forward
        s += rounds * len(BWD_VARIANTS) * _do_bench_s(tb)
        s += (6 * tf + 6 * tb) / 1e3 + 0.3  # GQA-mode probes, sanity errors, allocation
        s += 0.5 if c.family != "varlen" else 0.0  # cuDNN builds its graphs for each new shape
        per_case.append(s)
    precompile = 25.0 + 4.0 * len(cases) / max(1, workers)
    return precompile + sum(per_case), per_case


# --- inputs and implementations --------------------------------------------------------


def make_inputs(case: Case, device: str, dtype: torch.dtype):
    """(q, k, v) requiring grad, dout, and for varlen (cu_seqlens, max_seqlen)."""
    gen = torch.Generator(device=device).manual_seed(0)

    def mk(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen)

    d = case.headdim
    if case.family == "varlen":
        total = case.tokens
        q, k, v = mk(total, case.nheads, d), mk(total, case.nheads_k, d), mk(total, case.nheads_k, d)
        dout = mk(total, case.nheads, d)
        cu = torch.tensor([0] + list(torch.tensor(case.lengths).cumsum(0).tolist()), dtype=torch.int32,
                          device=device)
        extra = (cu, max(case.lengths))
    elif case.family == "seed3d":
        q, k, v = (mk(case.batch, case.seqlen, d) for _ in range(3))
        dout, extra = mk(case.batch, case.seqlen, d), None
    else:
        q = mk(case.batch, case.seqlen, case.nheads, d)
        k, v = mk(case.batch, case.seqlen, case.nheads_k, d), mk(case.batch, case.seqlen, case.nheads_k, d)
        dout, extra = mk(case.batch, case.seqlen, case.nheads, d), None
    return (q.requires_grad_(), k.requires_grad_(), v.requires_grad_()), dout, extra


def ours_fn(case: Case, extra) -> Callable[..., torch.Tensor]:
    from ..autograd import FlashAttentionTritonFunc
    from ..interface import flash_attn_func, flash_attn_varlen_func

    if case.family == "varlen":
        cu, max_len = extra
        return lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=case.causal)
    if case.family == "seed3d":
        return lambda q, k, v: FlashAttentionTritonFunc.apply(q, k, v, case.causal)
    return lambda q, k, v: flash_attn_func(q, k, v, causal=case.causal)


def baseline_fns(case: Case, extra, backend: str, q: torch.Tensor, k: torch.Tensor
                 ) -> list[tuple[str, Callable[..., torch.Tensor]]]:
    """[(note, fn)] to try in order for an SDPA baseline ("FLASH_ATTENTION" or
    "CUDNN_ATTENTION"); empty when the baseline has no entry point for this case."""
    if case.family == "varlen":
        if backend != "FLASH_ATTENTION":
            return []
        cu, max_len = extra
        return [("aten._flash_attention_forward/backward (FA2 varlen)",
                 lambda q, k, v: AtenFlashVarlen.apply(q, k, v, cu, cu, max_len, max_len, case.causal))]
    if case.family == "seed3d":
        return [("SDPA on (batch, 1, n, d) views",
                 lambda q, k, v: sdpa_call(q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2), case.causal,
                                           backend).squeeze(2))]
    return [(GQA_NOTES[m] if case.nheads != case.nheads_k else "",
             (lambda mode: lambda q, k, v: sdpa_call(q, k, v, case.causal, backend, gqa=mode))(m))
            for m in gqa_modes(q, k)]


def backward_mode() -> str:
    from ..kernels import configs

    return os.environ.get("RINGFLASH_BACKWARD", configs.BACKWARD_DEFAULT)


# --- one case ------------------------------------------------------------------------------


def run_case(case: Case, device: str, dtype: torch.dtype, timer, timer_name: str, device_name: str,
             min_rounds: int = 1) -> list[dict]:
    """Every implementation and pass of one case, as CSV rows."""
    inputs, dout, extra = make_inputs(case, device, dtype)
    flops = case.fwd_flops()
    base = dict(family=case.family, headdim=case.headdim, causal=case.causal, seqlen=case.seqlen, batch=case.batch,
                nheads=case.nheads, nheads_k=case.nheads_k, tokens=case.tokens, timer=timer_name, device=device_name)
    rows: list[dict] = []

    def add(impl: str, results: dict, note: str = "", errs: Optional[dict] = None) -> None:
        for p, (ms, status) in results.items():
            pass_flops = flops if p == "fwd" else BWD_FLOP_FACTOR * flops
            rows.append(dict(base, case=case.name, impl=impl, **{"pass": p}, ms=ms, status=status, note=note,
                             tflops=tflops(pass_flops, ms) if ms else None, rel_err=(errs or {}).get(p)))

    def grads(fn) -> tuple:
        return torch.autograd.grad(fn(*inputs), inputs, dout)

    # Baselines first: pick each one's working GQA mode with a forward+backward probe.
    chosen: dict[str, tuple[Optional[Callable], str, Optional[str]]] = {}
    for impl, backend in (("fa2", "FLASH_ATTENTION"), ("cudnn", "CUDNN_ATTENTION")):
        candidates = baseline_fns(case, extra, backend, inputs[0], inputs[1])
        if not candidates:
            chosen[impl] = (None, "", "unsupported: no varlen entry point in SDPA's cuDNN backend")
            continue
        fns = dict(candidates)
        name, status = first_working([(note, (lambda f: lambda: grads(f))(fn)) for note, fn in candidates])
        chosen[impl] = (fns[name], name, None) if name is not None else (None, "", status)
        if status is not None and device == "cuda":
            free_memory()

    ours = ours_fn(case, extra)
    # Sanity: our output and gradients against FA2's (cuDNN's when FA2 did not run), and each
    # backward variant's gradients against the default one's.
    errs: dict[str, dict] = {"ours": {}, **{impl: {} for impl in BWD_VARIANTS}}
    ref_fn = chosen["fa2"][0] or chosen["cudnn"][0]
    families = []  # which kernel families ran ours (kernels.dispatch), for the note
    try:
        with torch.no_grad(), dispatch.recording_families() as fwd_log:
            out = ours(*inputs)
        families.append("fwd " + ("+".join(dict.fromkeys(f for _, f in fwd_log)) or "not via dispatch"))
        if ref_fn is not None:
            with torch.no_grad():
                errs["ours"]["fwd"] = rel_err(out, ref_fn(*inputs))
        del out
        with dispatch.recording_families() as log:
            g_ours = grads(ours)
        families.append("bwd " + ("+".join(dict.fromkeys(f for kind, f in log if kind == "bwd")) or "not via dispatch"))
        if ref_fn is not None:
            g_ref = grads(ref_fn)
            errs["ours"]["bwd"] = max(rel_err(a, b) for a, b in zip(g_ours, g_ref))
            del g_ref
        for impl, (env, _) in BWD_VARIANTS.items():
            with environ(**env):
                g_variant = grads(ours)
            errs[impl]["bwd"] = max(rel_err(a, b) for a, b in zip(g_variant, g_ours))
            del g_variant
        del g_ours
    except Exception as exc:  # the timing below records the failure per pass
        write(f"  {case.name}: sanity check failed ({classify_failure(exc)})")
    if device == "cuda":
        free_memory()

    # A small case (ours under SECOND_ROUND_MS forward+backward) is timed twice, the second
    # round in the reverse order, each cell keeping its faster round: in run 39 a small
    # case's first-timed implementation ran slow (the same Gluon kernels timed 1.16, 0.87
    # and 0.74 ms in a row as three "variants" of the 4k underfill case's backward); the
    # 8k one showed no such spread. ``--rounds`` times every case in that many rounds
    # (run 55: the split column, the same Gluon kernels as the default one at d=128, read
    # 0.92-1.02x it in cases of 3-190 ms).
    def measure(impl: str) -> dict:
        if impl == "ours":
            return measure_passes(ours, inputs, dout, timer, device)
        if impl in BWD_VARIANTS:
            with environ(**BWD_VARIANTS[impl][0]):
                return measure_passes(ours, inputs, dout, timer, device, passes=("bwd",))
        return measure_passes(chosen[impl][0], inputs, dout, timer, device)

    timed = ["ours", *BWD_VARIANTS] + [impl for impl in ("fa2", "cudnn") if chosen[impl][0] is not None]
    best: dict[str, dict] = {}
    for round_index in range(max(2, min_rounds)):
        if not _wants_round(round_index, min_rounds, device, best.get("ours", {})):
            break
        for impl in (timed if round_index % 2 == 0 else timed[::-1]):
            for p, (ms, status) in measure(impl).items():
                kept = best.setdefault(impl, {}).get(p)
                if kept is None or kept[0] is None or (ms is not None and ms < kept[0]):
                    best[impl][p] = (ms, status)
    add("ours", best["ours"], "; ".join([f"backward={backward_mode()}"] + families), errs["ours"])
    for impl, (_, label) in BWD_VARIANTS.items():
        add(impl, best[impl], f"backward: {label}", errs[impl])
    for impl in ("fa2", "cudnn"):
        fn, note, status = chosen[impl]
        if fn is None:
            add(impl, {"fwd": (None, status), "bwd": (None, status)})
        else:
            add(impl, best[impl], note)
    return rows


# --- precompile ----------------------------------------------------------------------------


def _precompile_worker(job) -> Optional[str]:
    """Run our forward, default backward and the backward variants of one case once, so
    that Triton compiles their kernels into its on-disk cache."""
    case, dtype_name = job
    try:
        inputs, dout, extra = make_inputs(case, "cuda", getattr(torch, dtype_name))
        fn = ours_fn(case, extra)
        out = fn(*inputs)
        torch.autograd.grad(out, inputs, dout, retain_graph=True)
        for env, _ in BWD_VARIANTS.values():
            with environ(**env):
                torch.autograd.grad(out, inputs, dout, retain_graph=True)
        torch.cuda.synchronize()
        return None
    except Exception as exc:  # the timed pass records it
        return f"{case.name}: {classify_failure(exc)}"


def precompile(cases: Sequence[Case], dtype: torch.dtype, workers: int) -> None:
    from concurrent.futures import ProcessPoolExecutor

    start = time.perf_counter()
    jobs = [(c, str(dtype).removeprefix("torch.")) for c in cases]
    ctx = torch.multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            failures = [f for f in pool.map(_precompile_worker, jobs) if f]
    except Exception as exc:  # a broken pool costs only time: the timed pass compiles what is missing
        write(f"precompile stopped ({classify_failure(exc)}); the timed pass compiles the rest")
        return
    write(f"precompiled {len(jobs)} cases in {workers} processes in {time.perf_counter() - start:.0f} s; "
          f"{len(failures)} failed" + "".join(f"\n  {f}" for f in failures[:5]))


# --- report --------------------------------------------------------------------------------


def _cases(rows: Sequence[dict]) -> list[str]:
    """Case names in grid order (``REPORT_FAMILIES``): dense, GQA and underfill cases by (head
    dim, causal, seqlen), varlen and seed3d in the order they ran."""
    first: dict[str, tuple] = {}
    for i, r in enumerate(rows):
        name = str(r["case"])
        if name in first:
            continue
        family = str(r.get("family") or "")
        rank = REPORT_FAMILIES.index(family) if family in REPORT_FAMILIES else len(REPORT_FAMILIES)
        if family in ("dense", "gqa", "underfill"):
            first[name] = (rank, r.get("headdim") or 0, bool(r.get("causal")), r.get("seqlen") or 0, i)
        else:
            first[name] = (rank, 0, False, 0, i)
    return sorted(first, key=first.__getitem__)


RATIO_COLUMNS = [  # (header, impl, baseline, pass)
    ("fwd vs FA2", "ours", "fa2", "fwd"),
    ("fwd vs cuDNN", "ours", "cudnn", "fwd"),
    ("bwd vs FA2", "ours", "fa2", "bwd"),
    ("bwd vs cuDNN", "ours", "cudnn", "bwd"),
    ("atomic bwd vs FA2", "ours_atomic", "fa2", "bwd"),
    ("atomic bwd vs cuDNN", "ours_atomic", "cudnn", "bwd"),
    ("atomic vs default bwd", "ours_atomic", "ours", "bwd"),
    ("split bwd vs FA2", "ours_split", "fa2", "bwd"),
    ("split vs default bwd", "ours_split", "ours", "bwd"),
]


def ratio_table(rows: Sequence[dict]) -> str:
    """The compact table: our TFLOP/s and speed ratios (baseline ms / our ms) per case."""
    index = index_rows(rows)
    out = []
    for c in _cases(rows):
        tf = [cell(index.get((c, "ours", p)), "tflops", fmt_tflops) for p in ("fwd", "bwd")]
        tf += [cell(index.get((c, impl, "bwd")), "tflops", fmt_tflops) for impl in BWD_VARIANTS]
        out.append([c] + tf + [fmt_ratio(speed_ratio(index, c, i, b, p)) for _, i, b, p in RATIO_COLUMNS])
    header = ["case", "ours fwd TF/s", "ours bwd TF/s"] + [f"{label} bwd TF/s" for _, label in BWD_VARIANTS.values()] \
        + [h for h, *_ in RATIO_COLUMNS]
    return table(header, out)


def _summary(rows: Sequence[dict]) -> list[str]:
    """Geometric means (and ranges) of each ratio column over the cases that have it."""
    index = index_rows(rows)
    lines = []
    for header, impl, base, p in RATIO_COLUMNS:
        vals = [v for c in _cases(rows) if (v := speed_ratio(index, c, impl, base, p)) is not None]
        if vals:
            geo = math.exp(sum(math.log(v) for v in vals) / len(vals))
            lines.append(f"- {header}: geometric mean {geo:.2f} over {len(vals)} cases (min {min(vals):.2f}, "
                         f"max {max(vals):.2f})")
    return lines


def markdown_report(rows: Sequence[dict], notes: Sequence[str] = ()) -> str:
    if not rows:
        return "# ringflash bench kernels --grid wide\n\nNo results.\n"
    devices, timers = rows_device_timer(rows)
    index = index_rows(rows)
    cases = _cases(rows)
    impls = ordered((str(r["impl"]) for r in rows), IMPLS)
    modes = ", ".join(ordered(str(r["note"]) for r in rows if r["impl"] == "ours" and r.get("note")))
    out = ["# ringflash bench kernels --grid wide", "",
           f"- Device: {devices}",
           f"- Timer: {timers}; milliseconds per call",
           "- FLOPs: forward 4*b*h*sq*sk*d (halved when causal; varlen summed per document), backward 2.5x; "
           "TF/s = those FLOPs over the measured time",
           "- Speed ratios: the baseline's time / ours in the same run (> 1: ours faster)",
           f"- Our backward in the `ours` rows: {modes or 'not recorded'}",
           "- Implementations: " + "; ".join(f"`{i}` = {IMPL_DESCRIPTIONS.get(i, i)}" for i in impls)]
    gqa_notes = ordered(f"{r['impl']}: {r['note']}" for r in rows
                        if r["impl"] in ("fa2", "cudnn") and r.get("family") == "gqa" and r.get("note"))
    if gqa_notes:
        out.append("- GQA baselines: " + "; ".join(gqa_notes))
    errs = [r["rel_err"] for r in rows if isinstance(r.get("rel_err"), (int, float))]
    if errs:
        worst = max(rows, key=lambda r: r.get("rel_err") if isinstance(r.get("rel_err"), (int, float)) else -1)
        out.append(f"- Sanity: largest relative error {max(errs):.2e} ({worst['impl']} {worst['pass']}, "
                   f"{worst['case']}; ours against FA2, or cuDNN where FA2 did not run; the backward variants against "
                   "the default backward)")
    out += [f"- {n}" for n in notes]
    for p in ("fwd", "bwd"):
        shown = [i for i in impls if (p == "bwd" or i not in BWD_VARIANTS)]
        ms = [[c] + [cell(index.get((c, i, p))) for i in shown] for c in cases]
        tf = [[c] + [cell(index.get((c, i, p)), "tflops", fmt_tflops) for i in shown] for c in cases]
        out += ["", f"## {p} (ms)", "", table(["case"] + shown, ms),
                "", f"## {p} (TFLOP/s)", "", table(["case"] + shown, tf)]
    missing = not_measured(rows)
    if missing:
        out += ["", "## Not measured", ""] + missing
    summary = _summary(rows)
    if summary:
        out += ["", "## Summary", ""] + summary
    out += ["", "## Speed ratios (baseline ms / our ms; > 1: ours faster)", "", ratio_table(rows)]
    return "\n".join(out) + "\n"


def plot_ratios(rows: Sequence[dict], prefix: str) -> str:
    from .plots import BarPanel, ratio_bars

    index = index_rows(rows)
    cases = _cases(rows)
    panels = []
    for title, impl, p in (("forward", "ours", "fwd"), ("backward (default)", "ours", "bwd"),
                           ("backward (atomic)", "ours_atomic", "bwd"), ("backward (split dK/dV)", "ours_split", "bwd")):
        series = {f"ours / {label}": [speed_ratio(index, c, impl, base, p) for c in cases]
                  for base, label in (("fa2", "FA2"), ("cudnn", "cuDNN"))}
        panels.append(BarPanel(title, cases, {k: v for k, v in series.items() if any(x is not None for x in v)}))
    devices, timers = rows_device_timer(rows)
    return ratio_bars(f"{prefix}_speed_ratios.png", panels,
                      "ringflash kernels, wide grid: speed relative to PyTorch's FA2 and cuDNN",
                      "speed ratio (baseline time / our time; > 1: ours faster)", note=f"{devices} | {timers}",
                      reference=1.0, reference_label="parity")


def is_wide_csv(path: str) -> bool:
    with open(path) as f:
        header = f.readline().strip().split(",")
    return "impl" in header and "pass" in header


# --- command -------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ringflash bench kernels --grid wide", description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", choices=["wide"], default="wide")
    add_device_options(parser, "a small subset (GPU: d 64/128, s 1k/16k, GQA at 4k, two varlen packs, seed3d)")
    parser.add_argument("--headdims", type=int, nargs="+", help="dense head dims (overrides the grid's)")
    parser.add_argument("--seqlens", type=int, nargs="+", help="dense sequence lengths (overrides the grid's)")
    parser.add_argument("--long-headdims", type=int, nargs="+", default=LONG_HEADDIMS,
                        help=f"head dims that also run seqlen >= {LONG_SEQLEN} (default: %(default)s)")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1),
                        help="processes compiling the Triton variants before the timed pass (GPU)")
    parser.add_argument("--no-precompile", action="store_true")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time every case in at least this many rounds, every other one in the reverse order, "
                             f"each cell its fastest (cases under {SECOND_ROUND_MS:g} ms take 2 on a GPU anyway; "
                             "run 55: one reading of a 4k-64k backward moved by up to 8%%)")
    parser.add_argument("--estimate", action="store_true",
                        help="print the cases and the estimated H200 time, then exit (needs no GPU)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds: got {args.rounds}; expected at least 1")

    if args.from_csv:
        return redraw(args, NAME, COLUMNS, markdown_report, plot_ratios)

    device = "cuda" if args.estimate and args.device == "auto" else resolve_device(args.device)
    cases = build_grid(device, args.quick, args.long_headdims, args.headdims, args.seqlens, args.families)
    total, per_case = estimate_seconds(cases, args.workers, args.rounds)
    if args.estimate:
        for c, s in zip(cases, per_case):
            print(f"{s:7.1f} s  {c.name}")
        print(f"{len(cases)} cases: about {total:.0f} s on an H200 (model: {EST_FWD_TFLOPS:.0f}/{EST_BWD_TFLOPS:.0f} "
              f"TFLOP/s fwd/bwd, do_bench 25 + 100 ms per measurement and at least {MIN_TIMED_CALLS} timed calls, "
              "precompile included)")
        return 0

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    timer, timer_name = make_timer(device)
    device_name = device_description(device)
    print(f"device: {device_name}", flush=True)
    print(f"{len(cases)} cases" + (f"; estimated {total:.0f} s on an H200" if device == "cuda" else ""), flush=True)
    notes = [f"Dense: {TOKENS if device == 'cuda' else CPU['tokens']} tokens per case, nheads = "
             f"{HIDDEN if device == 'cuda' else CPU['hidden']} // d; seqlen >= {LONG_SEQLEN} only for d in "
             f"{list(args.long_headdims)} (time budget)."]
    if args.rounds > 1:
        notes.append(f"Every case timed in {args.rounds} rounds, every other one in the reverse order, each cell its "
                     "fastest.")
    if device == "cpu":
        notes.append("CPU run: float32, Triton interpreted, wall-clock times of one thread; they check the "
                     "report path and say nothing about GPU speed.")
    rows: list[dict] = []
    start = time.perf_counter()
    with interruptible(notes) as run:
        if device == "cuda" and not args.no_precompile:
            precompile(cases, dtype, args.workers)
            start = time.perf_counter()
        with cpu_threads(device), progress_bar(len(cases), "kernels wide") as bar:
            for case in cases:
                show(bar, case.name)
                case_rows = run_case(case, device, dtype, timer, timer_name, device_name, args.rounds)
                rows += case_rows
                write("  " + _case_line(case_rows))
                if args.out:  # keep what is measured if the run is stopped
                    write_csv(os.path.join(args.out, f"{NAME}.csv"), COLUMNS, [[r.get(c) for c in COLUMNS]
                                                                              for r in rows])
                if device == "cuda":
                    torch.cuda.empty_cache()
                bar.update(1)
    sync(device)
    notes.append(f"Measured in {time.perf_counter() - start:.0f} s (precompile not included).")
    publish(args, NAME, COLUMNS, rows, markdown_report(rows, notes), plot_ratios)
    return 130 if run["interrupted"] else 0



def _case_line(case_rows: Sequence[dict]) -> str:
    index = index_rows(case_rows)
    c = case_rows[0]["case"]
    parts = []
    for i in IMPLS:
        vals = [cell(index.get((c, i, p))) for p in ("fwd", "bwd") if (c, i, p) in index]
        if vals:
            parts.append(f"{i} " + "/".join(vals))
    return f"{c}: " + ", ".join(parts) + " ms (fwd/bwd)"
