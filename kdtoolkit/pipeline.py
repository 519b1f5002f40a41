"""``Pipeline``: the one public API behind the CLI, TOML files and Python code.

    pipe = Pipeline.from_toml("examples/quickstart.toml")          # or
    pipe = Pipeline(PipelineConfig(data=DataConfig(name="cifar10"), models={"student": ModelConfig(
        name="wrn", options={"depth": 16, "width": 1})}, run=RunConfig(epochs=2)))
    result = pipe.fit()            # trains, evaluates, checkpoints
    metrics = pipe.evaluate()      # evaluates the run's best checkpoint

Every way in goes through the same validation: a ``PipelineConfig`` built in Python is turned back
into its plain form and checked exactly like a TOML file, so plugin options may be given as their
attrs instance or as a dict.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from kdtoolkit.config import apply_overrides, read_toml, structure, unstructure
from kdtoolkit.config.schema import PipelineConfig
from kdtoolkit.errors import CheckpointError, ConfigError
from kdtoolkit.plugins import Registry, load_registry

PLACEHOLDER_CLASSES = 10
#: written beside pipeline.json: where the run read its data, and the versions it ran with
ENVIRONMENT_FILE = "environment.json"


class Pipeline:
    def __init__(self, config: PipelineConfig | Mapping[str, Any], *, plugins: Iterable[Any] = (), load_entrypoints: bool = True):
        """``config``: a ``PipelineConfig`` or its plain dict form. ``plugins``: extra plugin
        objects (modules or instances with ``@kdtoolkit.hookimpl`` methods) used with the installed ones."""
        self._plugins = list(plugins)
        if isinstance(config, PipelineConfig):
            blocked = list(config.plugins.blocked)
        elif isinstance(config, Mapping):
            plugins_table = config.get("plugins") or {}
            if not isinstance(plugins_table, Mapping):
                raise ConfigError(problems=[("plugins", f"expected a table, got {plugins_table!r}")])
            blocked = plugins_table.get("blocked") or []
            if not isinstance(blocked, list) or not all(isinstance(b, str) for b in blocked):
                raise ConfigError(problems=[("plugins.blocked", "expected a list of plugin names")])
        else:
            raise TypeError("config must be a PipelineConfig or a dict")
        self.registry: Registry = load_registry(blocked=blocked, plugins=self._plugins, load_entrypoints=load_entrypoints)
        raw = unstructure(config, self.registry) if isinstance(config, PipelineConfig) else dict(config)
        structured = structure(raw, self.registry)
        #: the pipeline as written (``pipeline.json``); ``config`` adds the method's extra models
        self.raw: dict = unstructure(structured, self.registry)
        from kdtoolkit.engine.checks import check_config, with_extra_models

        self.config, problems = with_extra_models(structured, self.registry)
        problems += check_config(self.config, self.registry, blocked=tuple(blocked))
        if problems:
            raise ConfigError(problems=problems)
        self._built = None
        self._data = None
        self._data_root: Path | None = None
        self._recorded_data_root: str | None = None

    # -- construction --
    @classmethod
    def from_toml(cls, path: str | Path, *, overrides: Iterable[str] = (), plugins: Iterable[Any] = ()) -> "Pipeline":
        return cls(apply_overrides(read_toml(path), overrides), plugins=plugins)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, plugins: Iterable[Any] = ()) -> "Pipeline":
        return cls(raw, plugins=plugins)

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, *, plugins: Iterable[Any] = ()) -> "Pipeline":
        """The pipeline a run directory was trained with (from its ``pipeline.json``)."""
        path = Path(run_dir) / "pipeline.json"
        if not path.is_file():
            raise CheckpointError(f"{run_dir}: not a run directory (no pipeline.json)")
        pipe = cls(json.loads(path.read_text()), plugins=plugins)
        environment = Path(run_dir) / ENVIRONMENT_FILE
        if environment.is_file():
            try:
                pipe._recorded_data_root = json.loads(environment.read_text()).get("data_root")
            except (ValueError, AttributeError):
                pass  # a damaged record only loses the fallback data root
        return pipe

    # -- properties --
    @property
    def run_dir(self) -> Path:
        return render_run_dir(self.config.run.output_dir, self.config.run.name)

    def validate(self, *, full: bool = False) -> None:
        """Checks that need built models; raises ``ConfigError`` (or ``CheckpointError``, ``DataError``).

        Without ``full``: every model is built (at a placeholder class count, without pretrained
        weights) and feature paths and the method's ``check_models`` are checked; no file is read.
        With ``full``: everything ``fit`` would do before training, once: the data, the models with
        their pretrained weights (missing or misfitting checkpoints), losses' ``setup`` on the
        probe shapes, the method, the optimizer. ``build``/``fit`` then reuse what it built.
        """
        if full:
            self.build()
            return
        from kdtoolkit.engine.assemble import build_networks

        torch_state = torch.get_rng_state()
        try:
            build_networks(self.config, self.registry, num_classes=PLACEHOLDER_CLASSES, load_weights=False)
        finally:
            torch.set_rng_state(torch_state)

    # -- building --
    def load_data(self, *, device: torch.device | None = None):
        """The dataset's splits and the train and test loaders (once; ``build`` calls this)."""
        if self._data is not None:
            return self._data
        from kdtoolkit.data.loader import make_loader
        from kdtoolkit.data.roots import resolve_data_root
        from kdtoolkit.engine.assemble import resolve_device
        from kdtoolkit.engine.distributed import build_native_kernels_once, dist_info, make_sampler, per_process_batch, refuse_multiprocess

        refuse_multiprocess()
        cfg = self.config
        device = device or resolve_device(cfg.run.device)
        if cfg.run.precision == "fp16" and device.type != "cuda":
            raise ConfigError(problems=[("run.precision", "fp16 needs CUDA; use bf16 on the CPU")])
        info = dist_info()
        batch_size = per_process_batch(cfg.data.batch_size, info, "data.batch_size")
        eval_batch_size = per_process_batch(cfg.data.eval_batch_size, info, "data.eval_batch_size", exact=False)
        build_native_kernels_once(any(m.quantizer is not None for m in cfg.models.values()))
        root = resolve_data_root(cfg.data.root, recorded=self._recorded_data_root)
        self._data_root = root
        splits = self.registry.get("dataset", cfg.data.name).factory(cfg.data.options, root=root, download=cfg.data.download)
        common = dict(mean=splits.mean, std=splits.std, device=device, channels_last=cfg.run.channels_last, num_workers=cfg.data.num_workers)
        n_train = len(splits.train)
        train_sampler = make_sampler(n_train, shuffle=True, seed=cfg.run.seed, drop_last=False, info=info)
        train_loader = make_loader(
            splits.train, batch_size=batch_size, sampler=train_sampler, augment=cfg.data.augment,
            seed=cfg.run.seed, drop_last=n_train >= cfg.data.batch_size, **common,
        )
        test_sampler = make_sampler(len(splits.test), shuffle=False, seed=cfg.run.seed, drop_last=False, info=info, pad=False)
        test_loader = make_loader(splits.test, batch_size=eval_batch_size, sampler=test_sampler, augment=False, seed=cfg.run.seed, **common)
        self._data = (splits, train_loader, test_loader)
        return self._data

    def build(self, *, device: torch.device | None = None):
        """Data, models, losses, method, optimizer and LR schedule, ready to train, built once
        (``validate(full=True)`` and ``fit`` call this; later calls return the same object)."""
        if self._built is not None:
            return self._built
        from kdtoolkit.engine.assemble import assemble, build_networks, resolve_device

        cfg = self.config
        device = device or resolve_device(cfg.run.device)
        torch.manual_seed(cfg.run.seed)
        splits, train_loader, test_loader = self.load_data(device=device)
        sample = next(iter(test_loader))[0][:8]
        networks = build_networks(cfg, self.registry, num_classes=splits.num_classes)
        built = assemble(cfg, self.registry, networks, device=device, sample=sample)
        built.data = (splits, train_loader, test_loader)
        self._built = built
        return built

    # -- running --
    def fit(self, *, resume: bool = False, stream=None) -> dict[str, Any]:
        """Train (or, with ``resume``, continue the run in ``run_dir``), evaluating each epoch.
        Console output goes to ``stream`` (default ``sys.stderr``) and to ``run_dir/log.txt``."""
        from kdtoolkit.engine.checkpoint import atomic_write
        from kdtoolkit.engine.distributed import dist_info, on_main
        from kdtoolkit.engine.output import RunConsole
        from kdtoolkit.engine.trainer import Trainer

        stream = stream or sys.stderr  # the current one (a CLI runner may have replaced it)
        run_dir = self.run_dir
        info = dist_info()
        if info.is_main:
            check_run_dir(run_dir, resume=resume)  # before anything is built or written
        built = self.build()
        _, train_loader, test_loader = built.data

        def prepare_run_dir():  # rank 0 alone; the other processes wait for it (on_main)
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(problems=[("run.output_dir", f"cannot create {run_dir}: {exc.strerror or exc}")]) from None

        def write_records() -> None:  # after a resume was accepted: a rejected one leaves them as they were
            if info.is_main:
                atomic_write(run_dir / "pipeline.json", lambda tmp: Path(tmp).write_text(json.dumps(self.raw, indent=2) + "\n"))
                atomic_write(run_dir / ENVIRONMENT_FILE, lambda tmp: Path(tmp).write_text(json.dumps(self._environment(), indent=2) + "\n"))

        on_main(prepare_run_dir)
        console = RunConsole(stream, run_dir) if info.is_main else None
        try:
            if console:
                self._print_banner(console, built, resume)
            trainer = Trainer(built, train_loader, test_loader, run_dir, dist=info, raw_config=self.raw, stream=console or stream)
            result = trainer.fit(resume=resume, on_start=write_records)
            if info.is_main:  # the quantizers have run now: whether their native kernels were available
                atomic_write(run_dir / ENVIRONMENT_FILE, lambda tmp: Path(tmp).write_text(json.dumps(self._environment(), indent=2) + "\n"))
            return result
        finally:
            if console:
                console.close()

    def _print_banner(self, console, built, resume: bool) -> None:
        from kdtoolkit.engine.banner import banner_lines

        steps = len(built.data[1])
        if self.config.run.max_steps_per_epoch:
            steps = min(steps, self.config.run.max_steps_per_epoch)
        for line in banner_lines(built, run_dir=self.run_dir, data_root=self._data_root, train_steps=steps, resume=resume):
            print(line, file=console)

    def _environment(self) -> dict[str, Any]:
        import platform

        import kdtoolkit
        from kdtoolkit.engine.memory import applied
        from kdtoolkit.quant import native

        quantized = any(model.quantizer is not None for model in self.config.models.values())
        return {
            "data_root": None if self._data_root is None else str(self._data_root),
            "kdtoolkit": kdtoolkit.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "host_memory": applied() or "unchanged",
            # on the CPU the quantizers use them when available; None: no quantized model (never built here)
            "native_quantizer_kernels": native.status()["available"] if quantized else None,
        }

    def evaluate(self, checkpoint: str | Path | None = None, *, stream=sys.stderr) -> dict[str, float]:
        """Accuracy of every evaluated model on the test split, with the weights of ``checkpoint``
        (default: the run's best checkpoint; the freshly built weights if there is none)."""
        from kdtoolkit.engine.checkpoint import Checkpoint, load_matching
        from kdtoolkit.engine.output import progress_enabled
        from kdtoolkit.engine.trainer import evaluate

        built = self._built or self.build()
        path = Path(checkpoint) if checkpoint else self.run_dir / "checkpoints" / "best.safetensors"
        if checkpoint or path.exists():
            load_matching(built.module, Checkpoint(path).module_state, path)
        _, _, test_loader = built.data
        return evaluate(built, test_loader, precision=self.config.run.precision, progress=progress_enabled(self.config.run.progress, stream))


