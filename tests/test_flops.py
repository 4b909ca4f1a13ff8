"""``slcompile.flops``: FlopCounterMode counts SLLinear's FLOPs as the cost model does."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from slcompile import SLLinear, cost_model as cm


def _counted(layer: SLLinear, x: torch.Tensor, backward: bool) -> int:
    with FlopCounterMode(display=False) as counter:
        y = layer(x)
        if backward:
            y.sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("path", ["materialize", "factored"])
def test_counted_flops_equal_the_cost_model(path):
    layer = SLLinear(24, 40, rank=6, density=0.1, bias=False, path=path)
    x = torch.randn(3, 7, 24, requires_grad=True)
    dims = {cm.N: 21, cm.IN: 24, cm.OUT: 40, cm.R: 6, cm.NNZ: layer.nnz}
    assert _counted(layer, x, backward=True) == cm.flops(path, "train").subs(dims)
    with torch.no_grad():
        assert _counted(layer, x, backward=False) == cm.flops(path, "forward").subs(dims)
    # No input gradient: the backward skips the dx kernels (and, materialized, forming W again).
    dx_kernels = {"materialize": ("form W again", "dx = dY W"), "factored": ("dx = gb A", "dx += dY S")}[path]
    dx_flops = sum(k.flops for k in cm.path_kernels(path, "train") if k.name in dx_kernels).subs(dims)
    assert _counted(layer, x.detach(), backward=True) == cm.flops(path, "train").subs(dims) - dx_flops
