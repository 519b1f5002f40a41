"""The training loop: one step = method.training_step -> sum of named terms -> backward -> step.

Kept deliberately plain (the torchvision reference loop, plus what the pipeline adds): schedules are
applied per step in Python (no tensors), loss terms are accumulated on the device and read back
only when a progress line is drawn or the epoch ends, so the loop adds no host-device sync.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from kdtoolkit.engine.assemble import Built
from kdtoolkit.engine.checkpoint import RNG, Checkpoint, load_matching, remove_stale_temporaries, save_checkpoint
from kdtoolkit.engine.checks import best_metric
from kdtoolkit.engine.distributed import DistInfo, DistributedStep, reduce_epoch, reduce_sums, sync_from_main
from kdtoolkit.engine.metrics import MetricsWriter
from kdtoolkit.engine.nonfinite import NonFiniteGuard, check_weights
from kdtoolkit.engine.output import ProgressBar, progress_enabled
from kdtoolkit.errors import CheckpointError
from kdtoolkit.methods import Progress
from kdtoolkit.tensorboard_log import log_metrics_row, resume_at


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate(built: Built, loader: Iterable, *, precision: str, progress: bool | str = False, max_steps: int | None = None,
             stream=None) -> dict[str, float]:
    """Top-1/top-5 accuracy (percent) and mean cross-entropy of every evaluated model. With several
    processes each evaluates its shard of the test split with rank 0's weights and the counts are
    summed over them (top-1/top-5 exactly those of one process)."""
    sync_from_main(built.module)
    built.module.eval()
    correct1: dict[str, torch.Tensor] = {}
    correct5: dict[str, torch.Tensor] = {}
    loss_sum: dict[str, torch.Tensor] = {}
    seen = 0
    total = len(loader) if max_steps is None else min(len(loader), max_steps)
    bar = ProgressBar(total, "eval ", enabled=progress, stream=stream or sys.stderr)
    for step, (images, labels) in enumerate(loader):
        if step >= total:
            break
        with autocast(built.device, precision):
            outputs = built.method.evaluate_logits(images)
        for name, logits in outputs.items():
            logits = logits.float()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top.eq(labels[:, None])
            correct1[name] = correct1.get(name, 0) + hit[:, :1].sum()
            correct5[name] = correct5.get(name, 0) + hit.any(dim=1).sum()
            loss_sum[name] = loss_sum.get(name, 0) + torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        seen += labels.shape[0]
        bar.update(1)
    bar.close()
    counts = {f"{kind}/{name}": d[name] for kind, d in (("top1", correct1), ("top5", correct5)) for name in d}
    counts = {k: v.long() for k, v in reduce_sums({**counts, "seen": seen}, dtype=torch.int64).items()}
    loss_sum = {n: v.item() for n, v in reduce_sums(loss_sum).items()}
    correct1 = {name: counts[f"top1/{name}"] for name in correct1}
    correct5 = {name: counts[f"top5/{name}"] for name in correct5}
    seen = int(counts["seen"])
    out: dict[str, float] = {}
    for name in correct1:
        out[f"test/{name}/top1"] = 100.0 * float(correct1[name]) / seen
        out[f"test/{name}/top5"] = 100.0 * float(correct5[name]) / seen
        out[f"test/{name}/loss"] = float(loss_sum[name]) / seen
    return out


class Trainer:
    """Runs ``fit`` for a built pipeline (``engine.assemble``: models, method, optimizer and LR
    schedule ready); writes checkpoints and metrics under ``run_dir``."""

    def __init__(self, built: Built, train_loader, test_loader, run_dir: Path, *, dist: DistInfo, raw_config: dict, stream=sys.stderr):
        if built.optimizer is None:
            raise ValueError("Trainer needs a built pipeline with its optimizer (kdtoolkit.engine.assemble)")
        self.built = built
        self.cfg = built.config
        self.train_loader = train_loader
        self.test_loader = test_loader
        self.run_dir = Path(run_dir)
        self.dist = dist
        self.raw_config = raw_config
        self.stream = stream
        self.optimizer = built.optimizer
        self.lr_schedule = built.lr_schedule
        self.scaler = torch.amp.GradScaler("cuda") if self.cfg.run.precision == "fp16" else None
        self.metrics = MetricsWriter(self.run_dir, self.cfg.run.metrics_format)
        self.best_metric = best_metric(self.cfg)
        self.show = dist.is_main and progress_enabled(self.cfg.run.progress, stream)  # "bar", "lines" or falsy
        self.training_step = DistributedStep(built, dist, self.cfg.run.batchnorm)  # the method's, under DDP with N processes

    @property
    def last_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.safetensors"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "checkpoints" / "best.safetensors"

    def _set_lr(self, epoch: float) -> float:
        factor = self.lr_schedule(epoch, self.cfg.run.epochs) if self.lr_schedule else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.optimizer.lr * group["lr_scale"] * factor
        return self.cfg.optimizer.lr * factor

    def _resume(self) -> tuple[int, int, dict | None]:
        if not self.last_path.exists():
            raise CheckpointError(f"--resume: {self.last_path} does not exist; start the run without --resume")
        ckpt = Checkpoint(self.last_path)
        ckpt.require("epoch", "global_step", "optimizer")
        if not any(k.startswith(RNG) for k in ckpt.tensors):
            raise CheckpointError(f"{self.last_path}: no RNG state; the run cannot continue exactly")
        load_matching(self.built.module, ckpt.module_state, self.last_path)
        try:
            self.optimizer.load_state_dict(ckpt.optimizer_state())
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"{self.last_path}: optimizer state does not match this pipeline ({exc})") from None
        ckpt.restore_rng()
        old = json.loads(json.dumps(ckpt.meta.get("config", {})))
        new = json.loads(json.dumps(self.raw_config))  # tuples and lists compare as JSON does
        changed = [k for k in set(old) | set(new) if k != "run" and old.get(k) != new.get(k)]
        if changed and self.dist.is_main:
            print(f"warning: resuming with a pipeline that differs from the checkpoint's in: {', '.join(sorted(changed))}", file=self.stream)
        epoch = int(ckpt.meta["epoch"])
        best = ckpt.meta.get("best")
        if self.dist.is_main:
            self._repair_best(ckpt, epoch, best)
            self.metrics.repair(epoch, ckpt.meta.get("metrics"))
            resume_at(self.run_dir, epoch, ckpt.meta.get("metrics"), enabled=self.cfg.run.tensorboard)
            print(f"resumed from {self.last_path} at epoch {epoch}", file=self.stream)
        return epoch, int(ckpt.meta["global_step"]), best

    def _repair_best(self, ckpt: Checkpoint, epoch: int, best: dict | None) -> None:
        """``best`` as ``last`` says it is: a kill between writing ``last`` and copying it to ``best``
        leaves ``best`` behind; the copy is made again."""
        if not best or best.get("epoch") != epoch:
            if best and not self.best_path.exists():
                print(f"warning: {self.best_path} is missing (best was epoch {best.get('epoch')})", file=self.stream)
            return
        try:
            current = Checkpoint(self.best_path).meta.get("epoch") if self.best_path.exists() else None
        except CheckpointError:
            current = None
        if current != epoch:  # the module holds last's weights (just loaded)
            self._write_best({k: v for k, v in ckpt.meta.items() if k not in ("format", "format_version", "optimizer", "tensors")})
            print(f"repaired {self.best_path}: now epoch {epoch}, as {self.last_path.name} records", file=self.stream)

    def fit(self, *, resume: bool = False, on_start=None) -> dict[str, Any]:
        """Train from epoch 0 or, with ``resume``, from the last checkpoint; ``on_start()`` runs once
        the resume succeeded (the pipeline writes its records then, never for a rejected resume).

        Per epoch the order is: train, evaluate, check the weights are finite, write ``last``, copy it
        to ``best`` if improved, append the metrics row. ``last`` records the best epoch and carries
        its metrics row, so ``--resume`` re-derives whatever a kill kept from being written."""
        cfg = self.cfg
        start_epoch, global_step, best = 0, 0, None
        if self.dist.is_main:
            for directory in (self.run_dir, self.run_dir / "checkpoints"):
                remove_stale_temporaries(directory)
        if resume:
            start_epoch, global_step, best = self._resume()
        if on_start is not None:
            on_start()
        self.nonfinite = NonFiniteGuard(cfg.run.on_nonfinite)
        last_row: dict[str, Any] = {}
        for epoch in range(start_epoch, cfg.run.epochs):
            row = self.train_epoch(epoch, global_step)
            global_step = row["step"]
            check_weights(self.built.module, epoch=epoch + 1)
            if (epoch + 1) % cfg.run.eval_every == 0 or epoch + 1 == cfg.run.epochs:
                row.update(evaluate(self.built, self.test_loader, precision=cfg.run.precision, progress=self.show, stream=self.stream))
            value = row.get(self.best_metric)
            improved = value is not None and (best is None or value > best["value"])
            if improved:
                best = {"metric": self.best_metric, "value": value, "epoch": epoch + 1}
            if self.dist.is_main:
                self.save(epoch + 1, global_step, best, row, improved)
                self.metrics.write(row)
                log_metrics_row(self.run_dir, row, enabled=cfg.run.tensorboard)
                self._print_row(row)
            last_row = row
        return {"last": last_row, "best": best, "run_dir": str(self.run_dir)}

    def train_epoch(self, epoch: int, global_step: int) -> dict[str, Any]:
        cfg, built = self.cfg, self.built
        if hasattr(self.train_loader, "set_epoch"):
            self.train_loader.set_epoch(epoch)
        built.module.train()
        steps = len(self.train_loader)
        if cfg.run.max_steps_per_epoch:
            steps = min(steps, cfg.run.max_steps_per_epoch)
        sums: dict[str, torch.Tensor] = {}
        bar = ProgressBar(steps, f"epoch {epoch + 1}/{cfg.run.epochs}", enabled=self.show, stream=self.stream,
                          images_per_step=cfg.data.batch_size, steps_after=(cfg.run.epochs - epoch - 1) * steps)
        images_seen = 0
        start = time.perf_counter()
        lr = self._set_lr(float(epoch))
        guard = getattr(self, "nonfinite", None) or NonFiniteGuard(cfg.run.on_nonfinite)
        skip_mode = cfg.run.on_nonfinite == "skip_step"
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        skipped_before = guard.skipped
        n = 0
        for step, (images, labels) in enumerate(self.train_loader):
            if step >= steps:
                break
            progress = Progress(epoch, step, steps, cfg.run.epochs)
            lr = self._set_lr(progress.epoch_float)
            with autocast(built.device, cfg.run.precision):
                terms = self.training_step(images, labels, progress)
            loss = sum(terms.values())
            if not skip_mode:
                guard.observe(terms, loss, epoch=epoch, step=global_step + step + 1)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                applied = not skip_mode or guard.step_is_finite(loss, [])  # the scaler checks the gradients
                if applied:
                    self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                applied = not skip_mode or guard.step_is_finite(loss, params)
                if applied:
                    self.optimizer.step()
            if applied:
                for key, value in terms.items():
                    sums[key] = sums[key] + value.detach() if key in sums else value.detach().float()
                sums["total"] = sums["total"] + loss.detach() if "total" in sums else loss.detach().float()
            images_seen += labels.shape[0]
            n = step + 1
            bar.update(1, postfix=lambda: " ".join(f"{k}={float(v) / n:.4f}" for k, v in sums.items()))
        bar.close(postfix=lambda: " ".join(f"{k}={float(v) / max(n, 1):.4f}" for k, v in sums.items()))
        guard.check()
        skipped = guard.skipped - skipped_before
        seconds = time.perf_counter() - start
        sums, images_seen = reduce_epoch(sums, images_seen)  # means and counts over every process
        row: dict[str, Any] = {"epoch": epoch + 1, "step": global_step + n, "lr": lr}
        row.update({f"train/loss/{k}": float(v) / max(n - skipped, 1) for k, v in sums.items()})
        if skip_mode:
            row["train/skipped_steps"] = skipped
        row["train/images_per_s"] = images_seen / seconds if seconds > 0 else 0.0
        row["train/seconds"] = seconds
        row.update(self.built.method.epoch_metrics())
        return row

    def save(self, epoch: int, global_step: int, best: dict | None, row: dict, improved: bool) -> None:
        specs = self.cfg.models
        students = self.cfg.students
        meta = {
            "epoch": epoch,
            "global_step": global_step,
            "best": best,
            "metrics": row,
            "config": self.raw_config,
            "student": students[0] if students else next(iter(specs)),
            "num_classes": self.built.num_classes,
            "models": {n: {"name": s.name, "role": s.role} for n, s in specs.items()},
            "torch_version": torch.__version__,
        }
        save_checkpoint(self.last_path, self.built.module, optimizer=self.optimizer, meta=meta)
        if improved:
            self._write_best(meta)

    def _write_best(self, meta: dict) -> None:
        """``best``: the weights and the run's record, no optimizer state (what evaluation and warm
        starts need); written right after ``last`` of an improved epoch, or again by ``_repair_best``."""
        save_checkpoint(self.best_path, self.built.module, optimizer=None, meta=meta, include_rng=False)

    def _print_row(self, row: dict) -> None:
        keys = [k for k in row if k.startswith("test/") and not k.endswith("/loss")]
        losses = " ".join(f"{k.split('/')[-1]}={row[k]:.4f}" for k in row if k.startswith("train/loss/"))
        accs = " ".join(f"{k[5:]}={row[k]:.2f}" for k in keys)
        print(f"epoch {row['epoch']}: {losses} {accs} ({row['train/images_per_s']:.0f} img/s)", file=self.stream)
