"""What dropout's mask adds to each Gluon Hopper kernel's inner loop, in SASS instructions per
attention entry, from the kernels compiled for sm_90 on this machine (no GPU needed).

Issue 16 asks that dropout cost at most 15% over no dropout (forward+backward); run 39 timed
the Gluon kernels at 1.41x. The mask is integer work laid beside the tensor-core GEMMs, so
its cost follows from how many integer instructions each entry takes and Hopper's integer
throughput (16 INT32 lanes per SM sub-partition: 64 lanes per SM per clock). This script
compiles the forward, dK/dV and dQ kernels (b=1, 4k tokens, 16 heads, d=128, causal) with
and without dropout, finds each kernel's inner loops (a backward branch spanning a wgmma
loop: the longest loops that hold HGMMA), and prints the instructions each loop gains with
dropout, by opcode, divided by the entries one thread handles per iteration.

    python scripts/dropout_sass.py        # from an environment with the GPU image's Triton (3.6)

The static count is per loop iteration (every instruction of the loop body once): the mask's
code runs once per iteration, so it is the executed count.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compile_sm90 as C  # noqa: E402  (sets TRITON_INTERPRET=0 and the ringflash path first)

#: Entries of the score tile one consumer thread holds per loop iteration: 64 rows x
#: BLOCK_N (forward and dQ: 128 keys) or BLOCK_M (dK/dV: 64 queries) columns over a
#: warpgroup's 128 threads (``configs.SM90_FORWARD`` / ``SM90_BACKWARD``; the problem below has no
#: softcap, whose 32-row dK/dV step, ``SM90_BACKWARD_SOFTCAP``, would halve dK/dV's entries).
ENTRIES_PER_THREAD = {"_fwd_sm90_kernel": 64 * 128 // 128, "_bwd_dkdv_sm90_kernel": 64 * 64 // 128,
                      "_bwd_dq_sm90_kernel": 64 * 128 // 128}


def _sass(kernel) -> list[tuple[int, str]]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([C.CUOBJDUMP, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return [(int(m.group(1), 16), m.group(2).strip())
            for m in re.finditer(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", text, re.M)]


def _inner_loops(sass: list[tuple[int, str]]) -> list[list[str]]:
    """Bodies of the loops that issue warpgroup MMAs and contain no other such loop: the
    consumers' per-block loops (one per consumer warpgroup in the specialized kernels)."""
    loops = []
    for addr, text in sass:
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            start = int(m.group(1), 16)
            body = [t for a, t in sass if start <= a <= addr]
            if any(t.startswith("HGMMA") or " HGMMA" in t for t in body):
                loops.append((start, addr, body))
    inner = [lp for lp in loops if not any(o is not lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    return [body for _, _, body in sorted(inner)]


def _opcodes(body: list[str]) -> collections.Counter:
    counts = collections.Counter()
    for text in body:
        text = re.sub(r"^@!?U?P\w+\s+", "", text)
        counts[text.split()[0].split(".")[0]] += 1
    return counts


def main() -> int:
    if not os.path.exists(C.CUOBJDUMP):
        print(f"dropout_sass: {C.CUOBJDUMP} is missing", file=sys.stderr)
        return 2
    C._install()
    import torch

    from ringflash.kernels import sm90
    from ringflash.kernels.problem import make_problem

    if not sm90.AVAILABLE:
        print("dropout_sass: this Triton has no Gluon Hopper module", file=sys.stderr)
        return 2
    q = torch.randn(1, 4096, 16, 128, dtype=torch.bfloat16)
    prob = make_problem(q, q, None, 4096, 4096, 128**-0.5, True, -1, -1, 0.0)
    loops = {}
    for dropout in (None, (0.1, 5)):
        C.compiled.clear()
        sm90.attention_forward_sm90(q, q, q, prob, dropout=dropout)
        sm90.attention_backward_sm90(q, q, q, q, q, torch.zeros(1, 16, 4096), prob, dropout=dropout)
        for name, kernel in C.compiled:
            if kernel is not None and name in ENTRIES_PER_THREAD:
                loops[name, dropout is not None] = _inner_loops(_sass(kernel))
    C.compiled.clear()
    print("| kernel | loop | instructions (plain / dropout) | added per entry | added, by opcode (per entry) |")
    print("|---|---|---|---|---|")
    for name, per_thread in ENTRIES_PER_THREAD.items():
        for i, (plain, dropped) in enumerate(zip(loops[name, False], loops[name, True])):
            added = _opcodes(dropped)
            added.subtract(_opcodes(plain))
            mix = ", ".join(f"{op} {n / per_thread:.2f}" for op, n in added.most_common() if n > 0)
            print(f"| {name} | {i} | {len(plain)} / {len(dropped)} | {(len(dropped) - len(plain)) / per_thread:.1f} "
                  f"| {mix} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
