"""Launch shapes of the three training kernels on the GPU, for one dense case: time the
forward with each forward candidate, and the backward with each dK/dV or dQ candidate (the
other kernel from the table), then all three fastest together, against the table's
configs and SDPA's FA2 and cuDNN backends on the same tensors.

The tables were tuned without dropout, and d=256's dK/dV kernel spills, so the candidates
of ``configs.candidates`` (with d=256's two-pass dK/dV among them) may beat them. Run 36
(then ``scripts/probe_dropout.py``) measured issue 16's dropout case with it; the d=256
backward is issue 15's. Candidates compile first in worker processes (Triton's disk
cache), then each is timed, and its out, dq, dk and dv compared with the table configs' on
the same inputs: one off by more than ``MISMATCH_LIMIT`` is reported WRONG and never
chosen. Prints a line per candidate and a table last.

    python scripts/probe_tiles.py                                 # b=4 s=4k h=16 d=128 causal, dropout 0.1
    python scripts/probe_tiles.py --dropout 0 --headdim 256 --seqlen 8192 --batch 1 --kinds dkdv dq
    python scripts/probe_tiles.py --dropout 0 --pack 64x256 --heads 32 --kv-heads 8 --full --kinds fwd

``--pack NxL`` probes a varlen batch of N documents of L tokens (``flash_attn_varlen_func``)
against PyTorch's FA2 varlen kernels (``aten._flash_attention_forward/backward``) instead
of SDPA: issue 15's varlen cells run the portable kernels by default.

``--cudagraph`` times every forward (ours and the baselines') by replaying a CUDA graph of
the call (``triton.testing.do_bench_cudagraph``): the GPU's time alone, without the host's
launch path, which a call that is short on the GPU may not hide. Its difference from the
eager time is the part of a call the host sets. ``--one-loop`` adds each forward tile with
all its key blocks in one masked loop (``KernelConfig.split_phases=False``): the default
splits them into up to three loops (masked edges, unmasked middle), each its own software
pipeline, which a 256-token document's four key blocks may not fill.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

import torch
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

from ringflash import flash_attn_func, flash_attn_varlen_func
from ringflash.bench.common import AtenFlashVarlen
from ringflash.kernels import configs


def bench(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median"))


#: Set by ``--cudagraph``: forwards are timed as CUDA graph replays.
FORWARD_IN_GRAPH = False


def bench_forward(fn) -> float:
    """A forward's time without autograd, as ``bench kernels`` times it. Run 46 timed the
    varlen forward here with grad enabled (the call then also records the graph and saves
    its tensors) at 0.52-0.69 ms per call, in no order among the tiles, against the wide
    grid's 0.31 ms under no_grad: host-bound, presumably (not yet re-measured). With
    ``--cudagraph``, the median of CUDA graph replays of ``fn`` (captured after a warm-up
    call, so that compiles and first-use checks happen outside the graph)."""
    with torch.no_grad():
        if not FORWARD_IN_GRAPH:
            return bench(fn)
        fn()
        torch.cuda.synchronize()
        return float(triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median"))


def _pack(args) -> "tuple[int, int] | None":
    """(documents, tokens each) of ``--pack NxL``, or None for a dense case."""
    if not args.pack:
        return None
    docs, length = (int(x) for x in args.pack.lower().split("x"))
    return docs, length


def inputs(args):
    """q, k, v (requiring grad) and dO: (batch, seqlen, heads, d), or with ``--pack``
    (total, heads, d), K/V with ``--kv-heads`` heads."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    pack = _pack(args)
    lead = (pack[0] * pack[1],) if pack else (args.batch, args.seqlen)
    kv_heads = args.kv_heads or args.heads

    def randn(heads):
        return torch.randn(lead + (heads, args.headdim), device="cuda", dtype=torch.bfloat16, generator=gen)

    q, k, v = randn(args.heads).requires_grad_(), randn(kv_heads).requires_grad_(), randn(kv_heads).requires_grad_()
    return q, k, v, randn(args.heads)


@functools.lru_cache(maxsize=None)
def _cu_seqlens(docs: int, length: int) -> torch.Tensor:
    """One cu_seqlens tensor for every call, as the wide grid and a training loop pass the
    same batch's: a fresh one per call costs an arange and the call's metadata work again.
    Run 47 timed the pack's forward with a fresh one per call at 0.43-0.46 ms under no_grad,
    against the wide grid's 0.31 ms; whether this is the whole difference is not yet measured."""
    return torch.arange(0, docs + 1, device="cuda", dtype=torch.int32) * length


