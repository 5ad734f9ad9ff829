"""``ringflash bench decode`` (issue 16): one query position against a KV cache, forward only.

Cases (GPU, bf16; ``--quick`` the first only): batch 8 x 8k cached keys and batch 64 x 2k,
32 query heads over 8 KV heads, d=128 (``--headdims`` runs each case at other head dims).
Implementations, all on the same tensors:

* ``kvcache``: ``flash_attn_with_kvcache`` on a contiguous cache (cache_seqlens an int32
  tensor, no new keys appended, causal);
* ``kvcache_paged``: the same keys in a paged cache (pages of 256 slots, a shuffled
  ``block_table``);
* ``func``: ``flash_attn_func`` with seqlen_q = 1 under ``RINGFLASH_DECODE=0`` (the training
  forward);
* ``func_decode``: the same call under ``RINGFLASH_DECODE=1``, which routes it to the decode
  kernels (``ringflash.kernels.dispatch``; dense calls' default since run 27);
* ``varlen_decode``: ``flash_attn_varlen_func`` on the same tokens packed (one query per
  sequence), under ``RINGFLASH_DECODE=1`` (the decode kernels' varlen route);
* ``varlen_paged``: ``flash_attn_varlen_func`` with ``block_table`` on the paged cache (the
  decode kernels with varlen queries, whatever RINGFLASH_DECODE says);
* ``fa2`` / ``cudnn``: SDPA restricted to the flash / cuDNN backend. GQA through
  ``enable_gqa=True`` when this torch and backend take it; otherwise K/V are repeated to 32
  heads once, outside the timed call (the note says which). ``is_causal=False``: SDPA's
  causal mask is top-left aligned, and one query row sees every key either way.

Two passes per implementation: ``call`` (do_bench of the Python call: what an eager decode
loop pays, host overhead included) and ``graph`` (``triton.testing.do_bench_cudagraph``:
the calls replayed from a CUDA graph, so the kernels' own time). GB/s counts the K and V
bytes read once. Each output is checked against FA2's (a guard, not a test). On a GPU
every implementation is timed in each of ``ROUNDS`` rounds and a cell is the median over
them, so that a drift of the host's speed reaches every implementation alike.

``--out DIR`` writes decode.csv, decode.md and decode_speed_ratios.png; ``--from-csv``
redraws them.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .common import device_description
from .harness import (
    interruptible, publish, redraw,
    BASE_COLUMNS, GQA_NOTES, add_device_options, cell, classify_failure, cpu_threads, environ, fmt_ratio, gqa_modes,
    index_rows, make_timer, not_measured, ordered, rel_err, repeat_kv, resolve_device, rows_device_timer,
    run_timed, sdpa_call, speed_ratio, table,
)
from .progress import progress_bar, show

NAME = "decode"
COLUMNS = BASE_COLUMNS + ["gbps", "rel_err", "batch", "seqlen_k", "nheads", "nheads_k", "headdim", "page_size"]
IMPLS = ("kvcache", "kvcache_paged", "func", "func_decode", "varlen_decode", "varlen_paged", "fa2", "cudnn")
OURS = ("kvcache", "kvcache_paged", "func", "func_decode", "varlen_decode", "varlen_paged")
#: Implementations timed under RINGFLASH_DECODE=1, and the one forced onto the training forward.
DECODE_ROUTED = ("func_decode", "varlen_decode")
TRAINING_FORWARD = ("func",)
PASSES = ("call", "graph")
IMPL_DESCRIPTIONS = {
    "kvcache": "flash_attn_with_kvcache, contiguous cache",
    "kvcache_paged": "flash_attn_with_kvcache, paged cache (block_table)",
    "func": "flash_attn_func, seqlen_q=1, RINGFLASH_DECODE=0 (training forward kernels)",
    "func_decode": "flash_attn_func, seqlen_q=1, RINGFLASH_DECODE=1 (decode kernels)",
    "varlen_decode": "flash_attn_varlen_func, one query per sequence, RINGFLASH_DECODE=1 (decode kernels)",
    "varlen_paged": "flash_attn_varlen_func, one query per sequence, block_table (paged cache)",
    "fa2": "SDPA, SDPBackend.FLASH_ATTENTION",
    "cudnn": "SDPA, SDPBackend.CUDNN_ATTENTION",
}


@dataclass(frozen=True)
class Case:
    batch: int
    seqlen_k: int
    nheads: int
    nheads_k: int
    headdim: int
    page_size: int

    @property
    def name(self) -> str:
        sk = f"{self.seqlen_k // 1024}k" if self.seqlen_k % 1024 == 0 else str(self.seqlen_k)
        return f"b={self.batch} sk={sk} {self.nheads}/{self.nheads_k} d={self.headdim}"

    def kv_bytes(self, elem: int) -> int:
        return 2 * self.batch * self.seqlen_k * self.nheads_k * self.headdim * elem


GPU_CASES = [Case(8, 8192, 32, 8, 128, 256), Case(64, 2048, 32, 8, 128, 256)]
#: CPU smoke: >= 256 keys so that RINGFLASH_DECODE=1 really takes the decode kernels
#: (dispatch.DECODE_MIN_KEYS); pages of 64 slots.
CPU_CASES = [Case(2, 256, 4, 2, 16, 64)]


def make_inputs(case: Case, device: str, dtype: torch.dtype) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    mk = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=gen)  # noqa: E731
    b, sk, hk, d, page = case.batch, case.seqlen_k, case.nheads_k, case.headdim, case.page_size
    q = mk(b, 1, case.nheads, d)
    k, v = mk(b, sk, hk, d), mk(b, sk, hk, d)
    pages = sk // page
    perm = torch.randperm(b * pages, generator=torch.Generator().manual_seed(1)).to(device)
    block_table = perm.view(b, pages).to(torch.int32)
    k_paged = torch.empty(b * pages, page, hk, d, device=device, dtype=dtype)
    v_paged = torch.empty_like(k_paged)
    k_paged[perm] = k.view(b * pages, page, hk, d)  # page j of sequence i -> block block_table[i, j]
    v_paged[perm] = v.view(b * pages, page, hk, d)
    lengths = torch.full((b,), sk, dtype=torch.int32, device=device)
    return dict(q=q, k=k, v=v, k_paged=k_paged, v_paged=v_paged, block_table=block_table, lengths=lengths)


def implementations(case: Case, t: dict) -> dict[str, tuple[Optional[Callable], str, Optional[str]]]:
    """{impl: (fn, note, failure status)}; a baseline whose every GQA mode fails gets its status."""
    from ..interface import flash_attn_func, flash_attn_varlen_func
    from ..kernels.dispatch import DECODE_MAX_ROWS, DECODE_MIN_KEYS
    from ..kvcache import flash_attn_with_kvcache

    q, k, v = t["q"], t["k"], t["v"]
    b, sk = case.batch, case.seqlen_k
    # The same tokens packed: views, no copy; cu_seqlens built once, outside the timed call.
    cu_q = torch.arange(b + 1, dtype=torch.int32, device=q.device)
    cu_k = cu_q * sk
    q_packed, k_packed, v_packed = q.view(b, case.nheads, -1), k.view(b * sk, case.nheads_k, -1), \
        v.view(b * sk, case.nheads_k, -1)
    rows = case.nheads // case.nheads_k
    takes_decode = rows <= DECODE_MAX_ROWS and case.seqlen_k >= DECODE_MIN_KEYS
    impls: dict[str, tuple[Optional[Callable], str, Optional[str]]] = {
        "kvcache": (lambda: flash_attn_with_kvcache(q, k, v, cache_seqlens=t["lengths"], causal=True), "", None),
        "kvcache_paged": (lambda: flash_attn_with_kvcache(q, t["k_paged"], t["v_paged"], cache_seqlens=t["lengths"],
                                                          block_table=t["block_table"], causal=True),
                          f"page size {case.page_size}", None),
        "func": (lambda: flash_attn_func(q, k, v, causal=True), "RINGFLASH_DECODE=0: training forward", None),
        "func_decode": (lambda: flash_attn_func(q, k, v, causal=True),
                        "RINGFLASH_DECODE=1: " + ("decode kernels" if takes_decode else
                                                  "still the training forward (outside the dispatch thresholds)"),
                        None),
        "varlen_decode": (lambda: flash_attn_varlen_func(q_packed, k_packed, v_packed, cu_q, cu_k, 1, sk,
                                                         causal=True).unsqueeze(1),
                          "RINGFLASH_DECODE=1: " + ("decode kernels" if takes_decode else "the training forward"),
                          None),
        "varlen_paged": (lambda: flash_attn_varlen_func(q_packed, t["k_paged"], t["v_paged"], cu_q, cu_k, 1, sk,
                                                        causal=True, block_table=t["block_table"]).unsqueeze(1),
                         f"block_table, page size {case.page_size}", None),
    }
    for impl, backend in (("fa2", "FLASH_ATTENTION"), ("cudnn", "CUDNN_ATTENTION")):
        chosen, status = None, "unsupported: no GQA mode ran"
        for mode in gqa_modes(q, k):
            kk, vv = (k, v) if mode == "native" else (repeat_kv(q, k), repeat_kv(q, v))
            fn = (lambda kk, vv, be: lambda: sdpa_call(q, kk, vv, False, be, gqa="native"))(kk, vv, backend)
            try:
                fn()
                note = GQA_NOTES["native"] if mode == "native" else \
                    "GQA via K/V heads repeated once outside the timed call (enable_gqa refused or absent)"
                chosen = (fn, note if case.nheads != case.nheads_k else "", None)
                break
            except Exception as exc:
                status = classify_failure(exc)
        impls[impl] = chosen or (None, "", status)
    return impls


def _graph_ms(fn: Callable[[], object]) -> float:
    import triton.testing

    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))
    except TypeError:  # an older triton without return_mode
        return float(triton.testing.do_bench_cudagraph(fn, rep=100))


#: Rounds of timing on a GPU: every implementation once per round, each cell the median
#: over rounds. A Python decode call costs about its kernel's time in host work at batch 8,
#: so the host's speed of the moment moves the ``call`` pass (runs 33-36: our b=8 calls
#: measured 0.27-1.02x FA2 between calls); rounds put every implementation through the
#: same moments.
ROUNDS = 3


def run_case(case: Case, device: str, dtype: torch.dtype, timer, timer_name: str, device_name: str,
             rounds: int = 1) -> list[dict]:
    t = make_inputs(case, device, dtype)
    base = dict(batch=case.batch, seqlen_k=case.seqlen_k, nheads=case.nheads, nheads_k=case.nheads_k,
                headdim=case.headdim, page_size=case.page_size, timer=timer_name, device=device_name)
    nbytes = case.kv_bytes(t["k"].element_size())
    times: dict[tuple[str, str], list[tuple[Optional[float], str]]] = {}
    errors: dict[str, Optional[float]] = {}
    with torch.no_grad():
        impls = implementations(case, t)
        ref_fn = impls["fa2"][0] or impls["cudnn"][0]
        try:
            ref = ref_fn() if ref_fn is not None else None
        except Exception:  # the baseline's own rows record it
            ref = None
        if device == "cuda" and ref is not None:
            # An untimed round first: the case's first timed cell otherwise pays the GPU's
            # clock ramp (run 35: that cell took 2.1x the same call timed later).
            run_timed(timer, ref_fn, device)
        for round_ in range(rounds):
            for impl in IMPLS:
                fn, note, status = impls[impl]
                env = {"RINGFLASH_DECODE": "1" if impl in DECODE_ROUTED else "0" if impl in TRAINING_FORWARD else None}
                with environ(**env):
                    if round_ == 0:
                        errors[impl] = None
                        if fn is not None and ref is not None:
                            try:
                                errors[impl] = rel_err(fn(), ref)
                            except Exception:  # the timed call below records the failure
                                pass
                    for p in PASSES:
                        if fn is None:
                            cell = (None, status)
                        elif p == "graph" and device != "cuda":
                            cell = (None, "skipped: CUDA graphs need a GPU")
                        else:
                            cell = run_timed(_graph_ms if p == "graph" else timer, fn, device)
                        times.setdefault((impl, p), []).append(cell)
    rows = []
    for impl in IMPLS:
        note = impls[impl][1]
        for p in PASSES:
            cells = times[(impl, p)]
            failed = [st for ms, st in cells if ms is None]
            ms = None if failed else statistics.median(ms for ms, _ in cells)
            rows.append(dict(base, case=case.name, impl=impl, **{"pass": p}, ms=ms, status=failed[0] if failed else "ok",
                             note=note, gbps=nbytes / (ms * 1e6) if ms else None, rel_err=errors[impl]))
    return rows


# --- report --------------------------------------------------------------------------------

RATIO_BASES = (("fa2", "vs FA2"), ("cudnn", "vs cuDNN"))


def ratio_table(rows: Sequence[dict]) -> str:
    index = index_rows(rows)
    cases = ordered(str(r["case"]) for r in rows)
    out = []
    for c in cases:
        for impl in OURS:
            if not any((c, impl, p) in index for p in PASSES):
                continue
            vals = []
            for p in PASSES:
                vals += [fmt_ratio(speed_ratio(index, c, impl, b, p)) for b, _ in RATIO_BASES]
            extra = {"kvcache_paged": ("kvcache", "paged vs contiguous"),
                     "func_decode": ("func", "decode vs training fwd"),
                     "varlen_decode": ("func_decode", "varlen vs dense decode"),
                     "varlen_paged": ("varlen_decode", "paged vs contiguous varlen")}.get(impl)
            vs_own = "; ".join(f"{p} {fmt_ratio(speed_ratio(index, c, impl, extra[0], p))}" for p in PASSES) \
                if extra else "-"
            out.append([c, impl] + vals + [f"{extra[1]}: {vs_own}" if extra else "-"])
    header = ["case", "ours"] + [f"{p} {label}" for p in PASSES for _, label in RATIO_BASES] + ["against our own"]
    return table(header, out)


def markdown_report(rows: Sequence[dict], notes: Sequence[str] = ()) -> str:
    if not rows:
        return "# ringflash bench decode\n\nNo results.\n"
    devices, timers = rows_device_timer(rows)
    index = index_rows(rows)
    cases = ordered(str(r["case"]) for r in rows)
    impls = ordered((str(r["impl"]) for r in rows), IMPLS)
    gqa = ordered(f"{r['impl']}: {r['note']}" for r in rows if r["impl"] in ("fa2", "cudnn") and r.get("note"))
    errs = [r["rel_err"] for r in rows if isinstance(r.get("rel_err"), (int, float))]
    out = ["# ringflash bench decode", "",
           f"- Device: {devices}",
           f"- Timers: `call` = {timers} of the Python call (host overhead included); `graph` = "
           "triton.testing.do_bench_cudagraph median (CUDA-graph replay: kernel time)",
           "- One query position per sequence, causal (bottom-right; SDPA runs is_causal=False, the same for one "
           "row), no new keys appended; GB/s = K and V bytes / time",
           "- Speed ratios: the baseline's time / ours in the same run and pass (> 1: ours faster)",
           "- Implementations: " + "; ".join(f"`{i}` = {IMPL_DESCRIPTIONS.get(i, i)}" for i in impls)]
    if gqa:
        out.append("- GQA in the SDPA baselines: " + "; ".join(gqa))
    decode_notes = ordered(str(r["note"]) for r in rows if r["impl"] == "func_decode" and r.get("note"))
    if decode_notes:
        out.append("- `func_decode`: " + "; ".join(decode_notes))
    if errs:
        out.append(f"- Sanity: largest relative error against FA2's output {max(errs):.2e}")
    out += [f"- {n}" for n in notes]
    for p in PASSES:
        ms = [[c] + [cell(index.get((c, i, p))) for i in impls] for c in cases]
        gb = [[c] + [cell(index.get((c, i, p)), "gbps", lambda x: f"{x:.0f}" if x >= 10 else f"{x:.3g}")
                     for i in impls] for c in cases]
        out += ["", f"## {p}: ms", "", table(["case"] + impls, ms), "", f"## {p}: GB/s (K+V read)", "",
                table(["case"] + impls, gb)]
    missing = not_measured(rows)
    if missing:
        out += ["", "## Not measured", ""] + missing
    out += ["", "## Speed ratios (baseline ms / our ms; > 1: ours faster)", "", ratio_table(rows)]
    return "\n".join(out) + "\n"


def plot_ratios(rows: Sequence[dict], prefix: str) -> str:
    from .plots import BarPanel, ratio_bars

    index = index_rows(rows)
    cases = ordered(str(r["case"]) for r in rows)
    cats = [(c, i) for c in cases for i in OURS if any((c, i, p) in index for p in PASSES)]
    panels = [BarPanel(f"{p} ({'Python call' if p == 'call' else 'CUDA graph replay'})", [f"{c} {i}" for c, i in cats],
                       {f"ours / {label[3:]}": [speed_ratio(index, c, i, b, p) for c, i in cats]
                        for b, label in RATIO_BASES}) for p in PASSES]
    devices, timers = rows_device_timer(rows)
    return ratio_bars(f"{prefix}_speed_ratios.png", panels, "ringflash decode: speed relative to SDPA FA2 and cuDNN",
                      "speed ratio (baseline time / our time; > 1: ours faster)", note=f"{devices} | {timers}",
                      reference=1.0, reference_label="parity")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ringflash bench decode", description=__doc__.split("\n\n")[0])
    add_device_options(parser, "GPU: only the batch 8 x 8k case")
    parser.add_argument("--headdims", type=int, nargs="+", metavar="D",
                        help="run every case at each of these head dims instead of its own (GPU: 128), e.g. "
                             "--headdims 64 72 to compare a head dim that is not a multiple of 16")
    args = parser.parse_args(argv)
    if args.from_csv:
        return redraw(args, NAME, COLUMNS, markdown_report, plot_ratios)
    device = resolve_device(args.device)
    cases = CPU_CASES if device == "cpu" else (GPU_CASES[:1] if args.quick else GPU_CASES)
    if args.headdims:
        bad = [d for d in args.headdims if not 1 <= d <= 256]
        if bad:
            parser.error(f"--headdims: got {bad}; expected head dims from 1 to 256")
        cases = [dataclasses.replace(case, headdim=d) for case in cases for d in args.headdims]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    timer, timer_name = make_timer(device)
    device_name = device_description(device)
    print(f"device: {device_name}", flush=True)
    notes = ["CPU run: float32, Triton interpreted, wall-clock times; they check the report path and say nothing "
             "about GPU speed."] if device == "cpu" else []
    rows: list[dict] = []
    with interruptible(notes) as run, cpu_threads(device), progress_bar(len(cases), "decode") as bar:
        for case in cases:
            show(bar, case.name)
            rows += run_case(case, device, dtype, timer, timer_name, device_name,
                             rounds=ROUNDS if device == "cuda" else 1)
            bar.update(1)
    publish(args, NAME, COLUMNS, rows, markdown_report(rows, notes), plot_ratios)
    return 130 if run["interrupted"] else 0

