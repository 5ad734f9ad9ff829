"""What softcap costs: forward and backward with softcap against the same call without it,
on the default backend, on the portable kernels and (``softcap_sm90``) on the Gluon Hopper
kernels (``RINGFLASH_BACKEND=sm90``; run 45 timed them before the default took them for
softcap calls). SDPA's FA2 (no softcap) is the yardstick.

    python scripts/probe_softcap.py                       # b=4 s=4k h=16, d=64/128/256, causal
    python scripts/probe_softcap.py --headdims 256 --seqlen 8192 --batch 1

Prints a line per measurement and a table last (ms and ratios; bf16).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from ringflash import flash_attn_func  # noqa: E402
from ringflash.bench.common import format_table, sdpa_baseline, time_fwd_bwd  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--headdims", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--softcap", type=float, default=30.0)
    ap.add_argument("--full", dest="causal", action="store_false", help="full attention instead of causal")
    args = ap.parse_args()
    fa2 = sdpa_baseline("FLASH_ATTENTION")
    rows = []
    for d in args.headdims:
        gen = torch.Generator(device="cuda").manual_seed(d)
        shape = (args.batch, args.seqlen, args.heads, d)
        q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_() for _ in range(3))
        dout = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
        times = {}
        for label, backend, cap in (("default", "", 0.0), ("portable", "portable", 0.0), ("softcap", "", args.softcap),
                                    ("softcap_sm90", "sm90", args.softcap)):
            os.environ["RINGFLASH_BACKEND"] = backend
            times[label] = time_fwd_bwd(lambda q, k, v: flash_attn_func(q, k, v, causal=args.causal, softcap=cap), (q, k, v), dout)
            print(f"d={d} {label}: fwd {times[label][0]:.3f} ms, bwd {times[label][1]:.3f} ms", flush=True)
        os.environ["RINGFLASH_BACKEND"] = ""
        times["fa2"] = time_fwd_bwd(lambda q, k, v: fa2(q, k, v, args.causal), (q, k, v), dout)
        print(f"d={d} fa2: fwd {times['fa2'][0]:.3f} ms, bwd {times['fa2'][1]:.3f} ms", flush=True)
        sc, pt, df, f2 = times["softcap"], times["portable"], times["default"], times["fa2"]
        rows.append([d, *(f"{x:.3f}" for x in (*df, *pt, *sc, *f2)),
                     f"{sc[0] / pt[0]:.3f} / {sc[1] / pt[1]:.3f}", f"{sc[0] / df[0]:.3f} / {sc[1] / df[1]:.3f}",
                     f"{f2[0] / sc[0]:.2f} / {f2[1] / sc[1]:.2f}"])
        del q, k, v, dout
    print(f"\nb={args.batch} s={args.seqlen} h={args.heads} {'causal' if args.causal else 'full'} bf16, "
          f"softcap {args.softcap:g}, {torch.cuda.get_device_name()}")
    print(format_table(["d", "default fwd", "bwd", "portable fwd", "bwd", "softcap fwd", "bwd", "FA2 fwd", "bwd",
                        "softcap/portable time", "softcap/default time", "softcap speed vs FA2"], rows))


if __name__ == "__main__":
    main()
