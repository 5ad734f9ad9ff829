"""``flash_attn.bert_padding``: moving between padded (batch, seqlen, ...) tensors and the
packed (total_tokens, ...) layout of the varlen functions, in plain PyTorch (autograd works
through all three)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["index_first_axis", "pad_input", "unpad_input"]


def index_first_axis(input: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``input[indices]`` along the first axis: (first_axis_dim, ...) -> (len(indices), ...)."""
    return input[indices]


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor, unused_mask=None):
    """Pack the tokens of a padded batch, as flash-attn 2.8's ``unpad_input``.

    Args:
        hidden_states: (batch, seqlen, ...).
        attention_mask: (batch, seqlen), bool or int; nonzero = a token in use.
        unused_mask: optional (batch, seqlen): tokens packed too but not counted as used.
    Returns:
        (packed (total, ...), indices (total,) int64 into the flattened batch * seqlen,
        cu_seqlens (batch + 1,) int32, max_seqlen (int), seqused (batch,) int32 = the
        ``attention_mask`` tokens of each sequence).
    """
    all_masks = (attention_mask + unused_mask) if unused_mask is not None else attention_mask
    seqlens = all_masks.sum(dim=-1, dtype=torch.int32)
    seqused = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(all_masks.flatten(), as_tuple=False).flatten()
    max_seqlen = int(seqlens.max().item()) if seqlens.numel() else 0
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    packed = index_first_axis(hidden_states.reshape(-1, *hidden_states.shape[2:]), indices)
    return packed, indices, cu_seqlens, max_seqlen, seqused


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """The inverse of ``unpad_input``: (total, ...) at ``indices`` -> (batch, seqlen, ...),
    zeros elsewhere."""
    flat = hidden_states.new_zeros((batch * seqlen, *hidden_states.shape[1:]))
    flat = flat.index_put((indices,), hidden_states)
    return flat.reshape(batch, seqlen, *hidden_states.shape[1:])
