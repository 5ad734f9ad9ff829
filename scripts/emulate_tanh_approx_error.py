"""Does the GPU's tanh instruction keep softcap within the tests' bar? A float64 emulation on
the CPU: causal attention with softcap whose tanh carries a relative error of the
instruction's documented worst (2**-10.99) on every entry, with a random sign, against
float64 and beside PyTorch's own attention in the test dtype (the tests' baseline: scores,
tanh and softmax in fp16 or bf16). The kernels' other rounding is left out: the figure is
what the instruction adds. Prints each case's max |error| of out and lse and the worst
ratio to PyTorch's (the tests pass below 2).

    python scripts/emulate_tanh_approx_error.py
"""

from __future__ import annotations

import argparse

import torch

TANH_APPROX_REL_ERROR = 2.0 ** -10.987


def attention(q, k, v, scale, softcap, dtype, tanh_error=None):
    """(out, lse) of causal softcapped attention computed in ``dtype``; ``tanh_error``, a
    relative error per score, is applied to the tanh."""
    q, k, v = (x.to(dtype) for x in (q, k, v))
    t = torch.tanh((q @ k.transpose(-1, -2)) * scale / softcap)
    if tanh_error is not None:
        t = t * (1 + tanh_error)
    s = softcap * t
    n = s.shape[-1]
    s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    p = torch.softmax(s.double(), -1).to(dtype)
    return (p @ v).double(), torch.logsumexp(s.double(), -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--softcaps", type=float, nargs="+", default=[5.0, 30.0, 50.0])
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--headdim", type=int, default=128)
    ap.add_argument("--trials", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    b, h, n, d = 1, 4, args.seqlen, args.headdim
    for dtype in (torch.float16, torch.bfloat16):
        for cap in args.softcaps:
            worst = 0.0
            for _ in range(args.trials):
                q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64).mul(1.5).to(dtype).double() for _ in range(3))
                ref, ref_lse = attention(q, k, v, d ** -0.5, cap, torch.float64)
                base, base_lse = attention(q, k, v, d ** -0.5, cap, dtype)
                err = (torch.rand(b, h, n, n, dtype=torch.float64) * 2 - 1) * TANH_APPROX_REL_ERROR
                ours, ours_lse = attention(q, k, v, d ** -0.5, cap, torch.float64, err)
                ours = ours.to(dtype).double()
                e = [(x - ref).abs().max().item() for x in (base, ours)]
                le = [(x - ref_lse).abs().max().item() for x in (base_lse, ours_lse)]
                worst = max(worst, e[1] / e[0], le[1] / max(le[0], 1e-9))
                print(f"{str(dtype)[6:]} softcap {cap:g}: out PyTorch {e[0]:.2e} instruction {e[1]:.2e}; "
                      f"lse PyTorch {le[0]:.2e} instruction {le[1]:.2e}", flush=True)
            print(f"{str(dtype)[6:]} softcap {cap:g}: worst ratio to PyTorch's error {worst:.2f}")


if __name__ == "__main__":
    main()
