"""Non-finite losses and weights (``run.on_nonfinite``).

``"stop"`` (the default): every step records on the device whether each loss term (and their sum) is
finite; the record is read back every ``CHECK_EVERY`` steps and at the end of the epoch (one host
sync each, none per step), and the first non-finite term stops the run with a ``NonFiniteError``
naming the term and the step. The epoch is not checkpointed, so ``last`` and ``best`` stay the last
good ones. ``"skip_step"``: a step whose loss or gradients are not finite is not applied (the
optimizer does not step) and is counted in the epoch's metrics row (``train/skipped_steps``); this
reads one flag back per step. Either way, weights that became non-finite stop the run before the
epoch is checkpointed.
"""

from __future__ import annotations

import torch

from kdtoolkit.errors import NonFiniteError

CHECK_EVERY = 50
HINT = 'lower optimizer.lr or the term\'s weight, or set run.on_nonfinite = "skip_step"'


class NonFiniteGuard:
    def __init__(self, mode: str):
        self.mode = mode
        self._pending: list[tuple[int, int, tuple[str, ...], torch.Tensor]] = []
        self.skipped = 0

    def observe(self, terms: dict[str, torch.Tensor], loss: torch.Tensor, *, epoch: int, step: int) -> None:
        """Record (on the device) which terms of step ``step`` are finite; check now and then."""
        names = (*terms, "total")
        flags = torch.stack([torch.isfinite(v.detach()).all() for v in (*terms.values(), loss)])
        self._pending.append((epoch, step, names, flags))
        if len(self._pending) >= CHECK_EVERY:
            self.check()

    def check(self) -> None:
        """Raise ``NonFiniteError`` for the first recorded step with a non-finite term."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        ok = torch.stack([flags.all() for *_, flags in pending]).cpu()
        if bool(ok.all()):
            return
        epoch, step, names, flags = pending[int((~ok).nonzero()[0])]
        flags = flags.cpu()
        bad = next(name for name, f in zip(names, flags.tolist()) if not f)
        what = "the sum of the loss terms" if bad == "total" else f"loss term {bad!r}"
        raise NonFiniteError(
            f"{what} became NaN or infinite at step {step} (epoch {epoch + 1}); stopped before checkpointing "
            f"that epoch (last and best are the last good ones); {HINT}"
        )

    def step_is_finite(self, loss: torch.Tensor, params: list[torch.Tensor]) -> bool:
        """``skip_step``: whether the loss and every gradient are finite (one host sync); counts skips."""
        flags = [torch.isfinite(loss.detach()).all()] + [torch.isfinite(p.grad).all() for p in params if p.grad is not None]
        ok = bool(torch.stack(flags).all())
        if not ok:
            self.skipped += 1
        return ok


def check_weights(module: torch.nn.Module, *, epoch: int) -> None:
    """``NonFiniteError`` naming the first floating-point parameter or buffer that is not finite."""
    named = [(n, t) for n, t in module.state_dict().items() if t.is_floating_point()]
    if not named:
        return
    ok = torch.stack([torch.isfinite(t).all() for _, t in named]).cpu()
    if bool(ok.all()):
        return
    name = named[int((~ok).nonzero()[0])][0]
    raise NonFiniteError(
        f"{name} became NaN or infinite during epoch {epoch}; stopped before checkpointing that epoch "
        f"(last and best are the last good ones); {HINT}"
    )
