"""``ringflash bench hf`` (issue 15's end-to-end bar): training steps of a transformers
Llama with ringflash as its attention against transformers' SDPA attention.

Model (GPU): ``LlamaForCausalLM`` with random weights, 8 layers, hidden 2048, 16 query heads
over 4 KV heads (d=128), intermediate 5632, vocab 32000, bf16, batch 1. One step = forward
with ``labels`` (transformers' cross-entropy) + backward, gradients zeroed before it, no
optimizer (its time does not depend on the attention).

Variants, on one model (``set_attn_implementation`` between them, so the weights are the same):

* ``ringattn``: ``ringflash.integrations.hf.register()``;
* ``ringattn_atomic`` / ``ringattn_split``: the same under ``RINGFLASH_BACKWARD=atomic`` (the
  5-GEMM backward) / ``RINGFLASH_DKV_SPLITS=auto`` (several dK/dV programs share a
  key block when the grid underfills the GPU, as this model's 4 KV heads at batch 1 do),
  the backward choices that wait for a GPU measurement;
* ``ringattn_sm90``: the same under ``RINGFLASH_BACKEND=sm90``: the Gluon Hopper kernels
  (``kernels.sm90``), the backward included, for every call in their scope;
* ``sdpa``: transformers' "sdpa", PyTorch choosing the backend;
* ``sdpa_fa2``: "sdpa" inside ``sdpa_kernel(SDPBackend.FLASH_ATTENTION)``.

Cases: dense rows of 4k and 16k tokens, and a packed row of 16k tokens of mixed document
lengths (a seeded mix, 128..8192 tokens) with ``position_ids`` restarting at 0 per document.
Packed, each variant gets the input that gives correct attention (no token attending
across documents) by its fastest route:

* ``ringattn``: the one row and its ``position_ids`` (varlen kernels, no mask);
* ``sdpa``: the one row with a 4D boolean block-diagonal causal mask (transformers passes a
  4D mask to SDPA as is; SDPA then runs a masked kernel over the whole 16k x 16k, which is
  what one-row packing costs with SDPA);
* ``sdpa_fa2``: FA2 takes no mask, so one forward+backward per document, the gradients
  accumulating (the linear layers then run on shorter rows).

On a GPU each case is timed in two rounds over the variants, the second in the reverse
order, each cell its faster round (``GPU_ROUNDS``). The report gives step times, tokens/s and
the speed ratios (baseline step time / ringattn's; > 1: ringattn faster), and the loss of
each variant's kept round as a guard (ringattn and sdpa compute the same loss; the
per-document variant sums per-document means).

``--device cpu --quick`` runs a 2-layer toy model at 64 tokens (float32, Triton
interpreted) to check the plumbing. ``--out DIR`` writes hf.csv, hf.md and hf_step_time.png;
``--from-csv`` redraws them. Needs transformers >= 4.53 (``pip install ringflash[hf]``);
without it every row is "unsupported".
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .common import device_description, free_memory
from .harness import (
    interruptible, publish, redraw,
    BASE_COLUMNS, add_device_options, cell, classify_failure, cpu_threads, environ, fmt_ratio, index_rows,
    make_timer, not_measured, ordered, resolve_device, rows_device_timer, run_timed, speed_ratio, table,
)
from .progress import progress_bar, show, write

NAME = "hf"
COLUMNS = BASE_COLUMNS + ["tokens_per_s", "loss", "tokens", "docs", "layers", "hidden", "heads", "kv_heads", "dtype"]
#: ringflash variants: the environment each one's steps run under.
RING_VARIANTS = {
    "ringattn": {},
    "ringattn_atomic": {"RINGFLASH_BACKWARD": "atomic"},
    "ringattn_split": {"RINGFLASH_DKV_SPLITS": "auto"},
    "ringattn_sm90": {"RINGFLASH_BACKEND": "sm90"},
}
VARIANTS = (*RING_VARIANTS, "sdpa", "sdpa_fa2")
VARIANT_DESCRIPTIONS = {
    "ringattn": "attn_implementation from ringflash.integrations.hf.register()",
    "ringattn_atomic": "ringattn under RINGFLASH_BACKWARD=atomic",
    "ringattn_split": "ringattn under RINGFLASH_DKV_SPLITS=auto",
    "ringattn_sm90": "ringattn under RINGFLASH_BACKEND=sm90 (the Gluon Hopper forward and backward where in scope)",
    "sdpa": "transformers' \"sdpa\", PyTorch's backend choice (packed: a 4D block-diagonal causal mask)",
    "sdpa_fa2": "\"sdpa\" inside sdpa_kernel(SDPBackend.FLASH_ATTENTION) (packed: one run per document)",
}

GPU_MODEL = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                 num_attention_heads=16, num_key_value_heads=4)
CPU_MODEL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)


@dataclass(frozen=True)
class Case:
    tokens: int
    lengths: tuple = ()  # packed document lengths; empty for a dense row

    @property
    def name(self) -> str:
        n = f"{self.tokens // 1024}k" if self.tokens % 1024 == 0 else str(self.tokens)
        return f"packed {n} ({len(self.lengths)} docs)" if self.lengths else f"dense {n}"


def packed_lengths(tokens: int) -> tuple:
    """A seeded mix of document lengths (tokens/128 .. tokens/2; on the CPU's 64 tokens, 8 ..
    32), each of at least 2 tokens so that every document has a next-token label."""
    from .kernels_wide import pack_lengths

    return tuple(pack_lengths("random", tokens, seed=0, min_len=max(2, tokens // 8 if tokens < 1024 else 2)))


def build_cases(device: str, quick: bool) -> list[Case]:
    if device == "cpu":
        return [Case(64), Case(64, packed_lengths(64))]
    if quick:
        return [Case(4096), Case(4096, packed_lengths(4096))]
    return [Case(4096), Case(16384), Case(16384, packed_lengths(16384))]


def build_model(sizes: dict, max_tokens: int, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**sizes, max_position_embeddings=max(max_tokens, 2048), attention_dropout=0.0)
    torch.manual_seed(0)
    # Parameters made on the device in their dtype, as from_pretrained(dtype=...) does (the
    # default dtype during construction), so that buffers built in float32 on purpose (the
    # rotary inv_freq) stay float32; ~0.5 B parameters are initialised on the GPU.
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(saved)
    return model.train()


def make_batch(case: Case, vocab: int, device: str) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab, (1, case.tokens), generator=gen).to(device)
    batch = dict(ids=ids)
    if case.lengths:
        pos = torch.cat([torch.arange(n) for n in case.lengths]).to(device)[None]
        doc = torch.repeat_interleave(torch.arange(len(case.lengths)), torch.tensor(case.lengths)).to(device)
        causal = torch.ones(case.tokens, case.tokens, dtype=torch.bool, device=device).tril()
        batch.update(position_ids=pos, mask4d=((doc[:, None] == doc[None, :]) & causal)[None, None])
    return batch


def step_fn(model, case: Case, batch: dict, variant: str, last: dict) -> Callable[[], torch.Tensor]:
    """One training step (zero grads, forward with labels, backward); returns the loss and
    keeps it in ``last["loss"]`` (no host sync inside the step)."""
    ids = batch["ids"]

    def run(**kwargs) -> torch.Tensor:
        out = model(use_cache=False, **kwargs)
        out.loss.backward()
        last["loss"] = out.loss.detach()
        return last["loss"]

    if not case.lengths:
        def step():
            model.zero_grad(set_to_none=True)
            return run(input_ids=ids, labels=ids)
    elif variant in RING_VARIANTS:
        def step():
            model.zero_grad(set_to_none=True)
            return run(input_ids=ids, labels=ids, position_ids=batch["position_ids"])
    elif variant == "sdpa":
        def step():
            model.zero_grad(set_to_none=True)
            return run(input_ids=ids, labels=ids, position_ids=batch["position_ids"],
                       attention_mask=batch["mask4d"])
    else:  # one run per document
        starts = [0]
        for n in case.lengths:
            starts.append(starts[-1] + n)

        def step():
            model.zero_grad(set_to_none=True)
            total = None
            for a, b in zip(starts, starts[1:]):
                doc = ids[:, a:b]
                loss = run(input_ids=doc, labels=doc)
                total = loss if total is None else total + loss
            last["loss"] = total
            return total
    return step


def _backend_ctx(variant: str):
    if variant in RING_VARIANTS:
        return environ(**RING_VARIANTS[variant])
    if variant != "sdpa_fa2":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


#: Rounds of timing per case on a GPU: every variant once per round, the second round in
#: the reverse order, each cell its faster round. Run 55 (H100) timed the dense 4k step
#: at 39.1 ms for ``ringattn``, the first variant timed, and at 36.7 and 37.0 ms for
#: ``ringattn_sm90`` and ``ringattn_split``, which run the same kernels in that case: one
#: round's order moved the 4k ratio to sdpa by about 6% (the wide grid's small cases
#: showed the same, run 39).
GPU_ROUNDS = 2


def run_all(cases: Sequence[Case], device: str, timer, timer_name: str, device_name: str, bar,
            rows: list[dict], rounds: int = 1) -> list[dict]:
    """Append one row per (case, variant) to ``rows`` (as each case finishes, so that an
    interrupted run keeps the cases done) and return it. Each case is timed in ``rounds``
    rounds (every other one in the reverse order), each row keeping its variant's fastest."""
    sizes = CPU_MODEL if device == "cpu" else GPU_MODEL
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    base = dict(layers=sizes["num_hidden_layers"], hidden=sizes["hidden_size"], heads=sizes["num_attention_heads"],
                kv_heads=sizes["num_key_value_heads"], dtype=str(dtype).removeprefix("torch."), timer=timer_name,
                device=device_name)

    def add(case: Case, variant: str, ms, status, note="", loss=None):
        rows.append(dict(base, case=case.name, impl=variant, **{"pass": "step"}, ms=ms, status=status, note=note,
                         tokens_per_s=case.tokens / (ms / 1e3) if ms else None, loss=loss, tokens=case.tokens,
                         docs=len(case.lengths) or 1))

    try:
        import ringflash.integrations.hf as rf_hf

        name = rf_hf.register()
        model = build_model(sizes, max(c.tokens for c in cases), device, dtype)
    except Exception as exc:  # transformers missing or too old: every cell says so
        status = classify_failure(exc)
        if isinstance(exc, ImportError):
            status = f"unsupported: {' '.join(str(exc).split())[:160]}"
        for case in cases:
            for v in VARIANTS:
                add(case, v, None, status)
            bar.update(1)
        return rows
    attn = {**{v: name for v in RING_VARIANTS}, "sdpa": "sdpa", "sdpa_fa2": "sdpa"}
    notes = {**{v: "packed: position_ids restarting at 0" for v in RING_VARIANTS},
             "sdpa": "packed: 4D block-diagonal causal mask", "sdpa_fa2": "packed: one forward+backward per document"}
    for case in cases:
        show(bar, case.name)
        try:
            batch = make_batch(case, sizes["vocab_size"], device)
        except Exception as exc:  # the 4D mask of a long packed row may not fit
            for variant in VARIANTS:
                add(case, variant, None, classify_failure(exc))
            bar.update(1)
            continue
        best: dict[str, tuple] = {}  # variant -> (ms, status, loss) of its faster round
        for round_index in range(rounds):
            for variant in (VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]):
                if round_index and best[variant][0] is None:
                    continue  # failed in the first round: recorded once
                last: dict = {}
                try:
                    model.set_attn_implementation(attn[variant])
                    step = step_fn(model, case, batch, variant, last)
                    # do_bench's first call (untimed) compiles ringflash's kernels on the GPU.
                    with _backend_ctx(variant):
                        ms, status = run_timed(timer, step, device)
                except Exception as exc:  # recorded; the other variants go on
                    ms, status = None, classify_failure(exc)
                # The loss of the last step, as a guard (no optimizer: every step's loss is the same).
                loss = float(last["loss"]) if status == "ok" and "loss" in last else None
                model.zero_grad(set_to_none=True)
                if device == "cuda":
                    free_memory()
                write(f"  {case.name} {variant} (round {round_index + 1}): "
                      + (f"{ms:.1f} ms/step" + (f", loss {loss:.4f}" if loss is not None else "") if ms else status))
                kept = best.get(variant)
                if kept is None or (ms is not None and ms < kept[0]):
                    best[variant] = (ms, status, loss)
        for variant in VARIANTS:
            add(case, variant, *best[variant][:2], notes[variant] if case.lengths else "", best[variant][2])
        del batch
        bar.update(1)
    return rows


