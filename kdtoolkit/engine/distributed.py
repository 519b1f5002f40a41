"""The one place that knows about multi-process training (``torchrun``).

Single-process runs go through the same functions, which then do nothing.

- ``process_group``: set-up and teardown of the process group (gloo on the CPU, NCCL on CUDA), from
  the variables ``torchrun`` sets (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``...).
- ``make_sampler`` / ``per_process_batch``: ``data.batch_size`` is the *global* batch of one optimizer
  step, split evenly over the processes; each process takes every ``world_size``-th sample of the
  epoch's order (training: padded to an equal share; evaluation: no padding, no duplicates).
- ``DistributedStep``: one ``DistributedDataParallel`` over ``TrainedParts`` (every trained model, the
  loss terms and the method: regressors, fusion weights, quantizer steps, anything a method adds),
  whose ``forward`` is ``method.training_step``. Frozen models stay outside. A method therefore runs
  its own forward passes in any order (CMT-KD's stage-by-stage pass, CTKD's tied first conv) and the
  gradients of every trained parameter are averaged once per step; plugins need no code for it.
- ``on_main`` / ``DistInfo.is_main``: rank 0 alone writes files, progress and logs.
- ``reduce_sums``, ``sync_from_main``: evaluation counts summed over the processes; every process
  evaluates rank 0's weights.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import sys
from typing import Callable, Iterator, TypeVar

import attrs
import torch
import torch.distributed as dist
from torch import nn

from kdtoolkit.data.sampler import EpochSampler
from kdtoolkit.errors import ConfigError, KDToolkitError

T = TypeVar("T")

#: how long a process waits in a collective for the others (a dead peer is normally noticed by
#: torchrun, which stops the whole group, long before this)
TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("KDTOOLKIT_DIST_TIMEOUT_MIN", "30")))


@attrs.frozen
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def launched_world_size() -> int:
    """``WORLD_SIZE`` as set by the launcher (1 without one)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1") or 1), 1)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r}: not a number") from None


def refuse_multiprocess() -> None:
    """Several launched processes without a process group (a Python caller under ``torchrun`` who
    did not enter ``process_group()``) would each train alone as rank 0: refuse."""
    world = launched_world_size()
    if world > 1 and dist_info().world_size != world:
        raise ConfigError(
            f"WORLD_SIZE={world} but no process group is set up: run `torchrun ... -m kdtoolkit run PIPELINE`, "
            "or call Pipeline.fit inside `with kdtoolkit.engine.distributed.process_group():`"
        )


class OtherRankFailed(KDToolkitError):
    """Rank 0 stopped the run with a user error (it prints it; the other ranks stop quietly)."""


class PeerFailed(KDToolkitError):
    """Another process of the run died (its collective failed): the run stops here."""

    exit_code = 1


STOPPED = "another process of the run failed{why}; the last checkpoint is kept: continue with --resume"


def _on_sigterm(signum, frame):  # pragma: no cover - exercised by the kill test in a subprocess
    # torchrun stops the surviving processes with SIGTERM when one dies
    if dist_info().is_main:
        print("stopped: " + STOPPED.format(why=f" (signal {signum} from the launcher)"), file=sys.stderr, flush=True)
    os._exit(128 + signum)


