"""The Gluon Hopper kernels (``kernels.sm90``) on the GPU: their errors against a float64
reference on a small case (the portable kernels' beside them), then their times against the
portable kernels, SDPA's FA2 and cuDNN on the same tensors: the forward for each variant
(``sm90.VARIANTS``) and tile given, the backward (dK/dV and dQ kernels) for each pair of
tiles given, and the varlen forward and backward on packed documents against FA2's varlen
kernels.

    python scripts/probe_sm90.py                  # bf16, d=64/128, causal and full, 16k tokens
    python scripts/probe_sm90.py --parts bwd --headdims 128 --seqlens 4096 --bwd-tiles 64x128x2/128x64x3

Prints a line per measurement as it goes and the tables of TFLOP/s and ratios last.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from ringflash import attention_ref, flash_attn_func  # noqa: E402
from ringflash.bench.common import (  # noqa: E402
    BWD_FLOP_FACTOR, attn_flops, bench_ms, format_table, sdpa_baseline, tflops, time_fwd_bwd,
)
from ringflash.kernels import configs, sm90  # noqa: E402
from ringflash.kernels.bwd import attention_backward  # noqa: E402
from ringflash.kernels.problem import make_problem  # noqa: E402


def candidate(spec: str) -> tuple[str, configs.KernelConfig]:
    """"variant:BMxBNxWARPSxSTAGES" (warps are fixed by the specialized variants)."""
    variant, _, tiles = spec.partition(":")
    bm, bn, warps, stages = (int(x) for x in tiles.split("x"))
    return variant, configs.KernelConfig(bm, bn, warps, stages)


def sm90_call(q, k, v, causal, variant):
    prob = make_problem(q, k, None, q.shape[1], k.shape[1], q.shape[-1] ** -0.5, causal, -1, -1, 0.0)
    return sm90.attention_forward_sm90(q, k, v, prob, variant=variant)


def check(d: int, causal: bool, variant: str, cfg: configs.KernelConfig) -> str:
    """Max error of out and lse against float64, next to the portable forward's."""
    gen = torch.Generator(device="cuda").manual_seed(d + causal)
    shapes = [(2, 1000, 8, d), (2, 1537, 2, d), (2, 1537, 2, d)]
    q64, k64, v64 = (torch.randn(s, device="cuda", dtype=torch.float64, generator=gen) for s in shapes)
    want_out, want_lse = attention_ref(q64, k64, v64, causal=causal)
    q, k, v = (t.bfloat16() for t in (q64, k64, v64))
    with configs.override(sm90_fwd=cfg):
        out, lse = sm90_call(q, k, v, causal, variant)
    ref_out, ref_lse, _ = flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    err = lambda a, b: (a.double() - b).abs().max().item()  # noqa: E731
    return (f"out {err(out, want_out):.2e} (portable {err(ref_out, want_out):.2e}), "
            f"lse {err(lse, want_lse):.2e} (portable {err(ref_lse, want_lse):.2e})")


def bwd_candidate(spec: str) -> tuple[configs.KernelConfig, configs.KernelConfig, Optional[str]]:
    """"BMxBNxSTAGES/BMxBNxSTAGES[+atomic|+tma|+overlap]": the dK/dV kernel's tiles, then the
    dQ kernel's (unused by the atomic 5-GEMM backward, which ``+atomic`` picks with its dQ
    added by vector reductions and ``+tma`` with TMA adds: ``configs.sm90_dq_writer``;
    ``+overlap``: the deterministic backward with its dQ kernel a programmatic dependent
    launch, ``configs.sm90_backward_overlap``). The third value is that writer, "overlap",
    or None for the deterministic backward."""
    spec, atomic = spec.rsplit("+", 1) if "+" in spec else (spec, None)
    if atomic not in (None, "atomic", "tma", "overlap"):
        raise ValueError(f"--bwd-tiles: got +{atomic}; expected +atomic, +tma or +overlap")
    atomic = {"atomic": "red", "tma": "tma", "overlap": "overlap"}.get(atomic)
    pair = []
    for part in spec.split("/"):
        bm, bn, stages = (int(x) for x in part.split("x"))
        pair.append(configs.KernelConfig(bm, bn, 4, stages))
    return pair[0], pair[1], atomic


