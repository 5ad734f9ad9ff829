"""ring-flash-attn-compatible functions inside the gloo processes of test_cp.py.

Local shards are cut here the way ring-flash-attn's own tests cut them (independently of
ringflash's Plan): ring = chunk r of W per sequence; zigzag = chunks r and 2W-1-r of 2W;
stripe = tokens t with t % W == r; llama3 = the r-th of W slices of the packed stream.
"""

from __future__ import annotations


def local_rows(layout: str, lengths, rank: int, world: int) -> list[int]:
    """Global packed-row indices of this rank's tokens, in local order."""
    rows, start = [], 0
    if layout == "llama3":
        total = sum(lengths)
        n = total // world
        return list(range(rank * n, (rank + 1) * n))
    for length in lengths:
        if layout == "ring":
            c = length // world
            rows += range(start + rank * c, start + (rank + 1) * c)
        elif layout == "zigzag":
            c = length // (2 * world)
            rows += range(start + rank * c, start + (rank + 1) * c)
            rows += range(start + (2 * world - 1 - rank) * c, start + (2 * world - rank) * c)
        elif layout == "stripe":
            rows += range(start + rank, start + length, world)
        start += length
    return rows


LAYOUT = {"ring": "ring", "zigzag_ring": "zigzag", "stripe": "stripe", "llama3": "llama3", "zigzag_llama3": "zigzag"}


def run_api_case(case, rank: int, world: int):
    import torch
    import torch.distributed as dist

    import ringflash
    from cp_cases import device, global_data

    dtype = getattr(torch, case.dtype)
    cu, q64, k64, v64, dout64 = global_data(case)
    lengths = list(case.lengths)
    name = case.api
    strategy = name.split("_flash_attn")[0]
    layout = LAYOUT[strategy]
    rows = torch.tensor(local_rows(layout, lengths, rank, world), device=device())
    q, k, v = (t[rows].to(dtype).requires_grad_() for t in (q64, k64, v64))
    dense = "varlen" not in name
    kw = dict(causal=case.causal, return_attn_probs=True)
    if dense:  # all sequences the same length: (batch, seqlen_local, nheads, d)
        b = len(lengths)
        shape = lambda t: t.view(b, -1, *t.shape[1:])  # noqa: E731
        args = [shape(q), shape(k), shape(v)]
    else:
        local_lens = [len(local_rows(layout, [n], rank, world)) for n in lengths]
        local_cu = torch.tensor([0] + torch.tensor(local_lens).cumsum(0).tolist(), dtype=torch.int32, device=device())
        if strategy == "llama3":
            cu_q, cu_k, max_q, max_k, kslice = ringflash.llama3_flash_attn_prepare_cu_seqlens(cu, case.causal, rank, world)
            args = [q, k, v, cu_q, cu_k, max_q, max_k, case.heads_k_stride or k.shape[1], kslice]
        elif strategy == "zigzag_llama3":
            args = [q, k, v, local_cu, cu, max(local_lens), max(lengths), case.heads_k_stride or k.shape[1], None]
            kw["mode"] = case.mode
        else:
            args = [q, k, v, local_cu, max(local_lens)]
    if name.endswith("_qkvpacked_func"):
        packed = torch.stack(args[:3], dim=-3).detach().requires_grad_()
        out, lse, _ = getattr(ringflash, name)(packed, *args[3:], **kw)
        leaves, grads_of = [packed], lambda g: g[0].unbind(-3)
    elif name.endswith("_kvpacked_func"):
        packed = torch.stack(args[1:3], dim=-3).detach().requires_grad_()
        out, lse, _ = getattr(ringflash, name)(args[0], packed, *args[3:], **kw)
        leaves, grads_of = [args[0], packed], lambda g: (g[0], *g[1].unbind(-3))
    else:
        out, lse, _ = getattr(ringflash, name)(*args, **kw)
        leaves, grads_of = args[:3], lambda g: g
    grads = grads_of(torch.autograd.grad(out, leaves, dout64[rows].to(dtype).view(out.shape)))
    flat = lambda t: t.reshape(-1, *t.shape[-2:])  # noqa: E731
    lse_rows = lse.permute(0, 2, 1).reshape(-1, lse.shape[1]) if dense else lse.t()
    local = [flat(out), lse_rows.contiguous(), *(flat(g) for g in grads)]
    assert all(g.dtype == dtype for g in grads)
    # Reassemble the global tensors from every rank's rows.
    all_rows = [torch.tensor(local_rows(layout, lengths, r, world), device=device()) for r in range(world)]
    gathered = []
    for t in local:
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        full = torch.empty((sum(lengths),) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
        for r, part in zip(all_rows, parts):
            full[r] = part
        gathered.append(full)
    gathered[1] = gathered[1].t()
    return gathered
