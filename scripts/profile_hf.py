"""Where does a transformers training step's time go with ringflash against SDPA? (a
development tool, not part of the package; issue 15's end-to-end bar)

`bench hf` measured the 8-layer Llama step (batch 1, 16/4 heads, d=128) at 0.88x SDPA's
speed at 4k and at 16k tokens, while the kernels alone ran at or above cuDNN's speed. For
each (tokens, variant) this prints:

  * wall-clock time per step over back-to-back steps, against the summed CUDA kernel time
    (a step whose wall time is well above its kernel time waits on the host);
  * torch.profiler's kernels of one step, by CUDA time (attention kernels and the rest);
  * which path each attention call took (``ringflash.kernels.dispatch`` records).

Then the attention alone at the model's shape (b=1, 16/4 heads, d=128, causal), through
the calls the step makes: ringflash's ``flash_attn_func`` (dense) and its HF attention
function (the position_ids layout), against SDPA cuDNN, as wall time per fwd+bwd over
back-to-back calls and as do_bench's median.

Also: the Gluon kernels' heads-first order and dK/dV head split against their
alternatives at that shape, and seed 004's one-head case in both orders against FA2
(``--only order``); ``--only host`` adds a cProfile of the calls.

    python scripts/profile_hf.py [--tokens 4096 16384] [--steps 5] [--only alone order host steps]
"""

from __future__ import annotations

import argparse
import time

import torch


def _kernel_table(prof, top: int) -> tuple[float, list[tuple[str, float, int]]]:
    """(total CUDA ms, [(kernel name, ms, calls)] of the top kernels) of a profile."""
    rows = []
    for evt in prof.key_averages():
        cuda_us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if evt.device_type == torch.autograd.DeviceType.CUDA and cuda_us > 0:
            rows.append((evt.key, cuda_us / 1e3, evt.count))
    rows.sort(key=lambda r: -r[1])
    return sum(r[1] for r in rows), rows[:top]


