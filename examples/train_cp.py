"""Train a small Llama with context parallelism: ringflash + Hugging Face transformers + torchrun.

What it shows, end to end:

* a randomly initialised ``LlamaForCausalLM`` whose attention implementation is ringflash's
  (``attn_implementation = ringflash.integrations.hf.register()``);
* synthetic packed batches of documents of mixed lengths (many short ones, a few long
  ones, down to one token), whose tokens follow a simple learnable rule so that the loss
  visibly drops;
* one ``ringflash.cp.Plan`` per batch: every rank keeps only its share of the packed
  tokens (``plan.shard``) with their positions inside their documents
  (``plan.position_ids``), and inside ``context_parallel(plan)`` each attention call of
  the model attends across the ranks;
* the loss computed by hand on labels shifted on the *global* batch (the model's own
  ``labels=`` loss would shift inside the local shard, which is wrong once tokens are
  sharded), normalised by the global number of counted tokens, so that the per-rank losses
  and gradients are partial sums: an all-reduce (SUM) of the gradients gives exactly the
  single-process gradient, then every rank takes the same AdamW step;
* ``--check``: every rank also runs an identical copy of the model on the whole packed
  batch in one process (no context parallelism; ringflash's varlen attention recognises
  the packed documents from position ids that restart at 0), and the losses and gradient
  norms of the two must agree at every step, else the script exits non-zero. By default
  (``--check-mode lockstep``) the copy starts each step from the context-parallel model's
  parameters, so that each step is checked on its own and the tolerance does not depend on
  the run's length, and on the CPU every parameter's gradient is compared too (at
  initialisation the loss and the norm hardly depend on the attention: see TOLERANCES);
  ``--check-mode independent`` trains the copy with its own AdamW from
  the same initialisation (rounding differences then grow over the steps: use it for
  short runs).

CPU (gloo, Triton's interpreter; tiny sizes, float32)::

    torchrun --standalone --nproc-per-node 2 examples/train_cp.py --device cpu --steps 2 --check

GPU (NCCL, one GPU per rank; bf16 autocast by default)::

    torchrun --standalone --nproc-per-node 8 examples/train_cp.py --device cuda --steps 200 --check

Multi-node: the same script under ``torchrun --nnodes N --rdzv-backend c10d --rdzv-endpoint
HOST:PORT`` (see the README). A plain ``python examples/train_cp.py`` runs one rank.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE_INDEX = -100  # cross_entropy's default ignore_index: the label of each document's last token

STRATEGIES = ("zigzag_llama3", "llama3", "ring", "zigzag_ring", "stripe", "ulysses", "balanced", "auto")

# Small defaults per device. The CPU runs Triton's interpreter, which is slow: keep it tiny.
DEFAULTS = {
    "cpu": dict(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=64,
                tokens=160, dtype="float32", lr=3e-3),
    "cuda": dict(layers=4, hidden=512, heads=8, kv_heads=4, head_dim=64, intermediate=1536, vocab=1024,
                 tokens=16384, dtype="bfloat16", lr=1e-3),
}

# --check tolerances, relative, per (device, dtype): (loss, grad norm before clipping,
# gradient of each parameter tensor). The last compares each parameter's whole gradient
# (lockstep mode only, where both start the step from the same parameters): the loss and
# the total norm barely see the attention at initialisation (near-uniform attention gives
# a loss of about log(vocab) whatever the positions), so a bug in the rotary positions or
# in the attention's layout moved them by less than their tolerances (rel 8e-7 and 5e-4
# for position_ids counted along the local row), while it changed a k projection's gradient
# by 55% (rel 0.55; measured on the CPU at 96 tokens, against 3e-7 for a correct run).
# From the same parameters, the CP step and the single-process step perform the same
# arithmetic up to the order of floating-point sums (attention split across ranks and
# merged in float32, matmuls over fewer rows, gradients summed over ranks), so they differ
# by a few units of the dtype's rounding:
# * CPU float32: ieee matmuls everywhere; measured differences ~1e-7 (loss) and up to ~1e-6
#   (grad norm), so 1e-4 / 1e-3 leaves a wide margin while a real bug (a missing
#   all-reduce, a wrong shard) is off by 1e-1 or more.
# * GPU float32: looser, leaving room for tf32 matmuls (about 1e-3 relative per attention
#   output, README), which torch.set_float32_matmul_precision("high") turns on.
# * GPU bfloat16 (autocast): every matmul input is rounded to 8 mantissa bits (2**-9 ≈
#   2e-3 relative); the loss averages over many tokens, the gradient norm less so.
# The per-tensor gradient tolerance is None (not checked) on the GPU: it has not been
# measured there yet, and near-uniform attention's q/k gradients come out of cancelling
# sums that bf16 may round far more than the totals.
TOLERANCES = {
    ("cpu", "float32"): (1e-4, 1e-3, 1e-4),
    ("cuda", "float32"): (2e-3, 2e-2, None),
    ("cuda", "bfloat16"): (1e-2, 5e-2, None),
}


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 steps printed "check passed" having checked
    nothing; 0 tokens, heads or a short-max of 0 failed deep inside torch)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"got {value}; expected an integer >= 1")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"got {value}; expected a probability in [0, 1]")
    return value


def non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"got {value}; expected a number >= 0")
    return value


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu: gloo + Triton's interpreter; cuda: NCCL, one GPU per rank")
    p.add_argument("--strategy", choices=STRATEGIES, default="zigzag_llama3", help="context-parallel layout")
    p.add_argument("--steps", type=positive_int, default=20)
    p.add_argument("--tokens", type=positive_int, help="global tokens per packed batch")
    p.add_argument("--short-max", type=positive_int, default=16, help="short documents have 1..short-max tokens")
    p.add_argument("--long-frac", type=probability, default=0.2,
                   help="probability that a document is long (a quarter to all of the batch)")
    p.add_argument("--layers", type=positive_int)
    p.add_argument("--hidden", type=positive_int)
    p.add_argument("--heads", type=positive_int)
    p.add_argument("--kv-heads", type=positive_int)
    p.add_argument("--head-dim", type=positive_int)
    p.add_argument("--intermediate", type=positive_int)
    p.add_argument("--vocab", type=positive_int)
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="bfloat16: autocast with float32 parameters (GPU only: the interpreter's bf16 is wrong)")
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip", type=non_negative, default=1.0, help="max gradient norm; 0 disables clipping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true",
                   help="also run a copy without context parallelism and compare every step")
    p.add_argument("--check-mode", choices=("lockstep", "independent"), default="lockstep",
                   help="lockstep: the copy starts each step from the CP model's parameters; "
                        "independent: it trains on its own from the same initialisation")
    # For tests/test_examples.py: break the CP step on purpose, so --check must fail.
    # allreduce: skip the gradient all-reduce; positions: position ids counted along the
    # local row (0, 1, 2, ...) instead of the plan's positions inside the documents.
    p.add_argument("--break-for-test", nargs="?", const="allreduce", choices=("allreduce", "positions"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name, value in DEFAULTS[args.device].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.device == "cpu" and args.dtype != "float32":
        p.error("--dtype bfloat16 needs --device cuda (Triton's interpreter computes bf16 dots wrongly)")
    if args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    return args


# -- synthetic data ---------------------------------------------------------------------


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (total,) int64: the documents one after another
    labels: torch.Tensor  # (total,) int64: the next token, IGNORE_INDEX at each document's end
    cu_seqlens: torch.Tensor  # (documents + 1,) int32: document boundaries
    position_ids: torch.Tensor  # (total,) int64: position inside the document (restarts at 0)
    num_counted: int  # tokens that carry a label: total - documents

    @property
    def total(self) -> int:
        return self.input_ids.numel()


def _randint(gen: torch.Generator, low: int, high: int) -> int:
    """Uniform in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=gen))


