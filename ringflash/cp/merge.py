"""The one merge of partial attention results used by every ring strategy.

Partial results over disjoint key sets combine through their logsumexps:
``lse = log(exp(lse_a) + exp(lse_b))`` and ``out = out_a * exp(lse_a - lse) +
out_b * exp(lse_b - lse)``. All in float32; a partial with lse = -inf (its rows saw no
key) has weight 0, and rows that no partial reached stay out = 0, lse = -inf.
"""

from __future__ import annotations

import torch


def merge_partial_(out_acc: torch.Tensor, lse_acc: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """In place: fold (out, lse) into (out_acc, lse_acc). out*: (n, nheads, d), lse*: (nheads, n), float32."""
    new = torch.logaddexp(lse_acc, lse)
    seen = new > float("-inf")
    w_acc = torch.where(seen, torch.exp(lse_acc - new), 0.0).t().unsqueeze(-1)
    w_new = torch.where(seen, torch.exp(lse - new), 0.0).t().unsqueeze(-1)
    out_acc.mul_(w_acc).add_(out * w_new)
    lse_acc.copy_(new)
