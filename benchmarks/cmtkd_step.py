"""CMT-KD training step: the engine's ``cmtkd`` method against the same computation written as a plain
PyTorch loop, side by side in one process (alternating rounds), plus peak memory by teacher count.

Setup (the paper's CIFAR ResNet-18 setting, scaled to a CPU): CIFAR ResNet-18 student with HWGQ
W2A2 and 4/6/8-bit HWGQ teachers, fusion after each of the four stages, attention feature loss, batch
32, SGD 0.9 (lr 0.1, π at 0.01, weight decay 25e-6 for the student and 1e-4 for the teachers).

- **Throughput**: the engine side is ``Trainer.train_epoch`` (data loader, autocast context, the
  method's ``training_step``, the sum of its named terms, backward, optimizer step, loss logging);
  the hand side is a loop over the same loader written from the paper's equations with its own
  models, π and optimizer. Both start from the same weights, and the first step's loss is checked
  to agree. The sides alternate one step at a time (ABBA), and the ratio is the median of the
  per-round time ratios, so load from other processes mostly cancels; the same ratio of process CPU
  time (``time.process_time``) is printed beside it, as it is less sensitive to other processes
  taking the cores. Target: engine >= 0.97x.
- **Memory** (1, 2 and 3 teachers, each in a fresh subprocess running the engine's step):
  ``peak RSS`` is the process's maximum resident set (``VmHWM``; includes Python, torch and the
  data); ``step delta`` is the peak minus the resident set after building (what the training steps
  add: activations kept for backward, gradients, momentum buffers, plus allocator caching);
  ``saved for backward`` is the exact size of the distinct tensor storages autograd keeps from one
  forward (``torch.autograd.graph.saved_tensors_hooks``), the part that grows with each teacher.

    python -m benchmarks.cmtkd_step [--steps 8] [--batch 32] [--json] [--no-memory]
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks._common import REPO, default_cifar10_root, emit, median, parser

BITS = {1: (8,), 2: (4, 8), 3: (4, 6, 8)}
LR, PI_SCALE, WD_LOW, WD_HIGH = 0.1, 0.1, 25e-6, 1e-4
ALPHA, BETA, GAMMA, T = 1.0, 0.5, 100.0, 4.0


def _step():
    from kdtoolkit.methods import Progress

    return Progress(epoch=0, step=0, steps_per_epoch=1, total_epochs=1)


def cmtkd_plugins() -> list:
    from importlib.metadata import entry_points

    if entry_points(group="kdtoolkit", name="cmtkd"):
        return []
    import kdtoolkit_plugins.methods.cmtkd as module

    return [module]


def pipeline_dict(root, teachers: int, batch: int, steps_per_epoch: int) -> dict:
    def hwgq(bits):
        return {"name": "hwgq", "weight_bits": bits, "act_bits": bits}

    data = {"name": "cifar10", "batch_size": batch}
    if root:
        data["root"] = root
    models = {"student": {"name": "resnet18_cifar", "quantizer": hwgq(2)}}
    for bits in BITS[teachers]:
        models[f"t{bits}"] = {"name": "resnet18_cifar", "role": "teacher", "quantizer": hwgq(bits)}
    return {
        "run": {"name": "bench", "epochs": 1000, "progress": "off", "device": "cpu", "max_steps_per_epoch": steps_per_epoch,
                "output_dir": "/tmp/kdtoolkit-bench-unused"},
        "data": data,
        "models": models,
        "method": {"name": "cmtkd", "alpha": ALPHA, "beta": BETA, "gamma": GAMMA, "temperature": T},
        "optimizer": {"lr": LR, "momentum": 0.9, "weight_decay": WD_LOW,
                      "param_groups": [{"params": [f"models.t{b}.*" for b in BITS[teachers]], "weight_decay": WD_HIGH}]},
    }


# --- the hand-written loop -----------------------------------------------------------------------


def attention_map(f):
    return F.normalize(f.pow(2).mean(1).flatten(1), dim=1)


def hand_loss(student, teachers, pis, images, labels):
    """Eq. 1-10 of the paper, written out."""
    k_stages = len(student.stage_paths)
    h, fused = images, []
    for k in range(k_stages):
        outs = [t.forward_stage(k, h) for t in teachers]
        w = torch.softmax(pis[k], dim=0)
        h = (w.view(-1, 1, 1, 1, 1) * torch.stack(outs)).sum(0)
        fused.append(h)
    z_t = torch.stack([t.forward_stage(k_stages, h) for t in teachers]).mean(0)
    x, feats = images, []
    for k in range(k_stages):
        x = student.forward_stage(k, x)
        feats.append(x)
    z_s = student.forward_stage(k_stages, x)
    idx = labels.view(-1, 1)
    ens = torch.minimum(z_t - z_t.gather(1, idx), z_s - z_s.gather(1, idx)).detach()
    target = F.log_softmax(ens / T, dim=1)
    kl = sum(F.kl_div(F.log_softmax(z / T, dim=1), target, reduction="batchmean", log_target=True) for z in (z_t, z_s)) * T * T
    at = sum((attention_map(s) - attention_map(f)).pow(2).mean() for s, f in zip(feats, fused))
    return ALPHA * (F.cross_entropy(z_s, labels) + F.cross_entropy(z_t, labels)) + BETA * kl + GAMMA * at


def hand_loop(student, teachers, pis, optimizer, loader, steps: int) -> int:
    for m in (student, *teachers):
        m.train()
    n = 0
    for step, (images, labels) in enumerate(loader):
        if step >= steps:
            break
        loss = hand_loss(student, teachers, pis, images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n += labels.shape[0]
    return n


def hand_setup(pipe, built):
    """The loop's own networks (same architecture, quantizers and initial weights), π and optimizer."""
    from kdtoolkit.engine.assemble import build_model

    names = list(pipe.config.models)
    nets = {n: build_model(pipe.config, pipe.registry, n, built.num_classes) for n in names}
    for n, net in nets.items():
        net.load_state_dict(built.models[n].state_dict())
    student, teachers = nets["student"], [nets[n] for n in names if n != "student"]
    pis = [torch.nn.Parameter(f.importance.detach().clone()) for f in built.method.fusion]
    optimizer = torch.optim.SGD([
        {"params": list(student.parameters()), "weight_decay": WD_LOW},
        {"params": [p for t in teachers for p in t.parameters()], "weight_decay": WD_HIGH},
        {"params": pis, "lr": LR * PI_SCALE, "weight_decay": WD_LOW},
    ], lr=LR, momentum=0.9)
    return student, teachers, pis, optimizer