def document_lengths(gen: torch.Generator, total: int, short_max: int, long_frac: float) -> list[int]:
    """Lengths that fill exactly ``total`` tokens: a mixture of short documents (1 to
    short_max tokens, single-token ones included since they are the awkward case for
    chunking) and long ones (a quarter to all of the batch), the last one cut to fit."""
    lengths: list[int] = []
    left = total
    while left > 0:
        if float(torch.rand((), generator=gen)) < long_frac:
            n = _randint(gen, max(1, total // 4), total)
        else:
            n = _randint(gen, 1, short_max)
        lengths.append(min(n, left))
        left -= lengths[-1]
    return lengths


def make_batch(gen: torch.Generator, args: argparse.Namespace, device: torch.device) -> PackedBatch:
    """One global packed batch. Every rank calls this with an identically seeded generator,
    so every rank holds the same batch without communication.

    Each document is an arithmetic progression modulo the vocabulary, with a random start
    and a random stride in 1..4: the first token is unpredictable, the second one a
    quarter guess, every later one a function of the two before it. A model learns it in
    a few dozen steps, and only by attending to earlier tokens, so the loss tells whether
    attention across the ranks' chunks works."""
    lengths = document_lengths(gen, args.tokens, args.short_max, args.long_frac)
    docs = []
    for n in lengths:
        start, stride = _randint(gen, 0, args.vocab - 1), _randint(gen, 1, 4)
        docs.append((start + stride * torch.arange(n)) % args.vocab)
    input_ids = torch.cat(docs)
    cu = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)
    # Shift on the global batch: label t is token t + 1, except where t + 1 starts the next
    # document (or is past the end).
    labels = torch.roll(input_ids, -1)
    labels[cu[1:] - 1] = IGNORE_INDEX
    position_ids = torch.cat([torch.arange(n) for n in lengths])
    return PackedBatch(input_ids.to(device), labels.to(device), cu.to(torch.int32).to(device),
                       position_ids.to(device), num_counted=args.tokens - len(lengths))


# -- model and training pieces ------------------------------------------------------------


def build_model(args: argparse.Namespace, attn_implementation: str, device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, max_position_embeddings=max(args.tokens, 64), use_cache=False,
    )
    # The same seed on every rank: identical initial parameters, no broadcast needed.
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(device)
    model.set_attn_implementation(attn_implementation)
    return model.train()


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, num_counted: int) -> torch.Tensor:
    """Sum of the cross-entropies of these tokens over the GLOBAL number of counted tokens:
    summed over the ranks it is the mean over the whole batch, and so are its gradients."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum") / num_counted


def flat_grads(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """All gradients in one buffer: one collective per step instead of one per tensor."""
    return torch.cat([p.grad.reshape(-1) for p in params])


def unflatten_into_grads(flat: torch.Tensor, params: list[torch.nn.Parameter]) -> None:
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset: offset + n].view_as(p.grad))
        offset += n


def grad_norm_then_clip(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """The total gradient norm before clipping; clips in place when max_norm > 0."""
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))


def sync(device: torch.device) -> None:
    """Wait for the GPU, so that wall-clock times measure the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StepResult:
    loss: float  # global mean token loss
    grad_norm: float  # before clipping
    seconds: float
    grads: Optional[torch.Tensor] = None  # --check: all parameters' gradients, flat, before clipping


