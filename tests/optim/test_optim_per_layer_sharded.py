"""Global-norm clipping of ``PerLayerOptimizer`` with sharded (``DTensor``) parameters, in two real
processes (gloo): FSDP2's shards mixed with a parameter it left whole, and HSDP's 2-D mesh, whose
replicas hold the same shards. The measured norm must be the norm of the whole gradients."""
from __future__ import annotations

import gc
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from slcompile.optim import PerLayerOptimizer

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _measured_norm(params, loss_fn) -> float:
    """The global norm ``PerLayerOptimizer`` clips with, for the gradients of ``loss_fn()``."""
    opt = PerLayerOptimizer(params, lr=1e-3, max_grad_norm=1e-6, clip="global")
    measured = []
    real = opt._global_norm
    opt._global_norm = lambda: measured.append(real()) or measured[-1]

    def closure():
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)
    (norm,) = measured
    return float(norm)


def _check_norms(world: int) -> None:
    gen = torch.Generator().manual_seed(0)
    weight, plain_value = torch.randn(6, 4, generator=gen), torch.randn(5, generator=gen)
    grad_w, grad_p = torch.randn(6, 4, generator=gen), torch.randn(5, generator=gen)
    want_both = torch.cat([grad_w.view(-1), grad_p]).norm().item()

    # FSDP2's 1-D mesh: a sharded weight and a parameter left whole (replicated, plain).
    mesh = init_device_mesh("cpu", (world,))
    sharded = nn.Parameter(distribute_tensor(weight, mesh, [Shard(0)]))
    plain = nn.Parameter(plain_value.clone())
    got = _measured_norm([sharded, plain], lambda: (sharded.full_tensor() * grad_w).sum() + (plain * grad_p).sum())
    assert abs(got - want_both) < 1e-5 * want_both, (got, want_both)

    # HSDP: replicas along dim 0, shards along dim 1 (here 1 rank each): no double counting.
    mesh2 = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
    hybrid = nn.Parameter(distribute_tensor(weight, mesh2, [Replicate(), Shard(0)]))
    got = _measured_norm([hybrid], lambda: (hybrid.full_tensor() * grad_w).sum())
    assert abs(got - grad_w.norm().item()) < 1e-5 * grad_w.norm().item(), (got, grad_w.norm().item())


def _worker(rank: int, world: int, port: int) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    try:
        _check_norms(world)  # its meshes and parameters are gone when it returns
        dist.barrier()  # no rank leaves while another still talks to it
    finally:
        dist.destroy_process_group()
        gc.collect()  # device meshes hold group objects in cycles: free them before interpreter exit


def test_global_norm_of_sharded_mixed_and_hybrid_parameters():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_worker, args=(2, port), nprocs=2, start_method="spawn")