def _backward_override(dkdv_cfg, dq_cfg, atomic: Optional[str]):
    overlap = atomic == "overlap"
    return configs.override(sm90_dkdv=dkdv_cfg, sm90_dq=dq_cfg, sm90_dq_writer=None if overlap else atomic,
                            sm90_backward_overlap=overlap)


def _problem(q, k, causal):
    return make_problem(q, k, None, q.shape[1], k.shape[1], q.shape[-1] ** -0.5, causal, -1, -1, 0.0)


def check_bwd(d: int, causal: bool, dkdv_cfg, dq_cfg, atomic: Optional[str]) -> str:
    """Max errors of dq, dk, dv against float64, next to the portable backward's."""
    gen = torch.Generator(device="cuda").manual_seed(d + causal + 1)
    shapes = [(2, 1000, 8, d), (2, 1537, 2, d), (2, 1537, 2, d), (2, 1000, 8, d)]
    q64, k64, v64, do64 = (torch.randn(s, device="cuda", dtype=torch.float64, generator=gen) for s in shapes)
    leaves = [t.clone().requires_grad_() for t in (q64, k64, v64)]
    want = torch.autograd.grad(attention_ref(*leaves, causal=causal)[0], leaves, do64)
    q, k, v, do = (t.bfloat16() for t in (q64, k64, v64, do64))
    out, lse, _ = flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    prob = _problem(q, k, causal)
    ours = attention_backward(do, q, k, v, out, lse, prob)
    with _backward_override(dkdv_cfg, dq_cfg, atomic):
        got = sm90.attention_backward_sm90(do, q, k, v, out, lse, prob, atomic_dq=atomic in ("red", "tma"))
    err = lambda a, b: (a.double() - b).abs().max().item()  # noqa: E731
    return ", ".join(f"{n} {err(g, w):.2e} (portable {err(o, w):.2e})"
                     for n, g, o, w in zip(("dq", "dk", "dv"), got, ours, want))


def _tiles(cfg) -> str:
    return f"{cfg.block_m}x{cfg.block_n}x{cfg.num_stages}"


def _bwd_label(dkdv_cfg, dq_cfg, atomic: Optional[str]) -> str:
    return f"{_tiles(dkdv_cfg)}/{_tiles(dq_cfg)}" + {None: "", "red": "+atomic", "tma": "+tma",
                                                      "overlap": "+overlap"}[atomic]


