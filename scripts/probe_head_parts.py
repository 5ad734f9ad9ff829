"""Whether the head-dim splits (``configs.head_parts``) run clean on this GPU: each head
dim's forward and backward against the float64 reference at four shapes, in a fresh process
per head dim and dtype (a fault kills the CUDA context). Prints one line per case and a
summary. Run 41 found padded second parts miscompiled by Triton 3.6 for sm_90 this way.

    python scripts/probe_head_parts.py --headdims 96 160 192
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

CASE = """
import torch
from ringflash.kernels import configs
from test_properties import DenseCase, check_dense_case
for sq, sk, causal in ((1, 1, False), (77, 77, True), (300, 129, False), (1024, 1024, True)):
    check_dense_case(DenseCase(seed=1, batch=2, seqlen_q=sq, seqlen_k=sk, nheads=4, nheads_k=2, headdim={d},
                               causal=causal, window=(-1, -1), softcap=0.0, softmax_scale=None, input_scale=1.0,
                               dtype=torch.{dtype}))
torch.cuda.synchronize()
print("parts", configs.head_parts({d}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--headdims", type=int, nargs="+", default=[96, 160, 192])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    args = parser.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, RINGFLASH_HEAD_PARTS="1", CUDA_LAUNCH_BLOCKING="1",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    failed = []
    for dtype in args.dtypes:
        for d in args.headdims:
            done = subprocess.run([sys.executable, "-c", CASE.format(d=d, dtype=dtype)],
                                  cwd=os.path.join(root, "tests"), env=env, capture_output=True, text=True, timeout=300)
            lines = (done.stdout + done.stderr).strip().splitlines()
            parts = next((ln for ln in lines if ln.startswith("parts")), "")
            verdict = "ok" if done.returncode == 0 else "FAIL: " + (lines[-1] if lines else "?")
            print(f"{dtype} d={d} {parts}: {verdict}", flush=True)
            if done.returncode:
                failed.append((dtype, d))
    print(f"{len(failed)} failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