def attention(args, q, k, v, dropout_p: float):
    """Our call on the probe's inputs (dense or varlen)."""
    pack = _pack(args)
    if pack is None:
        return flash_attn_func(q, k, v, dropout_p=dropout_p, causal=args.causal)
    cu = _cu_seqlens(*pack)
    return flash_attn_varlen_func(q, k, v, cu, cu, pack[1], pack[1], dropout_p=dropout_p, causal=args.causal)


def _compile(job) -> str:
    args, kind, cfg = job
    try:
        with configs.override(**{kind: cfg}):
            q, k, v, do = inputs(args)
            out = attention(args, q, k, v, args.dropout)
            if kind != "fwd":
                torch.autograd.grad(out, (q, k, v), do)
        torch.cuda.synchronize()
        return ""
    except Exception as exc:  # out of resources: the timing pass skips it too
        return f"{kind} {cfg}: {type(exc).__name__}"


#: The most a candidate's out, dq, dk or dv may differ from the table configs' on the same
#: inputs, relative to the tensor's largest entry. Another tile changes only the float32
#: summation order (a bf16 ulp, 0.4%, at most); a miscompile is far off (run 46: d=96's
#: split forward under a 4-warp 128-row tile gave scores 40-85% off, and run 43 had picked
#: that tile on speed alone).
MISMATCH_LIMIT = 0.02


def results(fwd, q, k, v, do, p: float) -> tuple:
    """out, dq, dk, dv of our call (the dropout seed fixed, so every tile draws one mask)."""
    torch.manual_seed(0)
    out = fwd(p)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), do))


def mismatch(want: tuple, got: tuple) -> float:
    """The largest |got - want| over the tensors, each relative to want's largest entry
    (inf where got holds a NaN or inf that want does not)."""
    worst = 0.0
    for a, b in zip(got, want):
        diff = (a.float() - b.float()).abs().nan_to_num(float("inf")).max().item()
        worst = max(worst, diff / max(b.float().abs().max().item(), 1e-6))
    return worst


