"""Command line: ``ringflash demo`` (also ``python -m ringflash``) and ``ringflash bench ...``."""

from __future__ import annotations

import argparse
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ringflash", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="check every implementation against the float64 reference and time it")
    demo.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = parser.parse_args(argv)
    if args.command in (None, "demo"):
        from .demo import run_demo

        return run_demo(getattr(args, "device", "auto"))
    parser.error(f"unknown command {args.command!r}")
    return 2