def _wall_ms(fn, reps: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / reps


def _host_us(fn, calls: int) -> float:
    """Host microseconds per call of ``fn`` alone: the calls are queued behind a GPU sleep
    that outlasts them, so neither the kernels nor a full launch queue hold the host back
    (a host-device sync inside a call shows here as the sleep's length)."""
    torch.cuda.synchronize()
    torch.cuda._sleep(400_000_000)  # about 0.2 s at Hopper's clocks
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def profile_steps(tokens_list, steps: int, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    from ringflash.bench.hf import GPU_MODEL, Case, build_model, make_batch, step_fn
    from ringflash.integrations.hf import register
    from ringflash.kernels import dispatch

    name = register()
    model = build_model(GPU_MODEL, max(tokens_list), "cuda", torch.bfloat16)
    for tokens in tokens_list:
        case = Case(tokens)
        batch = make_batch(case, GPU_MODEL["vocab_size"], "cuda")
        for variant, impl in (("ringattn", name), ("sdpa", "sdpa")):
            model.set_attn_implementation(impl)
            step = step_fn(model, case, batch, "ringattn" if variant == "ringattn" else "sdpa", {})
            for _ in range(2):
                step()
            wall = _wall_ms(step, steps)
            from collections import Counter

            with dispatch.recording_families() as ran:
                step()
            paths = dict(Counter(ran))
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            total, rows = _kernel_table(prof, top)
            print(f"\n== {tokens} tokens, {variant}: wall {wall:.1f} ms/step, CUDA kernels {total:.1f} ms/step "
                  f"({wall - total:+.1f} ms not covered by kernels); paths {paths}")
            for key, ms, count in rows:
                print(f"   {ms:8.2f} ms {count:5d}x  {key[:110]}")


def attention_alone(tokens_list) -> None:
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from ringflash import flash_attn_func
    from ringflash.integrations.hf import attention_forward

    class _Module:
        is_causal = True

    print("\n== attention alone, b=1 16/4 heads d=128 causal, fwd+bwd (ms): wall per call / do_bench median")
    for tokens in tokens_list:
        gen = torch.Generator(device="cuda").manual_seed(0)
        # transformers' layout: (batch, heads, tokens, d)
        q = torch.randn(1, 16, tokens, 128, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
        k, v = (torch.randn(1, 4, tokens, 128, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
                for _ in range(2))
        pos = torch.arange(tokens, device="cuda")[None]
        dout = torch.randn(1, tokens, 16, 128, device="cuda", dtype=torch.bfloat16, generator=gen)

        def ours_dense():
            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
            out.backward(dout)

        def ours_hf():
            out, _ = attention_forward(_Module(), q, k, v, None, position_ids=pos)
            out.backward(dout)

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                out = sdpa(q, k, v, is_causal=True, enable_gqa=True)
            out.backward(dout.transpose(1, 2))

        qc, kc, vc = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))

        def ours_contiguous():
            flash_attn_func(qc, kc, vc, causal=True).backward(dout)

        def ours_forward():
            with torch.no_grad():
                flash_attn_func(qc, kc, vc, causal=True)

        def ours_with(**forced):
            from ringflash.kernels import configs

            def run():
                with configs.override(**forced):
                    ours_contiguous()
            return run

        for label, fn in (("ours flash_attn_func", ours_dense), ("ours flash_attn_func, contiguous", ours_contiguous),
                          ("ours contiguous, head-by-head order", ours_with(sm90_heads_first=False)),
                          ("ours contiguous, no dK/dV head split", ours_with(sm90_head_splits=1)),
                          ("ours forward alone, contiguous", ours_forward),
                          ("ours HF function (position_ids)", ours_hf), ("SDPA cuDNN", cudnn)):
            try:
                fn()
                wall = _wall_ms(fn, 20)
                bench = triton.testing.do_bench(fn, warmup=25, rep=200)
                print(f"   {tokens:6d} {label:34s} {wall:7.3f} / {bench:7.3f}")
            except Exception as exc:  # noqa: BLE001 - a development probe reports and goes on
                print(f"   {tokens:6d} {label:34s} error: {type(exc).__name__}: {str(exc)[:160]}")


def order_ab() -> None:
    """Seed 004's one-head case (b=4, n=8k, d=64, causal; run 39: forward 0.41x FA2) through
    its 3-D interface, the Gluon kernels' heads-first order against head by head, and SDPA
    FA2 on the same tensors (ms, do_bench median)."""
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from ringflash.autograd import FlashAttentionTritonFunc
    from ringflash.kernels import configs

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(4, 8192, 64, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
               for _ in range(3))
    dout = torch.randn_like(q)

    def ours(heads_first: bool, backward: bool):
        def run():
            with configs.override(sm90_heads_first=None if heads_first else False):
                if backward:
                    FlashAttentionTritonFunc.apply(q, k, v, True).backward(dout)
                else:
                    with torch.no_grad():
                        FlashAttentionTritonFunc.apply(q, k, v, True)
        return run

    def fa2(backward: bool):
        def run():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                if backward:
                    sdpa(q[:, None], k[:, None], v[:, None], is_causal=True).backward(dout[:, None])
                else:
                    with torch.no_grad():
                        sdpa(q[:, None], k[:, None], v[:, None], is_causal=True)
        return run

    print("\n== seed 004 one-head case, b=4 n=8k d=64 causal (ms, do_bench median): forward / fwd+bwd")
    for label, fwd, both in (("ours, heads-first order", ours(True, False), ours(True, True)),
                             ("ours, head-by-head order", ours(False, False), ours(False, True)),
                             ("SDPA FA2", fa2(False), fa2(True))):
        fwd(), both()
        print(f"   {label:26s} {triton.testing.do_bench(fwd, warmup=25, rep=200):7.3f} / "
              f"{triton.testing.do_bench(both, warmup=25, rep=200):7.3f}")


def host_profile(tokens: int, calls: int = 20) -> None:
    """cProfile of back-to-back fwd+bwd calls of flash_attn_func (contiguous, b=1 16/4 d=128
    causal) and torch.profiler's kernels of one call: where a call's host time goes. First,
    whether a call syncs with the GPU, and its host time alone against SDPA cuDNN's."""
    import cProfile
    import pstats

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa
    from torch.profiler import ProfilerActivity, profile

    from ringflash import flash_attn_func
    from ringflash.kernels import dispatch

    q = torch.randn(1, tokens, 16, 128, device="cuda", dtype=torch.bfloat16).requires_grad_()
    k, v = (torch.randn(1, tokens, 4, 128, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(2))
    dout = torch.randn_like(q)

    def call():
        flash_attn_func(q, k, v, causal=True).backward(dout)

    for _ in range(3):
        call()
    with dispatch.recording_families() as ran:
        call()
    print(f"\n== host profile, {tokens} tokens, {calls} fwd+bwd calls; paths {ran}")
    # A host-device sync inside a call would make the host wait for the kernels queued
    # before it: wall time per call = host + GPU time instead of the larger of the two.
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()
        print("   host-device syncs in a call: none (torch's sync debug mode)")
    except RuntimeError as exc:
        print(f"   host-device sync in a call: {str(exc)[:300]}")
    finally:
        torch.cuda.set_sync_debug_mode("default")

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True)
        out.backward(dout.transpose(1, 2))

    def forward():
        with torch.no_grad():
            flash_attn_func(q, k, v, causal=True)

    for label, fn in (("ours fwd+bwd", call), ("ours forward", forward), ("SDPA cuDNN fwd+bwd", cudnn)):
        fn()
        print(f"   host time per call, the GPU busy elsewhere, {label}: {_host_us(fn, calls):.0f} us")
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        call()
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(28)
    # transformers hands over (batch, heads, tokens, d) tensors, transposed views for us:
    # run 39 timed that call 0.5-0.9 ms slower than the contiguous one at 4k tokens.
    leaves = [t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v)]

    def transposed():
        flash_attn_func(*(t.transpose(1, 2) for t in leaves), causal=True).backward(dout)

    for label, fn in (("contiguous", call), ("transposed views (HF layout)", transposed)):
        fn()
        print(f"   host time per fwd+bwd call, {label}: {_host_us(fn, calls):.0f} us")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as tprof:
            fn()
            torch.cuda.synchronize()
        total, rows = _kernel_table(tprof, 12)
        print(f"   kernels of one call, {label}: {total:.3f} ms")
        for key, ms, count in rows:
            print(f"   {ms:8.3f} ms {count:5d}x  {key[:110]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=14)
    parser.add_argument("--only", choices=["alone", "order", "host", "steps"], nargs="+",
                        default=["alone", "order", "steps"])
    args = parser.parse_args()
    if "alone" in args.only:
        attention_alone(args.tokens)
    if "order" in args.only:
        order_ab()
    if "host" in args.only:
        host_profile(args.tokens[0])
    if "steps" in args.only:
        profile_steps(args.tokens, args.steps, args.top)


if __name__ == "__main__":
    main()