def name(cfg: configs.KernelConfig) -> str:
    passes = " 2 passes" if cfg.dkdv_passes == 2 else ""
    loops = "" if cfg.split_phases else " one loop"
    return f"{cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}{passes}{loops}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--headdim", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=0, help="K/V heads (GQA); 0: as many as --heads")
    ap.add_argument("--pack", default="", help="NxL: a varlen batch of N documents of L tokens")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--full", dest="causal", action="store_false", help="full attention instead of causal")
    ap.add_argument("--kinds", nargs="+", choices=configs.KINDS, default=list(configs.KINDS))
    ap.add_argument("--workers", type=int, default=min(14, os.cpu_count() or 1))
    ap.add_argument("--one-loop", action="store_true",
                    help="also each forward tile with every key block in one masked loop (split_phases=False): "
                         "one software pipeline instead of three, for keys too few to fill them")
    ap.add_argument("--cudagraph", action="store_true",
                    help="time forwards as CUDA graph replays (the GPU's time without the host's)")
    args = ap.parse_args()
    global FORWARD_IN_GRAPH
    FORWARD_IN_GRAPH = args.cudagraph
    jobs = [(args, kind, cfg) for kind in args.kinds for cfg in configs.candidates(kind, args.headdim)]
    if args.one_loop:
        jobs += [(args, "fwd", replace(cfg, split_phases=False)) for _, kind, cfg in list(jobs) if kind == "fwd"]
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=torch.multiprocessing.get_context("spawn")) as pool:
        failed = [f for f in pool.map(_compile, jobs) if f]
    print(f"compiled {len(jobs)} variants; {len(failed)} did not run: {failed}", flush=True)

    q, k, v, do = inputs(args)
    fwd = lambda p: attention(args, q, k, v, p)  # noqa: E731

    def bwd_ms(p: float) -> float:
        torch.manual_seed(0)
        out = fwd(p)
        return bench(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True))

    sdpa = {}
    if _pack(args):
        if args.dropout:
            sys.exit("probe_tiles: --pack times FA2 varlen without dropout only (--dropout 0)")
        docs, length = _pack(args)
        cu = torch.arange(0, docs + 1, device=q.device, dtype=torch.int32) * length
        qd, kd, vd = (x.detach().requires_grad_() for x in (q, k, v))
        call = lambda: AtenFlashVarlen.apply(qd, kd, vd, cu, cu, length, length, args.causal)  # noqa: E731
        o = call()
        sdpa["FA2 varlen"] = (bench_forward(call), bench(lambda: torch.autograd.grad(o, (qd, kd, vd), do, retain_graph=True)))
    for label, backend in (("FA2", SDPBackend.FLASH_ATTENTION), ("cuDNN", SDPBackend.CUDNN_ATTENTION)):
        if _pack(args):
            break
        qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
        try:
            with sdpa_kernel(backend):
                call = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
                    qt, kt, vt, is_causal=args.causal, dropout_p=args.dropout, enable_gqa=args.kv_heads > 0)
                f = bench_forward(call)
                o = call()
                sdpa[label] = (f, bench(lambda: torch.autograd.grad(o, (qt, kt, vt), do.transpose(1, 2),
                                                                     retain_graph=True)))
        except Exception as exc:  # a backend that refuses the case
            print(f"{label}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
    probs = sorted({0.0, args.dropout})
    base = {p: (bench_forward(lambda: fwd(p)), bwd_ms(p)) for p in probs}
    for p, (f, b) in base.items():
        print(f"table, dropout {p}: fwd {f:.3f} bwd {b:.3f} fwd+bwd {f + b:.3f} ms", flush=True)
    reference = results(fwd, q, k, v, do, args.dropout)
    best = {}
    for _, kind, cfg in jobs:
        try:
            with configs.override(**{kind: cfg}):
                ms = bench_forward(lambda: fwd(args.dropout)) if kind == "fwd" else bwd_ms(args.dropout)
                off = mismatch(reference, results(fwd, q, k, v, do, args.dropout))
        except Exception as exc:
            print(f"  {kind} {cfg}: {type(exc).__name__}", flush=True)
            continue
        if off > MISMATCH_LIMIT:
            print(f"  {kind} {name(cfg)}: {ms:.3f} ms, WRONG: its results differ from the table's by {off:.3f} "
                  f"of the largest entry (not a candidate)", flush=True)
            continue
        print(f"  {kind} {name(cfg)}: {ms:.3f} ms", flush=True)
        if kind not in best or ms < best[kind][0]:
            best[kind] = (ms, cfg)
    missing = [kind for kind in args.kinds if kind not in best]
    if missing:
        sys.exit(f"probe_tiles: no candidate of {missing} ran (see the lines above)")
    # The fastest of each kind together (the backward kernels' times are not additive).
    with configs.override(**{kind: cfg for kind, (_, cfg) in best.items()}):
        f, b = bench_forward(lambda: fwd(args.dropout)), bwd_ms(args.dropout)
    table_f, table_b = base[args.dropout]
    shape = f"pack {args.pack}" if args.pack else f"b={args.batch} s={args.seqlen}"
    timer = "forwards as CUDA graph replays" if args.cudagraph else "eager calls"
    print(f"\ncase {shape} h={args.heads}/{args.kv_heads or args.heads} d={args.headdim} causal={args.causal}, "
          f"bf16, dropout {args.dropout}, {timer}")
    print("| kernel | fastest | ms (the backward's for dK/dV, dQ) | the table's ms |")
    print("|---|---|---|---|")
    for kind in args.kinds:
        ms, c = best[kind]
        print(f"| {kind} | {name(c)} | {ms:.3f} | {table_f if kind == 'fwd' else table_b:.3f} |")
    print(f"\ntable: {table_f:.3f} + {table_b:.3f} = {table_f + table_b:.3f} ms; fastest of each: "
          f"{f:.3f} + {b:.3f} = {f + b:.3f} ms")
    if args.dropout:
        none = sum(base[0.0])
        print(f"dropout's cost: table {sum(base[args.dropout]) / none:.3f}x, fastest {(f + b) / none:.3f}x "
              f"(no dropout, table: {none:.3f} ms)")
    for label, (sf, sb) in sdpa.items():
        print(f"SDPA {label}: fwd {sf:.3f} bwd {sb:.3f} ms; its speed / ours (fastest): fwd {f / sf:.2f}, "
              f"bwd {b / sb:.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
