"""Hardware counters (Nsight Compute) of issue 15's short cells, ours beside the baseline's
kernels on the same problem: where each kernel's time goes, not only how long it takes.

Cases (bf16):

* ``varlen-fwd``: 64 documents of 256 tokens, 32 query heads over 8 KV heads, d=128, not
  causal; the forward (``flash_attn_varlen_func``) against FA2 varlen
  (``aten._flash_attention_forward``): the cell at 0.90x FA2. ``ours_kvtma``: the same
  with ``RINGFLASH_FWD_KV_TMA=1`` (K and V through TMA descriptors, opt-in since run 53).
* ``dense-bwd``: b=1 s=16k, 16 heads, d=128, not causal; the backward alone (the forward
  runs outside the profiled range) against SDPA's cuDNN backend: the cell at 0.85x cuDNN.
  ``ours_atomic`` is the Gluon 5-GEMM backward (``RINGFLASH_BACKEND=sm90
  RINGFLASH_BACKWARD=atomic``, writer ``RINGFLASH_SM90_DQ_WRITER``, default tma).

Each (case, implementation) runs in its own process under ``ncu --profile-from-start off``:
three untimed calls (compiling, autotuning), then one call between
``torch.cuda.profiler.start()`` and ``stop()``, so only that call's kernels are profiled.
The counters are read with the clocks left alone (``--clock-control none``, as the device
notes ask). Per kernel the report gives its duration, grid, registers, shared memory,
achieved against theoretical occupancy, SM and DRAM throughput, the tensor pipes' use and
the six largest warp-stall reasons (cycles per issued instruction). The raw CSV of each
child goes to ``$OUT/ncu-<case>-<impl>.csv``.

    python scripts/ncu_kernels.py                          # both cases, every implementation
    python scripts/ncu_kernels.py --cases varlen-fwd --impls ours fa2
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import subprocess
import sys
import tempfile

CASES = {
    "varlen-fwd": ("ours", "ours_kvtma", "fa2"),
    "dense-bwd": ("ours", "ours_atomic", "cudnn"),
}
SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "ComputeWorkloadAnalysis")
# Columns of ncu's raw page shown per kernel (a name missing in this ncu version is left out).
SUMMARY_COLUMNS = (
    ("ms", "gpu__time_duration.sum"),
    ("grid", "launch__grid_size"),
    ("block", "launch__block_size"),
    ("regs", "launch__registers_per_thread"),
    ("smem KB", "launch__shared_mem_per_block"),
    ("occ ach %", "sm__warps_active.avg.pct_of_peak_sustained_active"),
    ("occ theo %", "sm__maximum_warps_per_active_cycle_pct"),
    ("SM %", "sm__throughput.avg.pct_of_peak_sustained_elapsed"),
    ("DRAM %", "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed"),
    ("issue %", "sm__issue_active.avg.pct_of_peak_sustained_elapsed"),
)
STALL_KEY = "smsp__average_warps_issue_stalled_"
STALL_SUFFIX = "_per_issue_active.ratio"


def _child(case: str, impl: str) -> None:
    """One call of ``impl`` on ``case`` inside the profiled range (run under ncu)."""
    if impl == "ours_atomic":
        os.environ["RINGFLASH_BACKEND"] = "sm90"
        os.environ["RINGFLASH_BACKWARD"] = "atomic"
    if impl == "ours_kvtma":
        os.environ["RINGFLASH_FWD_KV_TMA"] = "1"
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ringflash import flash_attn_func, flash_attn_varlen_func

    torch.manual_seed(0)
    dev, dtype = "cuda", torch.bfloat16
    if case == "varlen-fwd":
        docs, length, heads, heads_k, d = 64, 256, 32, 8, 128
        total = docs * length
        q = torch.randn(total, heads, d, device=dev, dtype=dtype)
        k, v = (torch.randn(total, heads_k, d, device=dev, dtype=dtype) for _ in range(2))
        cu = torch.arange(0, total + 1, length, device=dev, dtype=torch.int32)
        if impl != "fa2":
            def call():
                return flash_attn_varlen_func(q, k, v, cu, cu, length, length)
        else:
            def call():
                return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, length, length, 0.0, False, False)[0]
        with torch.no_grad():
            for _ in range(3):
                call()
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
            call()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        return
    batch, seqlen, heads, d = 1, 16384, 16, 128
    q, k, v = (torch.randn(batch, seqlen, heads, d, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    dout = torch.randn(batch, seqlen, heads, d, device=dev, dtype=dtype)
    if impl == "cudnn":
        def forward():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    else:
        def forward():
            return flash_attn_func(q, k, v)
    # torch.autograd.grad, not backward(): no .grad to accumulate into (add kernels in the range).
    for _ in range(3):
        torch.autograd.grad(forward(), (q, k, v), dout)
    out = forward()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def _number(text: str):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def summarize(raw_csv: str) -> list[dict]:
    """Per kernel of an ``ncu --page raw --csv`` report: the summary columns and the six
    largest stall reasons."""
    rows = list(csv.reader(io.StringIO(raw_csv)))
    if not rows:
        return []
    header = rows[0]
    index = {name: i for i, name in enumerate(header)}
    units = rows[1] if len(rows) > 1 and not rows[1][index.get("ID", 0)].strip().isdigit() else None
    kernels = []
    for row in rows[2 if units else 1:]:
        if len(row) != len(header):
            continue
        entry = {"kernel": row[index["Kernel Name"]] if "Kernel Name" in index else "?"}
        for label, column in SUMMARY_COLUMNS:
            if column in index:
                value, unit = row[index[column]], (units[index[column]] if units else "")
                number = _number(value)
                if column == "gpu__time_duration.sum" and number is not None:
                    number *= {"ns": 1e-6, "nsecond": 1e-6, "us": 1e-3, "usecond": 1e-3, "ms": 1.0, "msecond": 1.0, "s": 1e3, "second": 1e3}.get(unit, 1.0)
                    value = f"{number:.4f}"
                if column == "launch__shared_mem_per_block" and number is not None:
                    number *= {"byte": 1 / 1024, "Kbyte": 1000 / 1024, "Mbyte": 1e6 / 1024,
                               "KiB": 1.0, "MiB": 1024.0}.get(unit, 1.0)
                    value = f"{number:.0f}"
                entry[label] = value
        pipes = {header[i]: _number(row[i]) for i in range(len(header))
                 if "pipe_tensor" in header[i] and header[i].endswith(".avg.pct_of_peak_sustained_active")
                 and _number(row[i]) is not None}
        entry["tensor pipes %"] = ", ".join(f"{name.split('__')[1].split('.')[0]}={value:.1f}"
                                            for name, value in sorted(pipes.items()))
        stalls = {header[i][len(STALL_KEY):-len(STALL_SUFFIX)]: _number(row[i]) for i in range(len(header))
                  if header[i].startswith(STALL_KEY) and header[i].endswith(STALL_SUFFIX)
                  and "not_issued" not in header[i] and _number(row[i]) is not None}
        top = sorted(stalls.items(), key=lambda kv: -kv[1])[:6]
        entry["stalls (cycles per issue)"] = ", ".join(f"{name}={value:.2f}" for name, value in top)
        kernels.append(entry)
    return kernels


def hot_instructions(source_csv: str, count: int = 30) -> list[str]:
    """The ``count`` SASS instructions with the most warp-stall samples, from ``ncu --page
    source --csv --print-source sass``: "samples  share  address  instruction"."""
    rows = list(csv.reader(io.StringIO(source_csv)))
    header = next((i for i, row in enumerate(rows) if any("Warp Stall Sampling (All" in c for c in row)), None)
    if header is None:
        return ["(no warp-stall sampling columns in the source page)"]
    names = rows[header]
    samples_col = next(i for i, c in enumerate(names) if "Warp Stall Sampling (All" in c)
    source_col = next((i for i, c in enumerate(names) if c.strip() in ("Source", "# Source")), len(names) - 1)
    address_col = next((i for i, c in enumerate(names) if "Address" in c), 0)
    lines = []
    for row in rows[header + 1:]:
        if len(row) == len(names) and _number(row[samples_col]) is not None:
            lines.append((_number(row[samples_col]), row[address_col], row[source_col]))
    total = sum(n for n, _, _ in lines) or 1.0
    hot = sorted(lines, key=lambda x: -x[0])[:count]
    return [f"{n:8.0f} {100 * n / total:5.1f}%  {address}  {text.strip()}" for n, address, text in hot]


def _run_case(ncu: str, case: str, impl: str, out_dir: str, timeout: int, source: str = "") -> str:
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report")
        command = [ncu, "--profile-from-start", "off", "--clock-control", "none", "--export", report, "--force-overwrite"]
        for section in SECTIONS + (("SourceCounters",) if source else ()):
            command += ["--section", section]
        command += [sys.executable, os.path.abspath(__file__), "--child", case, impl]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0 or not os.path.exists(report + ".ncu-rep"):
            raise RuntimeError(f"ncu exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        raw = subprocess.run([ncu, "--import", report + ".ncu-rep", "--csv", "--page", "raw"],
                             capture_output=True, text=True, timeout=timeout, check=True).stdout
        if source:
            # Where the stalls are: per SASS instruction of the kernels named by ``source``.
            listing = subprocess.run([ncu, "--import", report + ".ncu-rep", "--csv", "--page", "source",
                                      "--print-source", "sass", "--kernel-name", f"regex:{source}"],
                                     capture_output=True, text=True, timeout=timeout)
            with open(os.path.join(out_dir, f"ncu-{case}-{impl}-sass.csv"), "w") as f:
                f.write(listing.stdout)
            print(f"  hottest instructions of {source} ({case} {impl}; samples, share, address, SASS):")
            for line in (hot_instructions(listing.stdout) if listing.returncode == 0
                         else [f"(ncu --page source exited {listing.returncode}: {listing.stderr[-500:]})"]):
                print("    " + line, flush=True)
    with open(os.path.join(out_dir, f"ncu-{case}-{impl}.csv"), "w") as f:
        f.write(raw)
    return raw


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--impls", nargs="+", help="implementations to profile (default: each case's own)")
    parser.add_argument("--timeout", type=int, default=240, help="seconds for each profiled process")
    parser.add_argument("--source", default="", metavar="REGEX",
                        help="also sample warp stalls per SASS instruction of the kernels matching REGEX "
                             "(SourceCounters) and print the hottest instructions")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(*args.child)
        return 0
    known = {impl for case in args.cases for impl in CASES[case]}
    unknown = sorted(set(args.impls or ()) - known)
    if unknown:
        parser.error(f"--impls: got {unknown}; expected some of {sorted(known)} for cases {args.cases}")
    ncu = shutil.which("ncu") or next((p for p in ("/usr/local/cuda/bin/ncu",) if os.path.exists(p)), None)
    if ncu is None:
        print("ncu: not found on this machine (Nsight Compute); nothing profiled")
        return 1
    out_dir = os.environ.get("OUT", ".")
    os.makedirs(out_dir, exist_ok=True)
    failed = 0
    lines = []
    jobs = [(case, impl) for case in args.cases for impl in (args.impls or CASES[case]) if impl in CASES[case]]
    for n, (case, impl) in enumerate(jobs, 1):
        print(f"[{n}/{len(jobs)}] {case} {impl} ...", flush=True)
        try:
            kernels = summarize(_run_case(ncu, case, impl, out_dir, args.timeout, args.source))
        except (RuntimeError, subprocess.SubprocessError) as exc:
            failed += 1
            print(f"  failed: {exc}", flush=True)
            continue
        for entry in kernels:
            name = entry.pop("kernel")
            text = " | ".join(f"{label} {value}" for label, value in entry.items() if value != "")
            lines.append(f"{case:11s} {impl:12s} {name[:60]:60s} {text}")
            print("  " + lines[-1], flush=True)
    print("\n".join(["", "=== per kernel (one call each)"] + lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