# --- report --------------------------------------------------------------------------------


def markdown_report(rows: Sequence[dict], notes: Sequence[str] = ()) -> str:
    if not rows:
        return "# ringflash bench hf\n\nNo results.\n"
    devices, timers = rows_device_timer(rows)
    index = index_rows(rows)
    cases = ordered(str(r["case"]) for r in rows)
    variants = ordered((str(r["impl"]) for r in rows), VARIANTS)
    r0 = rows[0]
    out = ["# ringflash bench hf", "",
           f"- Device: {devices}",
           f"- Timer: {timers}; milliseconds per training step (forward with labels + backward, no optimizer)",
           f"- Model: LlamaForCausalLM, random weights, {r0.get('layers')} layers, hidden {r0.get('hidden')}, "
           f"{r0.get('heads')}/{r0.get('kv_heads')} heads, {r0.get('dtype')}, batch 1",
           "- Variants: " + "; ".join(f"`{v}` = {VARIANT_DESCRIPTIONS.get(v, v)}" for v in variants),
           "- Speed ratios: the variant's step time / ringattn's (> 1: ringattn faster)"]
    losses = []
    for c in cases:
        a, b = index.get((c, "ringattn", "step")), index.get((c, "sdpa", "step"))
        if a and b and isinstance(a.get("loss"), float) and isinstance(b.get("loss"), float):
            losses.append(f"{c}: {a['loss']:.4f} vs {b['loss']:.4f}")
    if losses:
        out.append("- Guard, first-step loss ringattn vs sdpa: " + "; ".join(losses))
    out += [f"- {n}" for n in notes]
    ms = [[c] + [cell(index.get((c, v, "step"))) for v in variants] for c in cases]
    tps = [[c] + [cell(index.get((c, v, "step")), "tokens_per_s", lambda x: f"{x:,.0f}") for v in variants]
           for c in cases]
    out += ["", "## Step time (ms)", "", table(["case"] + variants, ms),
            "", "## Tokens per second", "", table(["case"] + variants, tps)]
    missing = not_measured(rows)
    if missing:
        out += ["", "## Not measured", ""] + missing
    others = [v for v in variants if v != "ringattn"]
    ratios = [[c] + [fmt_ratio(speed_ratio(index, c, "ringattn", v, "step")) for v in others] for c in cases]
    out += ["", "## Speed ratios (variant step time / ringattn step time; > 1: ringattn faster)", "",
            table(["case"] + [f"ringattn vs {v}" for v in others], ratios)]
    return "\n".join(out) + "\n"


