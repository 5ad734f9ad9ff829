"""Accuracy checks used by the tests, the GPU checks and ``ringflash demo``.

Every comparison is against a float64 reference and fails hard (AssertionError): no
retries, no warnings. Two kinds of bound:

* ``rel_tol``: norm-wise relative error ``||actual - ref|| / ||ref||``; a max-abs error
  under ``atol`` also passes, for references that are exactly zero (dq of a row that
  sees a single key).
* ``baseline``: the same quantity computed by PyTorch in the dtype under test; the
  kernel passes if its max-abs error is at most ``factor`` times the baseline's
  max-abs error plus ``atol``.

Infinite reference entries (lse of rows that see no key) must be matched exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class ErrorStats:
    max_abs: float
    rel: float

    def __str__(self) -> str:
        return f"max_abs={self.max_abs:.3e} rel={self.rel:.3e}"


def error_stats(actual: torch.Tensor, reference: torch.Tensor) -> ErrorStats:
    """Max-abs and norm-wise relative error over the finite entries of ``reference``."""
    if actual.shape != reference.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} differs from the reference's {tuple(reference.shape)}")
    a = actual.detach().to(device="cpu", dtype=torch.float64)
    r = reference.detach().to(device="cpu", dtype=torch.float64)
    finite = torch.isfinite(r)
    if a.isnan().any():
        return ErrorStats(float("nan"), float("nan"))
    if not torch.equal(a[~finite], r[~finite]):
        return ErrorStats(float("inf"), float("inf"))
    diff = (a[finite] - r[finite]).abs()
    if diff.numel() == 0:
        return ErrorStats(0.0, 0.0)
    max_abs = diff.max().item()
    norm = r[finite].norm().item()
    rel = diff.norm().item() / norm if norm > 0 else (0.0 if max_abs == 0 else float("inf"))
    return ErrorStats(max_abs, rel)


def assert_close(
    name: str,
    actual: torch.Tensor,
    reference: torch.Tensor,
    *,
    rel_tol: Optional[float] = None,
    baseline: Optional[torch.Tensor] = None,
    factor: float = 2.0,
    atol: float = 1e-5,
) -> ErrorStats:
    """Fail unless ``actual`` is close to the float64 ``reference`` (see module doc). Returns the stats."""
    if rel_tol is None and baseline is None:
        raise ValueError("assert_close: give rel_tol, baseline or both")
    stats = error_stats(actual, reference)
    problems = []
    if not stats.max_abs == stats.max_abs:  # NaN
        problems.append("NaN in result")
    elif stats.max_abs == float("inf"):
        problems.append("infinite entries do not match the reference (or a finite one became infinite)")
    if rel_tol is not None and not (stats.rel <= rel_tol or stats.max_abs <= atol):
        problems.append(f"rel {stats.rel:.3e} > rel_tol {rel_tol:.1e}")
    if baseline is not None:
        base = error_stats(baseline, reference)
        bound = factor * base.max_abs + atol
        # A baseline that overflowed (inf where the reference is finite: fp16 scores past
        # 65504) sets no bound; an infinite one would pass any finite result.
        if not math.isfinite(base.max_abs):
            problems.append(f"the baseline's error is {base.max_abs}: it sets no bound")
        elif not stats.max_abs <= bound:
            problems.append(f"max_abs {stats.max_abs:.3e} > {factor} * baseline {base.max_abs:.3e} + {atol:.1e}")
    if problems:
        raise AssertionError(f"{name}: {stats}: " + "; ".join(problems))
    return stats