def backward_section(args, fa2, cudnn) -> list:
    cands = [bwd_candidate(s) for s in args.bwd_tiles]
    rows = []
    for d in args.headdims:
        for causal in (False, True):
            for dkdv_cfg, dq_cfg, atomic in cands:
                label = _bwd_label(dkdv_cfg, dq_cfg, atomic)
                try:
                    print(f"check bwd d={d} causal={causal} {label}: "
                          f"{check_bwd(d, causal, dkdv_cfg, dq_cfg, atomic)}", flush=True)
                except Exception as exc:
                    print(f"check bwd d={d} causal={causal} {label}: FAILED {type(exc).__name__}: {str(exc)[:300]}",
                          flush=True)
            for seqlen in args.seqlens:
                batch = max(1, args.tokens // seqlen)
                gen = torch.Generator(device="cuda").manual_seed(seqlen)
                kv_heads = args.kv_heads or args.heads
                q, k, v, do = (torch.randn(batch, seqlen, h, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                               for h in (args.heads, kv_heads, kv_heads, args.heads))
                out, lse, _ = flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
                prob = _problem(q, k, causal)
                flops = BWD_FLOP_FACTOR * attn_flops(batch, args.heads, seqlen, seqlen, d, causal)
                leaves = [t.clone().requires_grad_() for t in (q, k, v)]
                base = {"portable": bench_ms(lambda: attention_backward(do, q, k, v, out, lse, prob)),
                        "FA2": time_fwd_bwd(lambda *t: fa2(*t, causal), leaves, do)[1],
                        "cuDNN": time_fwd_bwd(lambda *t: cudnn(*t, causal), leaves, do)[1]}
                for dkdv_cfg, dq_cfg, atomic in cands:
                    name = _bwd_label(dkdv_cfg, dq_cfg, atomic)
                    try:
                        with _backward_override(dkdv_cfg, dq_cfg, atomic):
                            ms = bench_ms(lambda: sm90.attention_backward_sm90(
                                do, q, k, v, out, lse, prob, atomic_dq=atomic in ("red", "tma")))
                    except Exception as exc:
                        print(f"time bwd d={d} causal={causal} s={seqlen} {name}: FAILED {type(exc).__name__}",
                              flush=True)
                        continue
                    row = [d, "causal" if causal else "full", seqlen, batch, name, f"{tflops(flops, ms):.0f}",
                           *(f"{tflops(flops, base[n]):.0f}" for n in ("portable", "FA2", "cuDNN")),
                           *(f"{base[n] / ms:.2f}" for n in ("portable", "FA2", "cuDNN"))]
                    print("time bwd", row, flush=True)
                    rows.append(row)
    return rows


def forward_section(args, fa2, cudnn) -> list:
    cfgs = [candidate(s) for s in args.tiles]
    rows = []
    for d in args.headdims:
        for causal in (False, True):
            for variant, cfg in cfgs:
                label = f"{variant}:{cfg.block_m}x{cfg.block_n}x{cfg.num_warps}x{cfg.num_stages}"
                try:
                    print(f"check d={d} causal={causal} {label}: {check(d, causal, variant, cfg)}", flush=True)
                except Exception as exc:  # a tile that does not fit: say so and go on
                    print(f"check d={d} causal={causal} {label}: FAILED {type(exc).__name__}: {str(exc)[:300]}",
                          flush=True)
            for seqlen in args.seqlens:
                batch = max(1, args.tokens // seqlen)
                gen = torch.Generator(device="cuda").manual_seed(seqlen)
                q, k, v = (torch.randn(batch, seqlen, args.heads, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                           for _ in range(3))
                flops = attn_flops(batch, args.heads, seqlen, seqlen, d, causal)
                base = {"portable": bench_ms(lambda: flash_attn_func(q, k, v, causal=causal)),
                        "FA2": bench_ms(lambda: fa2(q, k, v, causal)),
                        "cuDNN": bench_ms(lambda: cudnn(q, k, v, causal))}
                for variant, cfg in cfgs:
                    name = f"{variant}:{cfg.block_m}x{cfg.block_n}x{cfg.num_warps}x{cfg.num_stages}"
                    try:
                        with configs.override(sm90_fwd=cfg):
                            ms = bench_ms(lambda: sm90_call(q, k, v, causal, variant))
                    except Exception as exc:
                        print(f"time d={d} causal={causal} s={seqlen} {name}: FAILED {type(exc).__name__}", flush=True)
                        continue
                    row = [d, "causal" if causal else "full", seqlen, batch, name, f"{tflops(flops, ms):.0f}",
                           *(f"{tflops(flops, base[n]):.0f}" for n in ("portable", "FA2", "cuDNN")),
                           *(f"{base[n] / ms:.2f}" for n in ("portable", "FA2", "cuDNN"))]
                    print("time", row, flush=True)
                    rows.append(row)
    return rows


def varlen_section(args, fa2_varlen) -> list:
    """Packed documents (GQA 32/8, d=128): the sm90 varlen forward and backward against the
    portable kernels and FA2's varlen ones (``aten._flash_attention_forward/backward``),
    with the largest difference of out, dq, dk and dv from the portable kernels'."""
    from ringflash import flash_attn_varlen_func
    from ringflash.bench.kernels_wide import pack_lengths
    from ringflash.kernels.problem import SeqMeta

    rows = []
    for pack in args.packs:
        for causal in (False, True):
            lengths = pack_lengths(pack, args.tokens)
            cu = torch.tensor([0] + lengths, device="cuda", dtype=torch.int32).cumsum(0, dtype=torch.int32)
            gen = torch.Generator(device="cuda").manual_seed(len(lengths))
            q, do = (torch.randn(args.tokens, 32, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
                     for _ in range(2))
            k, v = (torch.randn(args.tokens, 8, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
                    for _ in range(2))
            longest = max(lengths)
            meta = SeqMeta.from_cu_seqlens(cu, cu)
            prob = make_problem(q, k, meta, longest, longest, 128 ** -0.5, causal, -1, -1, 0.0)
            sm90_fn = lambda: sm90.attention_forward_sm90(q, k, v, prob, meta=meta)  # noqa: E731
            portable_fn = lambda: flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=causal,  # noqa: E731
                                                         return_attn_probs=True)[:2]
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            try:
                out, lse = portable_fn()
                got = sm90.attention_backward_sm90(do, q, k, v, out, lse, prob, meta=meta)
                want = attention_backward(do, q, k, v, out, lse, prob, meta)
                err = max((a.float() - b.float()).abs().max().item()
                          for a, b in zip((sm90_fn()[0], *got), (out, *want)))
                times = {name: bench_ms(fn) for name, fn in (
                    ("sm90", sm90_fn), ("portable", portable_fn),
                    ("FA2", lambda: fa2_varlen(q, k, v, cu, cu, longest, longest, causal)),
                    ("sm90 bwd", lambda: sm90.attention_backward_sm90(do, q, k, v, out, lse, prob, meta=meta)),
                    ("portable bwd", lambda: attention_backward(do, q, k, v, out, lse, prob, meta)))}
                times["FA2 bwd"] = time_fwd_bwd(lambda *t: fa2_varlen(*t, cu, cu, longest, longest, causal),
                                                leaves, do)[1]
            except Exception as exc:
                print(f"varlen {pack} causal={causal}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                continue
            row = [pack, "causal" if causal else "full", len(lengths), f"{err:.2e}"]
            for pas in ("", " bwd"):
                row += [*(f"{times[n + pas]:.3f}" for n in ("sm90", "portable", "FA2")),
                        f"{times['portable' + pas] / times['sm90' + pas]:.2f}",
                        f"{times['FA2' + pas] / times['sm90' + pas]:.2f}"]
            print("varlen", row, flush=True)
            rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=["fwd", "bwd", "varlen"], default=["fwd", "bwd", "varlen"])
    parser.add_argument("--packs", nargs="+", default=["llama3", "16x1024", "random"],
                        help="varlen packs of --tokens tokens (bench kernels --grid wide's names)")
    parser.add_argument("--headdims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--tokens", type=int, default=16384, help="batch = tokens / seqlen")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=0, help="the backward's K/V heads (GQA; 0: --heads)")
    parser.add_argument("--tiles", nargs="+", metavar="VARIANT:BMxBNxWxS",
                        default=["pingpong:128x128x4x3", "pingpong:128x128x4x2"])
    parser.add_argument("--bwd-tiles", nargs="+", metavar="BMxBNxS/BMxBNxS",
                        default=["64x128x2/128x64x3", "64x128x3/128x64x2", "64x128x2/128x128x2",
                                 "64x128x2/128x64x3+atomic", "64x128x2/128x64x3+tma"],
                        help="dK/dV kernel's tiles (query rows per step x keys owned x stages), then dQ's "
                             "(query rows owned x keys per step x stages); +atomic: the 5-GEMM backward, "
                             "+tma: the same with its dQ added by TMA (RINGFLASH_SM90_DQ_WRITER=tma); "
                             "+overlap: the two kernels with dQ a programmatic dependent launch "
                             "(the default since run 56); without a suffix the two run one after the other "
                             "(RINGFLASH_SM90_BWD_OVERLAP=0)")
    args = parser.parse_args(argv)
    # flash_attn_func and attention_backward are the portable baselines here (the sm90
    # calls go to their launchers).
    os.environ["RINGFLASH_BACKEND"] = "portable"
    fa2, cudnn = sdpa_baseline("FLASH_ATTENTION"), sdpa_baseline("CUDNN_ATTENTION")
    header = ["d", "mask", "s", "b", "{} tiles", "sm90 TF/s", "portable", "FA2", "cuDNN", "vs portable", "vs FA2",
              "vs cuDNN"]
    tables = []
    if "fwd" in args.parts:
        rows = forward_section(args, fa2, cudnn)
        tables.append("forward\n" + format_table([h.format("variant:") for h in header], rows))
    if "bwd" in args.parts:
        rows = backward_section(args, fa2, cudnn)
        tables.append("backward (dK/dV / dQ tiles)\n" + format_table([h.format("bwd") for h in header], rows))
    if "varlen" in args.parts:
        from ringflash.bench.common import AtenFlashVarlen

        rows = varlen_section(args, AtenFlashVarlen.apply)
        tables.append("varlen forward and backward (GQA 32/8, d=128; ms)\n" + format_table(
            ["pack", "mask", "docs", "max err vs portable", "sm90", "portable", "FA2 varlen", "vs portable", "vs FA2",
             "sm90 bwd", "portable bwd", "FA2 varlen bwd", "bwd vs portable", "bwd vs FA2"], rows))
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