def plot_steps(rows: Sequence[dict], prefix: str) -> str:
    from .plots import BarPanel, ratio_bars

    index = index_rows(rows)
    cases = ordered(str(r["case"]) for r in rows)
    variants = ordered((str(r["impl"]) for r in rows), VARIANTS)
    others = [v for v in variants if v != "ringattn"]
    panels = [BarPanel("speed ratio", cases, {f"ringattn vs {v}": [speed_ratio(index, c, "ringattn", v, "step")
                                                                  for c in cases] for v in others})]
    devices, timers = rows_device_timer(rows)
    return ratio_bars(f"{prefix}_step_time.png", panels,
                      "Llama training step: ringflash attention against transformers' SDPA",
                      "speed ratio (variant step time / ringattn step time; > 1: ringattn faster)",
                      note=f"{devices} | {timers}", reference=1.0, reference_label="parity")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ringflash bench hf", description=__doc__.split("\n\n")[0])
    add_device_options(parser, "GPU: dense 4k and packed 4k only; CPU: always the toy model")
    args = parser.parse_args(argv)
    if args.from_csv:
        return redraw(args, NAME, COLUMNS, markdown_report, plot_steps)
    device = resolve_device(args.device)
    cases = build_cases(device, args.quick)
    # Training steps take ~0.1-0.5 s on the GPU: longer budgets than the kernel benchmarks,
    # so that do_bench takes several samples.
    timer, timer_name = make_timer(device, warmup_ms=100, rep_ms=1000)
    device_name = device_description(device)
    print(f"device: {device_name}", flush=True)
    rounds = GPU_ROUNDS if device == "cuda" else 1
    notes = ["CPU run: a 2-layer toy model in float32, Triton interpreted, wall-clock times; it checks the "
             "plumbing and says nothing about GPU speed."] if device == "cpu" else \
        [f"Each step time is the faster of {rounds} rounds over the variants, the second in the reverse order."]
    rows: list[dict] = []
    with interruptible(notes, "steps") as run, cpu_threads(device), progress_bar(len(cases), "hf") as bar:
        run_all(cases, device, timer, timer_name, device_name, bar, rows, rounds)
    publish(args, NAME, COLUMNS, rows, markdown_report(rows, notes), plot_steps)
    return 130 if run["interrupted"] else 0