def cp_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: PackedBatch, args: argparse.Namespace,
            group: dist.ProcessGroup, autocast: Callable[[], contextlib.AbstractContextManager]) -> StepResult:
    """One context-parallel training step on this rank's share of ``batch``."""
    from ringflash.cp import Plan
    from ringflash.integrations.hf import context_parallel

    sync(batch.input_ids.device)
    start = time.perf_counter()
    # One plan per batch: it reads the document lengths once and checks collectively that
    # every rank passed the same ones.
    plan = Plan(batch.cu_seqlens, group, strategy=args.strategy)
    if min(plan.num_local) == 0:
        # transformers cannot run an empty row (its mask preparation indexes the last
        # position id): the rank failed alone with an IndexError deep inside the model. Every
        # rank sees the same plan, so all stop here together.
        raise SystemExit(f"strategy {plan.strategy}: a rank holds no tokens of this batch ({batch.total} tokens in "
                         f"{batch.cu_seqlens.numel() - 1} documents, tokens per rank {plan.num_local}); "
                         "expected every rank to hold some: use more --tokens or fewer ranks")
    input_ids = plan.shard(batch.input_ids)
    labels = plan.shard(batch.labels)  # shifted globally above, then sharded like the inputs
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=False)
    with context_parallel(plan), autocast():
        # A batch of one row: this rank's tokens, with their positions inside their
        # documents (for the rotary embeddings; the documents themselves come from the plan).
        position_ids = plan.position_ids
        if args.break_for_test == "positions":
            position_ids = torch.arange(input_ids.numel(), device=input_ids.device)
        logits = model(input_ids[None], position_ids=position_ids[None]).logits[0]
    loss = token_loss_sum(logits, labels, batch.num_counted)
    loss.backward()
    # Every rank holds a partial sum of the gradient (its tokens' losses; attention's
    # backward already returned the K/V gradients to the ranks that own those tokens).
    flat = flat_grads(params)
    if args.break_for_test != "allreduce":
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        unflatten_into_grads(flat, params)
    grad_norm = grad_norm_then_clip(params, args.clip)  # clips p.grad, not flat (a copy)
    optimizer.step()
    total_loss = loss.detach().clone()
    dist.all_reduce(total_loss, op=dist.ReduceOp.SUM, group=group)
    loss_value = float(total_loss)  # also waits for the GPU
    return StepResult(loss_value, grad_norm, time.perf_counter() - start, flat if args.check else None)


