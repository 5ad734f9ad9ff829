"""``ringflash bench grouped``: the zigzag local step (rank 0's two chunks against the
gathered K/V) for world sizes 2, 4 and 8, on one GPU.

Llama-3-8B attention (32 query heads, 8 KV heads, d=128), bf16, causal, 8k tokens per
rank; one packed batch of mixed lengths and one single sequence. Compared, forward and
backward:

* ``grouped``: the library's grouped kernels (design b) on precomputed metadata, as the
  context-parallel strategy calls them, in their default launch order ("global": the heavier
  chunk's programs over all heads and sequences first); ``head`` and ``interleaved`` are
  the same kernels in the other orders of ``configs.GROUP_ORDERS``;
* ``2x ours``: two ``flash_attn_varlen_func`` calls (one per chunk, ``seqused_k`` prefixes);
* ``2x fa2``: two calls of PyTorch's FA2 varlen; FA2's backward takes no ``seqused_k``, so
  each chunk gets its key prefixes packed into their own buffer beforehand (not timed);
* ``design a`` (forward only): one program per query-block index holding both chunks.

K/V bytes are a model: each launch reads the K/V rows its programs need once from HBM
(within a launch the programs sharing a tile run together and hit L2).

``--out DIR`` writes grouped.csv, grouped.md and grouped_speedups.png (each variant's
speed-up over two calls of our varlen kernel, per world size and case); ``--from-csv``
redraws those from a saved CSV without a GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import replace
from typing import Optional, Sequence

import torch

from ..autograd import FlashAttnFunc
from ..grouped import zigzag_group_ranges
from ..interface import flash_attn_varlen_func
from ..kernels import configs
from ..kernels.problem import SeqMeta, make_problem
from .common import (
    BWD_FLOP_FACTOR, AtenFlashVarlen, bench_ms, device_description, format_table, read_csv_rows, tflops,
    time_fwd_bwd, varlen_flops, write_csv, write_text,
)
from .grouped_design_a import design_a_forward
from .progress import progress_bar, show, write

NHEADS, NHEADS_K, HEADDIM = 32, 8, 128
TOKENS_PER_RANK = 8192


def _lengths(world_size: int, case: str) -> list[int]:
    total = TOKENS_PER_RANK * world_size
    if case == "single":
        return [total]
    return [total // 2, total // 4, total // 8, total // 16, total // 16]


def _pairs(sq: int, sk: int) -> int:
    """Visible (query, key) pairs of bottom-right causal attention, sq <= sk."""
    return sq * (sk - sq) + sq * (sq + 1) // 2


#: Launch orders of the grouped kernels (``configs.GROUP_ORDERS``) and their variant names;
#: "grouped" is the library's default order.
ORDER_VARIANTS = {"global": "grouped", "head": "grouped_head", "interleaved": "grouped_il"}


def _order_override(q: torch.Tensor, prob, order: str) -> dict:
    return {kind: replace(configs.config_for(kind, q, prob), group_order=order) for kind in ("fwd", "dq")}


def run_case(world_size: int, case: str, rank: int = 0, dtype=torch.bfloat16, rounds: int = 1) -> dict:
    lengths = _lengths(world_size, case)
    chunks = [rank, 2 * world_size - 1 - rank]
    dev = "cuda"
    cu_k = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    max_k = max(lengths)
    cu_q, used, max_q = zigzag_group_ranges(cu_k, max_k, chunks, 2 * world_size)
    chunk_lens = [n // (2 * world_size) for n in lengths]
    local = sum(chunk_lens)
    gen = torch.Generator(device=dev).manual_seed(0)
    mk = lambda n, h: torch.randn(n, h, HEADDIM, device=dev, dtype=dtype, generator=gen)  # noqa: E731
    q = mk(2 * local, NHEADS).requires_grad_()
    k = mk(sum(lengths), NHEADS_K).requires_grad_()
    v = mk(sum(lengths), NHEADS_K).requires_grad_()
    dout = mk(2 * local, NHEADS)
    meta = SeqMeta(
        torch.stack([cu_q[0][:-1], cu_q[1][:-1] + local]), torch.stack([cu_q[0][1:], cu_q[1][1:] + local]),
        cu_k, torch.stack(used),
    )
    scale = HEADDIM ** -0.5

    def grouped(q, k, v):
        return FlashAttnFunc.apply(q, k, v, meta, max(max_q), max_k, scale, True, -1, 0, 0.0)[0]

    def two_ours(q, k, v):
        outs = [flash_attn_varlen_func(qg, k, v, cu_q[g], cu_k, max_q[g], max_k, causal=True, seqused_k=used[g])
                for g, qg in enumerate(q.split(local))]
        return torch.cat(outs)

    # FA2 baseline: each chunk's key prefixes packed into their own buffers, outside the timing.
    prefix = [[(c + 1) * n for n in chunk_lens] for c in chunks]
    starts = cu_k[:-1].tolist()
    idx = [torch.cat([torch.arange(s, s + p, device=dev) for s, p in zip(starts, pre)]) for pre in prefix]
    kv_fa2 = [(k.detach()[i].clone().requires_grad_(), v.detach()[i].clone().requires_grad_()) for i in idx]
    cu_k_fa2 = [torch.tensor([0] + torch.tensor(pre).cumsum(0).tolist(), dtype=torch.int32, device=dev) for pre in prefix]

    def two_fa2(q, *kv):
        outs = [AtenFlashVarlen.apply(qg, kv[2 * g], kv[2 * g + 1], cu_q[g], cu_k_fa2[g], max_q[g], max(prefix[g]), True)
                for g, qg in enumerate(q.split(local))]
        return torch.cat(outs)

    pairs = sum(_pairs(n, (c + 1) * n) for c in chunks for n in chunk_lens)
    flops = 4.0 * NHEADS * HEADDIM * pairs
    kv_row_bytes = NHEADS_K * HEADDIM * 2 * dtype.itemsize
    row = dict(world_size=world_size, case=case, local_tokens=2 * local, kv_tokens=sum(lengths),
               kv_mb_grouped=sum(max(p) for p in zip(*prefix)) * kv_row_bytes / 2**20,
               kv_mb_two_calls=sum(sum(p) for p in prefix) * kv_row_bytes / 2**20)
    with torch.no_grad():
        ref = two_ours(q, k, v)
        row["max_diff_vs_2x_ours"] = (grouped(q, k, v) - ref).abs().max().item()
        row["max_diff_design_a"] = (design_a_forward(q, k, v, meta, max(max_q), scale)[0] - ref).abs().max().item()
    prob = make_problem(q, k, meta, max(max_q), max_k, scale, True, -1, 0, 0.0)
    variants = [(name, grouped, (q, k, v), _order_override(q, prob, order)) for order, name in ORDER_VARIANTS.items()]
    variants += [("2x_ours", two_ours, (q, k, v), {}),
                 ("2x_fa2", two_fa2, (q, *[t for kv in kv_fa2 for t in kv]), {})]
    # Rounds alternate the variants, so that a drift of the GPU's clocks hits them alike.
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name, *_ in variants}
    for _ in range(rounds):
        for name, fn, inputs, overrides in variants:
            with configs.override(**overrides):
                samples[name].append(time_fwd_bwd(fn, inputs, dout))
    for name, times in samples.items():
        fwd_ms, bwd_ms = (statistics.median(t[i] for t in times) for i in (0, 1))
        row[f"{name}_fwd_ms"], row[f"{name}_bwd_ms"] = fwd_ms, bwd_ms
        row[f"{name}_fwd_tflops"], row[f"{name}_bwd_tflops"] = tflops(flops, fwd_ms), tflops(BWD_FLOP_FACTOR * flops, bwd_ms)
    for bm, bn, w, s in ((64, 64, 4, 2), (128, 64, 8, 2), (64, 64, 4, 3)):
        ms = bench_ms(lambda: design_a_forward(q, k, v, meta, max(max_q), scale, bm, bn, w, s))
        if row.get("design_a_fwd_ms") is None or ms < row["design_a_fwd_ms"]:
            row["design_a_fwd_ms"], row["design_a_cfg"] = ms, f"{bm}x{bn} w{w} s{s}"
    # The dense (non-grouped) kernel's rate on the gathered sequences, causal: the yardstick
    # for "grouped runs at the dense kernel's TFLOP/s".
    dense_fwd, dense_bwd = time_fwd_bwd(
        lambda q_, k_, v_: flash_attn_varlen_func(q_, k_, v_, cu_k, cu_k, max_k, max_k, causal=True),
        (mk(sum(lengths), NHEADS).requires_grad_(), k, v), mk(sum(lengths), NHEADS))
    dense_flops = varlen_flops(lengths, NHEADS, HEADDIM, True)
    row["dense_fwd_tflops"], row["dense_bwd_tflops"] = tflops(dense_flops, dense_fwd), tflops(BWD_FLOP_FACTOR * dense_flops, dense_bwd)
    return row


def _r(a: Optional[float], b: Optional[float]) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def summarize(rows: list[dict]) -> str:
    names = list(ORDER_VARIANTS.values())
    orders = " / ".join(ORDER_VARIANTS)
    header = ["W", "case", f"fwd ms {orders} / 2x ours / 2x fa2 / design a", f"fwd speedup vs 2x ours ({orders})",
              f"bwd ms {orders} / 2x ours / 2x fa2", f"bwd speedup vs 2x ours ({orders})",
              "TFLOP/s grouped fwd/bwd (dense kernel)", "K/V MB grouped / 2 calls"]
    table = []
    for r in rows:
        ms = {d: " / ".join(f"{r[f'{n}_{d}_ms']:.3f}" for n in names + ["2x_ours", "2x_fa2"]) for d in ("fwd", "bwd")}
        speedup = {d: " / ".join(_r(r[f"2x_ours_{d}_ms"], r[f"{n}_{d}_ms"]) for n in names) for d in ("fwd", "bwd")}
        table.append([
            r["world_size"], r["case"], f"{ms['fwd']} / {r['design_a_fwd_ms']:.3f}", speedup["fwd"],
            ms["bwd"], speedup["bwd"],
            f"{r['grouped_fwd_tflops']:.0f}/{r['grouped_bwd_tflops']:.0f} ({r['dense_fwd_tflops']:.0f}/{r['dense_bwd_tflops']:.0f})",
            f"{r['kv_mb_grouped']:.0f} / {r['kv_mb_two_calls']:.0f}",
        ])
    lines = []
    for order, variant in ORDER_VARIANTS.items():
        fwd = [r["2x_ours_fwd_ms"] / r[f"{variant}_fwd_ms"] for r in rows]
        bwd = [r["2x_ours_bwd_ms"] / r[f"{variant}_bwd_ms"] for r in rows]
        lines.append(f"{variant} ({order} order) vs 2x ours: "
                     f"forward mean {sum(fwd) / len(fwd):.3f} (min {min(fwd):.3f}), "
                     f"backward mean {sum(bwd) / len(bwd):.3f} (min {min(bwd):.3f})")
    # A blank line after the table, so that markdown does not read the summary as table rows.
    return format_table(header, table) + "\n\n" + "\n".join(lines)


def speedups(rows: Sequence[dict], phase: str) -> dict[str, list[Optional[float]]]:
    """{variant: [speed-up over "2x ours" per row]} in ``phase`` ("fwd" or "bwd"): the time of
    two varlen calls over the variant's time, so above 1 means the variant is faster."""
    names = [(f"grouped, {order} order", variant) for order, variant in ORDER_VARIANTS.items()]
    names += [("2x fa2", "2x_fa2")] + ([("design a", "design_a")] if phase == "fwd" else [])
    out = {}
    for label, key in names:
        vals = []
        for r in rows:
            base, ms = r.get(f"2x_ours_{phase}_ms"), r.get(f"{key}_{phase}_ms")
            vals.append(base / ms if base and ms else None)
        if any(v is not None for v in vals):
            out[label] = vals
    return out