# --- measurements --------------------------------------------------------------------------------


def throughput(root, batch: int, rounds: int) -> dict:
    from kdtoolkit import Pipeline
    from kdtoolkit.engine.distributed import DistInfo
    from kdtoolkit.engine.trainer import Trainer

    pipe = Pipeline.from_dict(pipeline_dict(root, 3, batch, 1), plugins=cmtkd_plugins())
    built = pipe.build()
    _, loader, test_loader = built.data
    trainer = Trainer(built, loader, test_loader, pipe.run_dir, dist=DistInfo(), raw_config=pipe.raw)
    student, teachers, pis, optimizer = hand_setup(pipe, built)

    # same weights, same batch: the two sides compute the same loss
    loader.set_epoch(0)
    images, labels = next(iter(loader))
    built.module.train()
    engine_loss = float(sum(built.method.training_step(images, labels, _step()).values()).detach())
    hand_loss_value = float(hand_loss(student, teachers, pis, images, labels).detach())
    same = abs(engine_loss - hand_loss_value) <= 1e-4 * max(1.0, abs(hand_loss_value))

    # one step per round, alternating which side goes first (ABBA): load from other processes on a
    # shared machine drifts on a scale of seconds, so adjacent steps are compared, not long blocks
    engine, hand, ratios, cpu_ratios = [], [], [], []
    loader.set_epoch(0)
    trainer.train_epoch(0, 0)  # warm-up of both
    loader.set_epoch(0)
    hand_loop(student, teachers, pis, optimizer, loader, 1)
    for r in range(rounds):
        wall, cpu = {}, {}
        for side in (("engine", "hand") if r % 2 == 0 else ("hand", "engine")):
            loader.set_epoch(r + 1)
            t, c = time.perf_counter(), time.process_time()
            if side == "engine":
                n = trainer.train_epoch(r + 1, 0)["step"] * batch
            else:
                n = hand_loop(student, teachers, pis, optimizer, loader, 1)
            wall[side], cpu[side] = time.perf_counter() - t, time.process_time() - c
            (engine if side == "engine" else hand).append(n / wall[side])
        ratios.append(wall["hand"] / wall["engine"])
        cpu_ratios.append(cpu["hand"] / cpu["engine"])
    return {"engine": median(engine), "hand": median(hand), "ratio": median(ratios), "cpu_ratio": median(cpu_ratios),
            "engine_rounds": engine, "hand_rounds": hand,
            "first_step_loss": {"engine": engine_loss, "hand": hand_loss_value, "equal": same}}


