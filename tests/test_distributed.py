"""The fused modules under DistributedDataParallel (gloo, two CPU processes): the averaged
gradients equal a single-process run on the whole batch."""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import attnpool


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.cluster = attnpool.AttentionCluster(6, 3)
        self.pool = attnpool.AttentionalPooling(4, 5, rank=2)

    def forward(self, frames, maps):
        # a fixed random projection of the (unit-norm) cluster output, so that its
        # gradients are not ~0 as those of its squared norm would be
        proj = torch.randn(18, generator=torch.Generator().manual_seed(2), dtype=frames.dtype)
        return (self.cluster(frames) @ proj).square().sum() + self.pool(maps).square().sum()


def build():
    torch.manual_seed(0)
    model = Net().double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def data():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(4, 5, 6, generator=g, dtype=torch.float64),
            torch.randn(4, 4, 3, 3, generator=g, dtype=torch.float64))


def worker(rank, world, init_file, out_file):
    os.environ.pop("TRITON_INTERPRET", None)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    model = nn.parallel.DistributedDataParallel(build())
    frames, maps = data()
    shard = slice(rank * 2, rank * 2 + 2)
    # DDP averages gradients over ranks: scale so that the sum equals the full-batch loss
    (world * model(frames[shard], maps[shard])).backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.module.named_parameters()}, out_file)
    dist.barrier()
    # Leave without Python's teardown: freeing the DDP reducer destroys the gloo process group,
    # which joins its worker thread while holding the GIL, and that thread may still be
    # freeing a finished allreduce that needs the GIL (a torch deadlock that hung this test
    # now and then under load).
    os._exit(0)


def test_ddp_gloo_matches_single_process():
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "grads.pt")
        mp.spawn(worker, args=(2, init_file, out_file), nprocs=2, join=True)
        ddp_grads = torch.load(out_file)
    single = build()
    single(*data()).backward()
    for name, p in single.named_parameters():
        torch.testing.assert_close(ddp_grads[name], p.grad, rtol=1e-10, atol=1e-12, msg=name)
