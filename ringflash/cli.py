"""Command line: ``ringflash demo`` (also ``python -m ringflash``) and ``ringflash bench ...``."""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

BENCHMARKS = {
    "kernels": "ringflash.bench.kernels",
    "grouped": "ringflash.bench.grouped",
    "cp": "ringflash.bench.cp",
    "tune": "ringflash.bench.tune",
    "sweep": "ringflash.bench.sweep",
    "hf": "ringflash.bench.hf",
    "decode": "ringflash.bench.decode",
    "dropout": "ringflash.bench.dropout",
    "registers": "ringflash.bench.registers",
}


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:  # a negative count silently skipped the context-parallel run
        raise argparse.ArgumentTypeError(f"got {value}; expected a count >= 0 (0 skips the run)")
    return value


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ringflash", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="check every implementation against the float64 reference and time it")
    demo.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    demo.add_argument("--cp-world-size", type=_non_negative_int, default=2,
                      help="local processes for the context-parallel run (0 skips it)")
    demo.add_argument("--cp-strategy", default="zigzag_llama3",
                      choices=["zigzag_llama3", "llama3", "ring", "zigzag_ring", "stripe", "ulysses"])
    bench = sub.add_parser("bench", help="benchmarks (GPU; `sweep`, `kernels --grid wide`, `hf`, `decode` and "
                           "`dropout` also take `--device cpu --quick`, a smoke run at toy sizes): "
                           + ", ".join(BENCHMARKS))
    bench.add_argument("which", choices=sorted(BENCHMARKS))
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark (--help for its list)")
    args = parser.parse_args(argv)
    if args.command in (None, "demo"):
        from .demo import run_demo

        if args.command is None:
            return run_demo()
        return run_demo(args.device, args.cp_world_size, args.cp_strategy)
    import importlib

    return importlib.import_module(BENCHMARKS[args.which]).main(args.rest)
