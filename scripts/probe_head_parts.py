"""Whether the head-dim splits (``configs.head_parts``) run clean on this GPU: each head
dim's forward and backward against the float64 reference at four shapes, in a fresh process
per head dim and dtype (a fault kills the CUDA context). Prints one line per case and a
summary. Run 41 found padded second parts miscompiled by Triton 3.6 for sm_90 this way.

    python scripts/probe_head_parts.py                                    # d=192
    python scripts/probe_head_parts.py --headdims 96 160 --min-part 32    # the splits run 49 turned off
    python scripts/probe_head_parts.py --headdims 96 --min-part 32 --fwd-configs table 128x64x4x3 128x64x8x3

``--fwd-configs``: each case also under these portable forward tiles (BMxBNxWARPSxSTAGES,
or ``table`` for the tables' choice), one process each: the GPU test found d=96's split
wrong in bf16 at seqlen 1 (lse, the score itself), under a forward tile run 43 picked
for speed alone. ``--min-part``: the narrowest second part allowed
(``configs.HEAD_PART_MIN``, 64 since run 49 found 32-wide ones wrong on one-query varlen
calls); 32 splits d=96 and d=160 again. Each case also runs run 49's varlen call (one query
over 192 keys, GQA 3/1).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

CASE = """
import contextlib
import torch
from ringflash.kernels import configs
from test_properties import DenseCase, VarlenCase, check_dense_case, check_varlen_case
configs.HEAD_PART_MIN = {min_part}
fwd = {fwd}
forced = configs.override(fwd=configs.KernelConfig(*fwd)) if fwd else contextlib.nullcontext()
with forced:
    for sq, sk, causal in ((1, 1, False), (1, 1, True), (77, 77, True), (300, 129, False), (512, 512, False),
                           (1024, 1024, True)):
        check_dense_case(DenseCase(seed=1, batch=2, seqlen_q=sq, seqlen_k=sk, nheads=4, nheads_k=2, headdim={d},
                                   causal=causal, window=(-1, -1), softcap=0.0, softmax_scale=None,
                                   input_scale=1.0, dtype=torch.{dtype}))
    check_varlen_case(VarlenCase(seed=588, lengths_q=(1,), lengths_k=(192,), seqused_k=None, nheads=3, nheads_k=1,
                                 headdim={d}, causal=False, window=(-1, -1), softcap=29.16, softmax_scale=None,
                                 input_scale=1.0, dtype=torch.{dtype}, extra_max_q=0, extra_max_k=1,
                                 cu_q="strided_offset", cu_k="contiguous", seqused_layout="strided",
                                 qkv=("pad_heads", "pad_heads", "pad_dim")))
torch.cuda.synchronize()
print("parts", configs.head_parts({d}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--headdims", type=int, nargs="+", default=[192])
    parser.add_argument("--min-part", type=int, default=None,
                        help="configs.HEAD_PART_MIN in the cases (default: the module's)")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    parser.add_argument("--fwd-configs", nargs="+", default=["table"], metavar="BMxBNxWARPSxSTAGES")
    args = parser.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    from ringflash.kernels import configs

    min_part = configs.HEAD_PART_MIN if args.min_part is None else args.min_part
    env = dict(os.environ, RINGFLASH_HEAD_PARTS="1", CUDA_LAUNCH_BLOCKING="1",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    failed = []
    for dtype in args.dtypes:
        for d in args.headdims:
            for fwd in args.fwd_configs:
                tiles = () if fwd == "table" else tuple(int(x) for x in fwd.split("x"))
                done = subprocess.run([sys.executable, "-c", CASE.format(d=d, dtype=dtype, fwd=tiles, min_part=min_part)],
                                      cwd=os.path.join(root, "tests"), env=env, capture_output=True, text=True,
                                      timeout=300)
                lines = (done.stdout + done.stderr).strip().splitlines()
                parts = next((ln for ln in lines if ln.startswith("parts")), "")
                verdict = "ok" if done.returncode == 0 else "FAIL: " + (lines[-1] if lines else "?")
                print(f"{dtype} d={d} fwd {fwd} {parts}: {verdict}", flush=True)
                if done.returncode:
                    failed.append((dtype, d, fwd))
    print(f"{len(failed)} failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