def single_process_step(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], batch: PackedBatch,
                        args: argparse.Namespace,
                        autocast: Callable[[], contextlib.AbstractContextManager]) -> StepResult:
    """The same step without context parallelism: the whole packed batch in this process.
    Position ids that restart at 0 make ringflash's attention treat the row as packed
    documents (varlen attention, no attention across documents). Without an optimizer
    it only measures (lockstep mode)."""
    start = time.perf_counter()
    model.zero_grad(set_to_none=False)
    with autocast():
        logits = model(batch.input_ids[None], position_ids=batch.position_ids[None]).logits[0]
    loss = token_loss_sum(logits, batch.labels, batch.num_counted)
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = flat_grads(params)  # before clipping
    grad_norm = grad_norm_then_clip(params, args.clip)
    if optimizer is not None:
        optimizer.step()
    return StepResult(float(loss.detach()), grad_norm, time.perf_counter() - start, grads)


@torch.no_grad()
def copy_parameters(source: torch.nn.Module, target: torch.nn.Module) -> None:
    for src, dst in zip(source.parameters(), target.parameters()):
        dst.copy_(src)


def relative_difference(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def worst_gradient_difference(grads: torch.Tensor, reference: torch.Tensor,
                              named: list[tuple[str, torch.nn.Parameter]]) -> tuple[float, str]:
    """The largest relative difference ||g - g_ref|| / ||g_ref|| over the parameter tensors
    (flat gradients, as flat_grads lays them out), and that parameter's name."""
    worst, worst_name, offset = -1.0, "", 0
    for name, p in named:
        n = p.numel()
        a, b = grads[offset: offset + n].double(), reference[offset: offset + n].double()
        offset += n
        d = float(torch.linalg.vector_norm(a - b)) / max(float(torch.linalg.vector_norm(b)), 1e-30)
        if not d <= worst:  # NaN wins
            worst, worst_name = d, name
    return worst, worst_name


def parameters_agree_across_ranks(model: torch.nn.Module, group: dist.ProcessGroup, device: torch.device) -> bool:
    """Cheap check that every rank still holds the same parameters: per-tensor float64
    sums, compared through an all-reduce MAX and MIN."""
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()]).to(device)
    high, low = sums.clone(), sums.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    return bool(torch.equal(high, low))


def any_rank(flag: bool, group: dist.ProcessGroup, device: torch.device) -> bool:
    """True on every rank if it is true on any, so that all ranks stop together."""
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