def plot_speedups(rows: Sequence[dict], path: str, note: str = "") -> str:
    """Bar chart of each variant's speed-up over two calls of our varlen kernel, per
    (world size, case): forward and backward panels."""
    from .plots import BarPanel, ratio_bars

    cases = [f"W={r['world_size']} {r['case']}" for r in rows]
    panels = [BarPanel(name, cases, speedups(rows, phase)) for phase, name in (("fwd", "forward"), ("bwd", "backward"))]
    return ratio_bars(path, panels, "Zigzag local step (rank 0): speed-up over two varlen calls ('2x ours')",
                      "speed-up (2x ours time / variant time; > 1: faster)", note=note, reference=1.0,
                      reference_label="2x ours")


def write_outputs(rows: Sequence[dict], out_dir: str, device: str) -> list[str]:
    """grouped.csv, grouped.md and (with matplotlib) grouped_speedups.png in ``out_dir``."""
    from .plots import have_matplotlib

    keys = sorted({k for r in rows for k in r})
    paths = [os.path.join(out_dir, "grouped.csv"), os.path.join(out_dir, "grouped.md")]
    write_csv(paths[0], keys, [[r.get(k) for k in keys] for r in rows])
    write_text(paths[1], f"# ringflash bench grouped\n\n- Device: {device}\n- Times: do_bench medians over "
                         f"alternating rounds\n\n" + summarize(rows))
    if have_matplotlib():
        paths.append(plot_speedups(rows, os.path.join(out_dir, "grouped_speedups.png"), device))
    else:
        write("matplotlib is not installed (pip install 'ringflash[bench]'): no plots")
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ringflash bench grouped")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--cases", nargs="+", default=["mixed", "single"], choices=["mixed", "single"])
    parser.add_argument("--csv", default="bench_out/grouped.csv")
    parser.add_argument("--rounds", type=int, default=3,
                        help="times each variant is timed, alternating with the others (the median is reported)")
    parser.add_argument("--out", metavar="DIR",
                        help="also write grouped.csv, grouped.md and grouped_speedups.png into DIR")
    parser.add_argument("--from-csv", metavar="CSV",
                        help="measure nothing: print the table of a saved grouped CSV (and with --out, "
                             "write its report and plot); needs no GPU")
    args = parser.parse_args(argv)
    if args.from_csv:
        rows = read_csv_rows([args.from_csv])
        devices = sorted({str(r["device"]) for r in rows if r.get("device")})
        device = ", ".join(devices) or f"device not recorded in {os.path.basename(args.from_csv)}"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("ringflash bench grouped needs a CUDA GPU")
        device = device_description()
        print(f"device: {device}", flush=True)
        rows = []
        with progress_bar(len(args.world_sizes) * len(args.cases), "grouped") as bar:
            for w in args.world_sizes:
                for case in args.cases:
                    show(bar, f"W={w} {case}")
                    rows.append(run_case(w, case, rounds=args.rounds))
                    r = rows[-1]
                    r["device"] = device
                    write(f"  W={w} {case}: grouped {r['grouped_fwd_ms']:.3f}/{r['grouped_bwd_ms']:.3f} ms, "
                          f"2x ours {r['2x_ours_fwd_ms']:.3f}/{r['2x_ours_bwd_ms']:.3f}, design a fwd "
                          f"{r['design_a_fwd_ms']:.3f} ({r['design_a_cfg']}), diffs "
                          f"{r['max_diff_vs_2x_ours']:.1e}/{r['max_diff_design_a']:.1e}")
                    bar.update(1)
        keys = sorted({k for r in rows for k in r})
        write_csv(args.csv, keys, [[r.get(k) for k in keys] for r in rows])
    if args.out:
        paths = write_outputs(rows, args.out, device)
        print("wrote " + ", ".join(paths))
    print()
    print(summarize(rows))
    return 0
