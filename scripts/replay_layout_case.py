"""Replay run 36's failing layout example on the GPU and print, per output, how far the run
on views is from the run on contiguous copies (bits and magnitude)."""
import sys
sys.path.insert(0, "tests")
import torch
from test_properties import *  # noqa: F401,F403
from test_properties import _dense_fns, _precision_for, _run
from attn_check import check_attention

case = LayoutCase(dense=DenseCase(seed=0, batch=1, seqlen_q=1, seqlen_k=1, nheads=2, nheads_k=2, headdim=8, causal=False,
                                  window=(-1, -1), softcap=0.0, softmax_scale=None, input_scale=1.0, dtype=torch.float16),
                  q='contiguous', k='contiguous', v='contiguous', fusion='separate', dout='expand_heads')
for seed in range(4):
    import dataclasses
    c = dataclasses.replace(case, dense=dataclasses.replace(case.dense, seed=seed))
    d = c.dense
    inputs, dout = dense_inputs(d, (c.q, c.k, c.v), c.dout)
    layouts = ((c.q, c.k, c.v), c.fusion, c.dout)
    impl, _ = _dense_fns(d, layouts)
    control, _ = _dense_fns(d, layouts, materialize=True)
    with _precision_for(d.dtype):
        a = _run(impl, [t.to(d.dtype) for t in inputs], (), dout)
        b = _run(control, [t.to(d.dtype) for t in inputs], (), dout)
    flat = lambda r: (r[0], r[1], *r[2])  # noqa: E731
    for name, x, y in zip(("out", "lse", "dq", "dk", "dv"), flat(a), flat(b)):
        diff = (x.double() - y.double()).abs().max().item()
        print(f"seed {seed} {name}: equal={torch.equal(x, y)} max|diff|={diff:.3e} max|x|={x.double().abs().max().item():.3e}")