# -- process set-up -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device_kind: str) -> tuple[int, int, torch.device]:
    """init_process_group from torchrun's environment (or a one-rank group when run with
    plain python); returns (rank, world size, this rank's device)."""
    if "RANK" not in os.environ:  # not under torchrun: a group of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_kind == "cuda":
        # NCCL's kernels on a high-priority stream, so that the K/V all-gathers overlap an
        # attention kernel that fills the GPU instead of waiting for it (see the README).
        os.environ.setdefault("TORCH_NCCL_HIGH_PRIORITY", "1")
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs: "
                             "run one process per GPU (--nproc-per-node <= GPU count)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def progress(iterable: Iterable[int], total: int, enabled: bool):
    """A tqdm bar on rank 0 (plain iteration if tqdm is missing)."""
    try:
        from tqdm import tqdm
    except ImportError:
        if enabled:
            print("(install tqdm for a progress bar)", file=sys.stderr)
        return iterable, print
    bar = tqdm(iterable, total=total, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)
    return bar, tqdm.write  # tqdm.write prints above the bar instead of through it


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        # Triton runs kernels on CPU tensors only in its interpreter, chosen before any
        # kernel is defined, i.e. before ringflash is imported (ringflash turns it on by
        # itself only when there is no GPU at all).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import ringflash.integrations.hf as rf_hf

    rank, world_size, device = init_distributed(args.device)
    group = dist.group.WORLD
    is_main = rank == 0
    dtype = getattr(torch, args.dtype)

    def autocast() -> contextlib.AbstractContextManager:
        # bf16 compute, float32 parameters, gradients and optimizer state.
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    attn = rf_hf.register()
    model = build_model(args, attn, device)
    optimizer = make_optimizer(model, args)
    reference = reference_optimizer = None
    if args.check:
        reference = copy.deepcopy(model)  # same initial weights; runs without context parallelism
        if args.check_mode == "independent":
            reference_optimizer = make_optimizer(reference, args)
    loss_tol, norm_tol, grad_tol = TOLERANCES[(args.device, args.dtype)]
    if args.check_mode != "lockstep":
        grad_tol = None  # the copy's parameters drift from the CP model's over the steps
    named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    if is_main:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"ringflash train_cp: {world_size} rank(s), {args.device} ({dist.get_backend()}), {args.dtype}, "
              f"strategy {args.strategy}, {n_params / 1e6:.2f}M parameters, {args.tokens} tokens per batch "
              f"(~{math.ceil(args.tokens / world_size)} per rank)", flush=True)
    gen = torch.Generator().manual_seed(args.seed + 1)  # data: the same stream on every rank
    steps, write = progress(range(args.steps), args.steps, is_main)
    first_loss = last_loss = float("nan")
    failure = ""
    for step in steps:
        batch = make_batch(gen, args, device)
        if reference is not None and args.check_mode == "lockstep":
            copy_parameters(model, reference)  # before the CP step updates the model
        result = cp_step(model, optimizer, batch, args, group, autocast)
        tokens_per_s = batch.total / result.seconds  # the CP step alone (the check's copy is not timed)
        line = (f"step {step + 1}/{args.steps}  loss {result.loss:.4f}  grad norm {result.grad_norm:.4f}  "
                f"tokens/s {tokens_per_s:,.0f}  docs {batch.cu_seqlens.numel() - 1}")
        if args.check:
            ref = single_process_step(reference, reference_optimizer, batch, args, autocast)
            d_loss = relative_difference(result.loss, ref.loss)
            d_norm = relative_difference(result.grad_norm, ref.grad_norm)
            line += (f"  | single-process loss {ref.loss:.4f} (rel {d_loss:.1e}), "
                     f"grad norm {ref.grad_norm:.4f} (rel {d_norm:.1e})")
            d_grad, grad_name = 0.0, ""
            if grad_tol is not None:
                d_grad, grad_name = worst_gradient_difference(result.grads, ref.grads, named_params)
                line += f", gradients (worst rel {d_grad:.1e}, {grad_name})"
            # Written as "not within" so that a NaN anywhere fails too.
            if not (d_loss <= loss_tol and d_norm <= norm_tol and (grad_tol is None or d_grad <= grad_tol)):
                failure = (f"check FAILED at step {step + 1}: context-parallel loss {result.loss:.6f} vs "
                           f"single-process {ref.loss:.6f} (rel diff {d_loss:.2e}, tolerance {loss_tol:g}); "
                           f"grad norm {result.grad_norm:.6f} vs {ref.grad_norm:.6f} "
                           f"(rel diff {d_norm:.2e}, tolerance {norm_tol:g})")
                if grad_tol is not None:
                    failure += (f"; gradient of {grad_name}: rel diff {d_grad:.2e}, tolerance {grad_tol:g} "
                                "(the worst parameter)")
        if is_main:
            write(line)
            if hasattr(steps, "set_postfix"):
                steps.set_postfix(loss=f"{result.loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
        first_loss = result.loss if step == 0 else first_loss
        last_loss = result.loss
        # Every rank computes the same verdict; agreeing on it anyway costs one tiny
        # all-reduce and guarantees that no rank waits in a collective for one that quit.
        if any_rank(bool(failure), group, device):
            failure = failure or f"check FAILED at step {step + 1} on another rank"
            break
    if hasattr(steps, "close"):
        steps.close()

    if not failure and args.check and not parameters_agree_across_ranks(model, group, device):
        failure = "check FAILED: the ranks' parameters differ after training (they must stay identical)"
    status = 0
    if failure:
        if is_main:
            print(failure, file=sys.stderr, flush=True)
        status = 1
    elif is_main:
        print(f"loss {first_loss:.4f} -> {last_loss:.4f} over {args.steps} steps", flush=True)
        if args.check:
            grads = "" if grad_tol is None else f", every parameter's gradient within rel {grad_tol:g}"
            print(f"check passed: {args.steps} steps, context parallel over {world_size} rank(s) matches one "
                  f"process ({args.check_mode}; loss within rel {loss_tol:g}, grad norm within rel {norm_tol:g}"
                  f"{grads})", flush=True)
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