#: what makes a directory a run that only ``--resume`` may continue
RUN_CONTENT = ("checkpoints/last.safetensors", "checkpoints/best.safetensors", "metrics.jsonl", "metrics.csv")


def render_run_dir(output_dir: str, name: str) -> Path:
    """``run.output_dir`` with ``{name}`` filled in; ``ConfigError`` for any other placeholder."""
    try:
        return Path(output_dir.format(name=name))
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise ConfigError(problems=[("run.output_dir", f"{output_dir!r}: only the placeholder {{name}} is allowed ({type(exc).__name__}: {exc})")]) from None


def check_run_dir(run_dir: Path, *, resume: bool) -> None:
    """Before anything is built or written: the run directory can be used (``CheckpointError``,
    ``ConfigError``). A directory holding any checkpoint or metrics is only continued with ``resume``."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(problems=[("run.output_dir", f"{run_dir} exists and is not a directory")])
    if resume:
        if not (run_dir / "checkpoints" / "last.safetensors").is_file():
            raise CheckpointError(f"--resume: {run_dir / 'checkpoints' / 'last.safetensors'} does not exist; start the run without --resume")
        return
    found = [rel for rel in RUN_CONTENT if (run_dir / rel).exists()]
    if found:
        raise CheckpointError(
            f"{run_dir} already holds a run ({', '.join(found)}): continue it with --resume, or set run.output_dir "
            "(or run.name) to start a new run"
        )