def _peer_failure(exc: BaseException) -> bool:
    """A collective that failed because a peer went away (gloo: connection closed/reset; NCCL: a
    communicator error), as opposed to a bug."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in ("gloo", "Connection closed", "Connection reset", "NCCL"))


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[DistInfo]:
    """Set up the process group when launched with ``WORLD_SIZE > 1`` and tear it down afterwards.

    ``device``: the pipeline's ``run.device``: NCCL when it resolves to CUDA (each process on the GPU
    of its ``LOCAL_RANK``), gloo otherwise. Does nothing for one process or an existing group.
    """
    world = launched_world_size()
    if world == 1 or dist.is_initialized():
        yield dist_info()
        return
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the processes with torchrun "
                          "(torchrun --nproc-per-node N -m kdtoolkit run PIPELINE)")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if use_cuda else "gloo"
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restart:
        # a worker group restarted by torchrun meets in the agent's store again, where the failed
        # group's connection keys are still written: read under the same names, a rank would dial
        # the dead processes' addresses ("connection refused"). Each restart gets its own prefix.
        store, rank, size = next(dist.rendezvous("env://", timeout=TIMEOUT))
        dist.init_process_group(backend, store=dist.PrefixStore(f"kdtoolkit/restart{restart}", store), rank=rank,
                                world_size=size, timeout=TIMEOUT)
    else:
        dist.init_process_group(backend, timeout=TIMEOUT)
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: keep the default handler
        previous = None
    ok = False
    try:
        yield dist_info()
        ok = True
    except Exception as exc:
        if _peer_failure(exc):
            raise PeerFailed(STOPPED.format(why=f" ({str(exc).splitlines()[0][:200]})")) from None
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if ok:
            dist.barrier()  # rank 0 may still be writing: nobody leaves before everyone is done
        dist.destroy_process_group()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _broadcast_text(text: str | None) -> str | None:
    """``text`` of rank 0 on every rank (``None`` stays ``None``). Plain bytes, no pickle."""
    data = torch.tensor(list(text.encode()) if text is not None else [], dtype=torch.uint8, device=_device())
    size = torch.tensor([data.numel() if text is not None else -1], dtype=torch.int64, device=_device())
    dist.broadcast(size, 0)
    if size.item() < 0:
        return None
    if dist.get_rank() != 0:
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=_device())
    if size.item() > 0:
        dist.broadcast(data, 0)
    return bytes(data.cpu().tolist()).decode()


def on_main(fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on rank 0 alone while the others wait (run-directory checks and writes). A user
    error raised there is raised on rank 0 and ends the other ranks quietly (``OtherRankFailed``)."""
    info = dist_info()
    if info.world_size == 1:
        return fn()
    error: KDToolkitError | None = None
    result = None
    if info.is_main:
        try:
            result = fn()
        except KDToolkitError as exc:
            error = exc
    message = _broadcast_text(None if error is None else (str(error) or type(error).__name__))
    if error is not None:
        raise error
    if message is not None:
        raise OtherRankFailed(f"rank 0 stopped the run: {message}")
    return result


def barrier() -> None:
    if dist_info().world_size > 1:
        dist.barrier()


# --- data ----------------------------------------------------------------------------------------


