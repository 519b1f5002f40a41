"""The pieces of multi-process training that need no launcher: sharding, the global batch, the
per-process batch size, and synchronised BatchNorm on the CPU (2 gloo processes, spawned here)."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from kdtoolkit.data.loader import InMemoryLoader
from kdtoolkit.data.sampler import EpochSampler
from kdtoolkit.data.types import TensorSplit
from kdtoolkit.engine.distributed import DistInfo, make_sampler, per_process_batch
from kdtoolkit.errors import ConfigError


@pytest.mark.parametrize("n,world", [(199, 2), (10, 3), (7, 7), (64, 4)])
def test_evaluation_shards_cover_every_sample_once(n, world):
    shards = [make_sampler(n, shuffle=False, seed=0, drop_last=False, info=DistInfo(r, world), pad=False).indices() for r in range(world)]
    assert sorted(torch.cat(shards).tolist()) == list(range(n))
    assert [len(make_sampler(n, shuffle=False, seed=0, drop_last=False, info=DistInfo(r, world), pad=False)) for r in range(world)] == [s.numel() for s in shards]


def test_fewer_test_samples_than_processes_is_refused():
    with pytest.raises(ConfigError, match="fewer than the 4 processes"):
        make_sampler(3, shuffle=False, seed=0, drop_last=False, info=DistInfo(0, 4), pad=False)


def test_global_batch_is_split_evenly_or_refused():
    assert per_process_batch(128, DistInfo(1, 4), "data.batch_size") == 32
    assert per_process_batch(100, DistInfo(0, 3), "data.eval_batch_size", exact=False) == 34
    with pytest.raises(ConfigError) as err:
        per_process_batch(30, DistInfo(0, 4), "data.batch_size")
    assert err.value.problems[0][0] == "data.batch_size" and "multiple of 4" in err.value.problems[0][1]


def split(n=40, seed=0) -> TensorSplit:
    g = torch.Generator().manual_seed(seed)
    return TensorSplit(images=torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g), labels=torch.arange(n))


@pytest.mark.parametrize("world", [2, 4])
def test_a_step_sees_the_same_samples_and_augmentation_on_any_number_of_processes(world):
    data, batch, epoch = split(), 8, 3
    common = dict(augment=True, mean=(0.5,) * 3, std=(0.25,) * 3, seed=7, padding=2, drop_last=True)
    one = InMemoryLoader(data, batch_size=batch, sampler=EpochSampler(len(data), shuffle=True, seed=7), **common)
    ranks = [InMemoryLoader(data, batch_size=batch // world, sampler=EpochSampler(len(data), shuffle=True, seed=7, rank=r, world_size=world), **common)
             for r in range(world)]
    for loader in (one, *ranks):
        loader.set_epoch(epoch)
    assert all(len(r) == len(one) for r in ranks)
    for (images, labels), *parts in zip(one, *ranks):
        # rank r holds the positions r, r + world, ... of the global batch
        merged_images = torch.stack([p[0] for p in parts], dim=1).reshape(images.shape)
        merged_labels = torch.stack([p[1] for p in parts], dim=1).reshape(labels.shape)
        assert torch.equal(merged_labels, labels)
        assert torch.equal(merged_images, images)


class _RandomShift(torch.utils.data.Dataset):
    """A streamed dataset whose transform draws from torch's global generator."""

    def __init__(self, n=24):
        self.images = torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i] + torch.randn(()), i


def test_streamed_data_is_split_the_same_way():
    from kdtoolkit.data.loader import StreamLoader

    world, batch = 2, 6
    one = StreamLoader(_RandomShift(), batch_size=batch, sampler=EpochSampler(24, shuffle=True, seed=3), seed=3, drop_last=True)
    ranks = [StreamLoader(_RandomShift(), batch_size=batch // world, sampler=EpochSampler(24, shuffle=True, seed=3, rank=r, world_size=world),
                          seed=3, drop_last=True) for r in range(world)]
    for loader in (one, *ranks):
        loader.set_epoch(2)
    for (images, labels), *parts in zip(one, *ranks):
        assert torch.equal(torch.stack([p[1] for p in parts], dim=1).reshape(-1), labels)
        assert torch.equal(torch.stack([p[0] for p in parts], dim=1).reshape(images.shape), images)


# --- synchronised BatchNorm on the CPU, 2 gloo processes ------------------------------------------


def _sync_bn_worker(rank: int, world: int, init: str, x: torch.Tensor, target: torch.Tensor, out: dict):
    import torch.distributed as dist

    from kdtoolkit.engine.distributed import sync_batchnorm

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        bn = nn.BatchNorm2d(3).double()
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
        assert sync_batchnorm(bn, torch.device("cpu")) == 1
        part = x.chunk(world)[rank].clone().requires_grad_(True)
        y = bn(part)
        # the loss of one process over the whole batch, split: each rank its share of the sum
        loss = (y * target.chunk(world)[rank]).sum()
        loss.backward()
        grads = [bn.weight.grad.clone(), bn.bias.grad.clone()]
        for g in grads:
            dist.all_reduce(g)
        out[rank] = {"y": y.detach(), "dx": part.grad, "dw": grads[0], "db": grads[1],
                     "running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone()}
    finally:
        dist.destroy_process_group()


def test_cpu_sync_batchnorm_equals_batchnorm_over_the_global_batch(tmp_path):
    world = 2
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(6, 3, 4, 5, generator=g, dtype=torch.float64) * 3 + 2)
    target = torch.randn(6, 3, 4, 5, generator=g, dtype=torch.float64)
    out = mp.Manager().dict()
    mp.spawn(_sync_bn_worker, args=(world, f"file://{tmp_path / 'store'}", x, target, out), nprocs=world, join=True)

    # the reference, written from the formula: one BatchNorm over all 6 images
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    xr = x.clone().requires_grad_(True)
    y = bn(xr)
    (y * target).sum().backward()
    ys = torch.cat([out[r]["y"] for r in range(world)])
    dxs = torch.cat([out[r]["dx"] for r in range(world)])
    torch.testing.assert_close(ys, y.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dxs, xr.grad, rtol=1e-10, atol=1e-10)
    for r in range(world):
        torch.testing.assert_close(out[r]["dw"], bn.weight.grad, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out[r]["db"], bn.bias.grad, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out[r]["running_mean"], bn.running_mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out[r]["running_var"], bn.running_var, rtol=1e-10, atol=1e-10)
