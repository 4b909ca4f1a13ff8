"""FuseSharedInputPass on hand-built post-grad-like graphs (``make_fx`` in fake mode: aten ops,
``slcompile.sl_linear`` nodes, fake values in ``meta['val']``), run on real tensors after."""
from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from slcompile import ops
from slcompile.passes.fuse_shared_input import MATERIALIZE, FuseSharedInputPass
from slcompile.passes.nodes import SL_LINEAR
from slcompile.support import generate_support

IN = 12


def layer(out_f, rank=3, bias=False, seed=0):
    """``(A, B, values, support, scale, bias)`` of one SLTrain linear ``(out_f, IN)``."""
    gen = torch.Generator().manual_seed(seed)
    nnz = out_f * IN // 5
    return (torch.randn(rank, IN, generator=gen), torch.randn(out_f, rank, generator=gen),
            torch.randn(nnz, generator=gen), generate_support(out_f, IN, nnz, seed), 0.5 + seed,
            torch.randn(out_f, generator=gen) if bias else None)


def traced(fn, *inputs, mode="fake"):
    return make_fx(fn, tracing_mode=mode)(*inputs)


def count(gm, target):
    return sum(node.target is target for node in gm.graph.nodes)


def qkv(x, *flat):
    """Three linears on ``x`` whose outputs are used in between their calls, plus one on another input."""
    layers = [flat[i:i + 6] for i in range(0, 24, 6)]
    q = ops.sl_linear(x, *layers[0])
    early = torch.tanh(q)  # a use of q before k and v are computed
    k = ops.sl_linear(x, *layers[1])
    v = ops.sl_linear(x, *layers[2])
    other = ops.sl_linear(x * early.sum(), *layers[3])  # another input: not in the group
    return early * k[..., :8] + v[..., :8], other


def qkv_inputs(lead=(2, 5), biases=(False, True, False)):
    layers = [layer(8, bias=biases[0], seed=1), layer(16, bias=biases[1], seed=2), layer(8, bias=biases[2], seed=3),
              layer(8, seed=4)]
    return (torch.randn(*lead, IN), *[t for lay in layers for t in lay])


@pytest.mark.parametrize("lead, biases", [((2, 5), (False, True, False)), ((7,), (False, False, False)),
                                          ((), (True, True, True))])
def test_shared_input_group_is_fused_and_exact(lead, biases):
    inputs = qkv_inputs(lead, biases)
    gm = traced(qkv, *inputs)
    assert count(gm, SL_LINEAR) == 4
    fuse = FuseSharedInputPass()
    fuse(gm.graph)
    gm.recompile()
    assert dict(fuse.counts) == {"graphs": 1, "groups": 1, "sl_linear": 3}
    assert count(gm, SL_LINEAR) == 1 and count(gm, MATERIALIZE) == 3
    gemms = [n for n in gm.graph.nodes if n.target in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)]
    assert len(gemms) == 1 and gemms[0].meta["val"].shape[-1] == 32
    for got, ref in zip(gm(*inputs), qkv(*inputs)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_min_group_and_single_linears_left_alone():
    inputs = qkv_inputs()
    gm = traced(qkv, *inputs)
    fuse = FuseSharedInputPass(min_group=4)
    fuse(gm.graph)
    assert count(gm, SL_LINEAR) == 4 and fuse.counts["groups"] == 0


def test_dependent_linears_not_fused():
    flat_a, flat_b = layer(8, seed=1), layer(8, seed=2)

    def chained(x, *flat):
        q = ops.sl_linear(x, *flat[:6])
        A2 = flat[6] + q.sum()  # the second linear's A depends on the first one's output
        return ops.sl_linear(x, A2, *flat[7:12])

    inputs = (torch.randn(3, IN), *[t for t in flat_a[:5]], None, *[t for t in flat_b[:5]], None)
    gm = traced(lambda x, *f: chained(x, *f[:5], None, *f[6:11], None), *inputs)
    fuse = FuseSharedInputPass()
    fuse(gm.graph)
    assert fuse.counts["groups"] == 0 and "depend" in fuse.notes[0]


def test_symbolic_shapes_not_fused():
    inputs = qkv_inputs()
    gm = traced(qkv, *inputs, mode="symbolic")
    fuse = FuseSharedInputPass()
    fuse(gm.graph)
    assert fuse.counts["groups"] == 0 and "static" in fuse.notes[0]


def test_uuid_depends_on_options_only():
    assert FuseSharedInputPass().uuid() == FuseSharedInputPass(2).uuid()
    assert FuseSharedInputPass(2).uuid() != FuseSharedInputPass(3).uuid()
    with pytest.raises(ValueError, match="fuse_min_group"):
        FuseSharedInputPass(1)