def memory_child(root, teachers: int, batch: int) -> dict:
    """Run in a fresh process: build, two engine steps, and one forward's saved-for-backward bytes."""
    from kdtoolkit import Pipeline
    from kdtoolkit.engine.optim import build_optimizer

    pipe = Pipeline.from_dict(pipeline_dict(root, teachers, batch, 1), plugins=cmtkd_plugins())
    built = pipe.build()
    _, loader, _ = built.data
    optimizer = build_optimizer(pipe.config, built.module)
    batches = iter(loader)
    built.module.train()
    rss_built = _rss_mib()
    for _ in range(2):
        images, labels = next(batches)
        loss = sum(built.method.training_step(images, labels, _step()).values())  # noqa: F841 - keeps the graph (and its saved tensors) alive
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        del loss
    peak = _maxrss_mib()
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    images, labels = next(batches)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = sum(built.method.training_step(images, labels, _step()).values())  # noqa: F841 - keeps the graph (and its saved tensors) alive
    params = {p.untyped_storage().data_ptr() for p in built.module.parameters()}
    saved = sum(n for ptr, n in storages.items() if ptr not in params) / 2**20  # activations, not weights
    return {"teachers": teachers, "peak_rss_mib": peak, "built_rss_mib": rss_built,
            "step_delta_mib": peak - rss_built, "saved_for_backward_mib": saved}


def _maxrss_mib() -> float:
    """Peak resident set of this process image: ``VmHWM`` (per address space, so it starts afresh at
    exec; ``getrusage``'s ``ru_maxrss`` would carry over the parent's peak from before the fork)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; other OSes: bytes


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def memory(root, batch: int) -> list[dict]:
    out = []
    for n in (1, 2, 3):
        cmd = [sys.executable, "-m", "benchmarks.cmtkd_step", "--memory-child", str(n), "--batch", str(batch)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"memory run with {n} teachers failed:\n{proc.stderr}")
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8, help="timed training steps of each side (alternating, one step a round)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--no-memory", action="store_true", help="skip the per-teacher-count memory runs")
    p.add_argument("--memory-child", type=int, default=None, help=argparse_hidden())
    args = p.parse_args(argv)
    root = default_cifar10_root()
    if args.memory_child is not None:
        print(json.dumps(memory_child(root, args.memory_child, args.batch)))
        return
    t = throughput(root, args.batch, args.steps)
    ratio = t["ratio"]
    figures = {
        "threads": torch.get_num_threads(), "batch": args.batch, "steps": args.steps,
        "engine_images_per_s": round(t["engine"], 2), "hand_loop_images_per_s": round(t["hand"], 2),
        "ratio": round(ratio, 3), "cpu_time_ratio": round(t["cpu_ratio"], 3), "engine_rounds": [round(v, 2) for v in t["engine_rounds"]],
        "hand_rounds": [round(v, 2) for v in t["hand_rounds"]], "first_step_loss": t["first_step_loss"],
    }
    table = [("CMT-KD step, 3 teachers", f"{t['engine']:.2f}", f"{t['hand']:.2f}", f"{ratio:.3f}", f"{t['cpu_ratio']:.3f}")]
    notes = [
        f"median images/s of {args.steps} steps of each side, one step a round in ABBA order, batch {args.batch}, "
        f"{torch.get_num_threads()} threads; engine/hand = median of the per-round ratios of wall-clock (and of process CPU) "
        "time; target >= 0.97",
        f"first-step loss, same weights and batch: engine {t['first_step_loss']['engine']:.6f}, "
        f"hand loop {t['first_step_loss']['hand']:.6f} ({'equal' if t['first_step_loss']['equal'] else 'DIFFERENT'})",
    ]
    if not args.no_memory:
        mem = memory(root, args.batch)
        figures["memory"] = mem
        notes.append("memory (engine step, fresh process per teacher count):")
        notes.append("  teachers  peak RSS MiB  step delta MiB  saved for backward MiB")
        for m in mem:
            notes.append(f"  {m['teachers']:>8}  {m['peak_rss_mib']:>12.0f}  {m['step_delta_mib']:>14.0f}  {m['saved_for_backward_mib']:>22.1f}")
    emit(figures, table, ("config", "engine img/s", "hand loop img/s", "engine/hand", "engine/hand (CPU time)"), args.json, notes)


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
