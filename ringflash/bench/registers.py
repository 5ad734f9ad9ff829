"""``ringflash bench registers`` (issue 15): registers and spills of the compiled kernels.

Runs the forward and the backward once per head dim and mask (bf16, ``--seqlen`` tokens,
2048 / d heads), with the configuration table's choices or, with ``--candidates``, every
autotune candidate of each kernel (``configs.candidates``), then lists each compiled variant
of ringflash's Triton kernels: its tile sizes and other compile-time constants, warps,
stages, shared memory, registers per thread and spilled bytes as the CUDA driver reports
them, next to ``configs.tile_registers``'s estimate of the resident tiles. A variant with
spills is a register-bound shape to re-tile (head dim 256's backward is the known one).

``--csv FILE`` writes the rows. Needs a CUDA GPU (the interpreter compiles nothing).
"""

from __future__ import annotations

import argparse
import types
from typing import Iterable, Optional, Sequence

import torch

COLUMNS = ["kernel", "headdim", "causal", "BLOCK_M", "BLOCK_N", "BLOCK_D", "num_warps", "num_stages",
           "shared_bytes", "n_regs", "n_spills", "estimated_tile_regs"]

#: Kernel (JIT function name) -> the ``configs`` kind whose tiles it keeps.
KIND_OF = {"_fwd_kernel": "fwd", "_bwd_dkdv_kernel": "dkdv", "_bwd_dq_kernel": "dq"}


def _jit_functions(modules: Iterable[types.ModuleType]) -> list:
    from triton.runtime.jit import JITFunction

    found = []
    for module in modules:
        for name in sorted(vars(module)):
            obj = getattr(module, name)
            if isinstance(obj, JITFunction) and getattr(obj, "device_caches", None) is not None:
                found.append(obj)
    return found


def _constants(kernel) -> dict:
    """Compile-time constants of a compiled variant, by argument name (Triton keys them by
    argument index or by name depending on the version)."""
    src = getattr(kernel, "src", None)
    consts = getattr(src, "constants", None) or {}
    names = list(getattr(getattr(src, "fn", None), "arg_names", []) or [])
    out = {}
    for key, value in consts.items():
        idx = key[0] if isinstance(key, tuple) and len(key) == 1 else key
        out[names[idx] if isinstance(idx, int) and idx < len(names) else str(idx)] = value
    return out


def compiled_variants(modules: Optional[Iterable[types.ModuleType]] = None) -> list[dict]:
    """One dict per compiled variant of the kernels in ``modules`` (default: the forward,
    backward and decode kernel modules) on every device: name, constants, warps, stages,
    shared memory, and the driver's register and spill counts (None where this Triton
    does not expose them)."""
    if modules is None:
        from ..kernels import bwd, decode, fwd

        modules = (fwd, bwd, decode)
    rows = []
    for fn in _jit_functions(modules):
        for cache in list(fn.device_caches.values()):
            kernel_cache = cache[0] if isinstance(cache, tuple) else {}
            for kernel in list(kernel_cache.values()):
                if hasattr(kernel, "result"):  # an asynchronous compile
                    kernel = kernel.result()
                if getattr(kernel, "n_regs", None) is None and hasattr(kernel, "_init_handles"):
                    kernel._init_handles()
                meta = getattr(kernel, "metadata", None)
                rows.append(dict(
                    kernel=fn.__name__, constants=_constants(kernel),
                    num_warps=getattr(meta, "num_warps", None), num_stages=getattr(meta, "num_stages", None),
                    shared_bytes=getattr(meta, "shared", None),
                    n_regs=getattr(kernel, "n_regs", None), n_spills=getattr(kernel, "n_spills", None),
                ))
    return rows


def _run(d: int, seqlen: int, causal: bool) -> None:
    from ..interface import flash_attn_func

    gen = torch.Generator(device="cuda").manual_seed(0)
    nheads = max(1, 2048 // d)
    q, k, v = (torch.randn(1, seqlen, nheads, d, device="cuda", dtype=torch.bfloat16, generator=gen)
               .requires_grad_() for _ in range(3))
    out = flash_attn_func(q, k, v, causal=causal)
    torch.autograd.grad(out, (q, k, v), torch.randn_like(out))


def _key(variant: dict) -> tuple:
    return (variant["kernel"], tuple(sorted((k, str(v)) for k, v in variant["constants"].items())),
            variant["num_warps"], variant["num_stages"])


def _row(variant: dict, d: int, causal: bool) -> list:
    from ..kernels import configs

    c = variant["constants"]
    kind = KIND_OF.get(variant["kernel"])
    estimate = None
    if kind and all(name in c for name in ("BLOCK_M", "BLOCK_N", "BLOCK_D")) and variant["num_warps"]:
        cfg = configs.KernelConfig(int(c["BLOCK_M"]), int(c["BLOCK_N"]), int(variant["num_warps"]), 1)
        estimate = round(configs.tile_registers(kind, cfg, int(c["BLOCK_D"])))
    return [variant["kernel"], d, causal, c.get("BLOCK_M"), c.get("BLOCK_N"), c.get("BLOCK_D"), variant["num_warps"],
            variant["num_stages"], variant["shared_bytes"], variant["n_regs"], variant["n_spills"], estimate]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ringflash bench registers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--headdims", type=int, nargs="+", default=[64, 96, 128, 192, 256])
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--candidates", action="store_true",
                        help="compile every autotune candidate of each kernel, not only the table's choice")
    parser.add_argument("--csv", default=None, help="write the rows to this CSV file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("ringflash bench registers needs a CUDA GPU (the interpreter compiles no kernels)")
    from ..kernels import configs
    from .common import device_description, format_table, write_csv
    from .progress import progress_bar

    print(f"device: {device_description()}", flush=True)
    rows: list[list] = []
    cases = [(d, c) for d in args.headdims for c in (False, True)]
    for d, causal in progress_bar(cases, desc="registers"):
        seen = {_key(v) for v in compiled_variants()}  # each case lists only the variants it compiled
        configs_to_run: list[Optional[configs.KernelConfig]] = [None]
        if args.candidates:
            configs_to_run = list(dict.fromkeys(x for kind in configs.KINDS for x in configs.candidates(kind, d)))
        for cfg in configs_to_run:
            try:
                if cfg is None:
                    _run(d, args.seqlen, causal)
                else:
                    with configs.override(fwd=cfg, dkdv=cfg, dq=cfg):
                        _run(d, args.seqlen, causal)
            except Exception as exc:  # out of shared memory and the like: reported, not fatal
                print(f"d={d} causal={causal} {cfg}: {type(exc).__name__}: {exc}"[:200], flush=True)
        rows += [_row(v, d, causal) for v in compiled_variants() if _key(v) not in seen]
    print(format_table(COLUMNS, rows))
    spilling = [r for r in rows if r[COLUMNS.index("n_spills")]]
    print(f"\n{len(rows)} compiled variants, {len(spilling)} with spills"
          + ("".join(f"\n  {r[0]} d={r[1]} causal={r[2]} BLOCK_M={r[3]} BLOCK_N={r[4]} warps={r[6]}: "
                     f"{r[10]} bytes spilled, {r[9]} registers" for r in spilling)))
    if args.csv:
        write_csv(args.csv, COLUMNS, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