def per_process_batch(global_batch: int, info: DistInfo, key: str, *, exact: bool = True) -> int:
    """This process's share of a global batch size. ``exact``: it must divide evenly (training, so a
    step sees the same samples whatever the number of processes); else rounded up (evaluation)."""
    if info.world_size == 1:
        return global_batch
    if exact and global_batch % info.world_size:
        raise ConfigError(problems=[(key, (
            f"{global_batch} is the global batch of one step and must divide evenly over the {info.world_size} "
            f"processes; use a multiple of {info.world_size}"))])
    return -(-global_batch // info.world_size)


def make_sampler(n: int, *, shuffle: bool, seed: int, drop_last: bool, info: DistInfo, pad: bool = True) -> EpochSampler:
    """This rank's share of each epoch. ``pad=False`` (evaluation): no sample twice, shares may differ by one."""
    if not pad and n < info.world_size:
        raise ConfigError(f"the test split has {n} samples, fewer than the {info.world_size} processes")
    return EpochSampler(n, shuffle=shuffle, seed=seed, drop_last=drop_last, rank=info.rank, world_size=info.world_size, pad=pad)


# --- models --------------------------------------------------------------------------------------


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """The model itself: models are never wrapped one by one (``DistributedStep`` wraps the trained
    parts together, so parameters shared between models and multi-pass methods stay correct)."""
    return model


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes; the gradient of each input is the sum of the outputs' gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch on the CPU (gloo; ``nn.SyncBatchNorm`` is CUDA-only): the
    statistics of every process's share, two-pass like ``BatchNorm`` (mean first, then the centred
    second moment), each sum all-reduced with an autograd-aware all-reduce so that the backward
    pass is global too. Outside training, or with one process, it is a plain BatchNorm."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 statistics in float32
        count = torch.tensor([x.numel() // x.shape[1]], dtype=xf.dtype)
        total = all_reduce(torch.cat([xf.sum(dims), count]))
        n = total[-1]
        mean = total[:-1] / n
        centred = xf - mean.reshape(shape)
        var = all_reduce((centred * centred).sum(dims)) / n
        y = centred * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                unbiased = var.detach() * (n / (n - 1).clamp_min(1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        return y.to(x.dtype)


def sync_batchnorm(model: nn.Module, device: torch.device) -> int:
    """Make every BatchNorm of ``model`` synchronised in place: ``nn.SyncBatchNorm`` on CUDA,
    ``CPUSyncBatchNorm`` on the CPU. Only the class changes: the same parameters, buffers, hooks
    and state-dict keys (so references held elsewhere, e.g. by a staged model, stay valid).
    Returns how many."""
    target = nn.SyncBatchNorm if device.type == "cuda" else CPUSyncBatchNorm
    count = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and type(module) is not target:
            module.__class__ = target
            module.process_group = None
            count += 1
    return count


class TrainedParts(nn.Module):
    """Every trained part of a pipeline in one module, the one that DDP wraps: the trained models,
    the loss terms and the method. ``forward`` is the method's training step."""

    def __init__(self, module: nn.Module, frozen: set[str]):
        super().__init__()
        self.models = nn.ModuleDict({n: m for n, m in module.models.items() if n not in frozen})
        self.losses = module.losses
        self.method = module.method

    def forward(self, images, labels, progress):
        return self.method.training_step(images, labels, progress)


class DistributedStep:
    """``method.training_step`` with the gradients of every trained parameter averaged over the
    processes (one DDP over ``TrainedParts``); the method itself for one process.

    State a forward writes into a parameter from the local batch (LSQ's step initialisation on the
    first batch) would make the processes diverge: at the start of the second step every parameter
    and buffer is set to rank 0's, once.
    """

    def __init__(self, built, info: DistInfo, batchnorm: str = "local"):
        self.built = built
        self.info = info
        self.calls = 0
        self.ddp = None
        if info.world_size == 1:
            return
        frozen = {n for n, s in built.config.models.items() if s.frozen}
        parts = TrainedParts(built.module, frozen)
        if batchnorm == "sync":  # trained models, and BatchNorms of losses and methods (FitNet regressors)
            sync_batchnorm(parts, built.device)
        ids = [built.device.index if built.device.index is not None else torch.cuda.current_device()] if built.device.type == "cuda" else None
        # find_unused_parameters: a method may leave parameters out of a step (a term at weight 0,
        # a third-party method's branches); the traversal it costs is small next to the forward
        self.ddp = nn.parallel.DistributedDataParallel(parts, device_ids=ids, find_unused_parameters=True)

    def __call__(self, images, labels, progress):
        self.calls += 1
        if self.ddp is None:
            return self.built.method.training_step(images, labels, progress)
        if self.calls == 2:
            sync_from_main(self.built.module)
        return self.ddp(images, labels, progress)


@torch.no_grad()
def sync_from_main(module: nn.Module) -> None:
    """Every parameter and buffer of ``module`` set to rank 0's (before an evaluation, so every
    process evaluates the weights rank 0 saves; BatchNorm statistics differ with local BatchNorm)."""
    if dist_info().world_size == 1:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, 0)


def reduce_sums(values: dict[str, torch.Tensor | float], dtype=torch.float64) -> dict[str, torch.Tensor]:
    """Sums over the processes, each value summed in ``dtype`` (int64 counts stay exact)."""
    if dist_info().world_size == 1 or not values:
        return {k: torch.as_tensor(v) for k, v in values.items()}
    keys = sorted(values)
    flat = torch.stack([torch.as_tensor(values[k]).detach().to(dtype=dtype, device="cpu").reshape(()) for k in keys])
    flat = flat.to(_device())
    dist.all_reduce(flat)
    return dict(zip(keys, flat.cpu().unbind()))


def reduce_epoch(sums: dict[str, torch.Tensor], images: int) -> tuple[dict[str, torch.Tensor], int]:
    """Training loss sums averaged over the processes and images counted over all of them."""
    info = dist_info()
    if info.world_size == 1:
        return sums, images
    total = reduce_sums({**{f"loss/{k}": v for k, v in sums.items()}, "images": float(images)})
    return {k: total[f"loss/{k}"] / info.world_size for k in sums}, int(total["images"])


# --- set-up helpers ------------------------------------------------------------------------------


def build_native_kernels_once(needed: bool) -> None:
    """The native quantizer kernels are compiled by local rank 0 of each machine first while the
    other processes wait, then loaded from the cache by the others."""
    info = dist_info()
    if info.world_size == 1 or not needed:
        return
    from kdtoolkit.quant import native

    if info.local_rank == 0:
        native.status()
    dist.barrier()


def resume_after_restart(resume: bool, last_checkpoint) -> bool:
    """``--resume``, or a worker group restarted by ``torchrun --max-restarts`` (it sets
    ``TORCHELASTIC_RESTART_COUNT``) that finds the run's last checkpoint: it continues from there."""
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
    return resume or (restarted and last_checkpoint.exists())

