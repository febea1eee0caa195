"""Optimizers, Sharpness-Aware Minimization and learning-rate schedules.

Optimizers and schedules are chosen by name (``OPTIMIZERS``, ``SCHEDULES``) from
frozen configs (both in ``optim_config.py``, which configs import without torch). ``build_optimizer`` wraps the base optimizer in ``SAM`` when
``OptimConfig.sam`` asks for it; such an optimizer has ``second_order = True`` and
the engine then does the two-pass step::

    loss_fn(model(x), y).backward()
    opt.first_step(zero_grad=True)          # climb to w + e(w)
    disable_running_stats(model)            # BN statistics only from the first pass
    loss_fn(model(x), y).backward()
    enable_running_stats(model)
    opt.second_step(zero_grad=True)         # back to w, base step with the new gradient

The engine runs bf16 autocast without a GradScaler, so nothing here unscales.
Schedules are wrapped in ``Scheduler``, which knows whether it steps per batch or
per epoch and whether it needs the monitored metric.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import lr_scheduler

from .errors import ConfigError
from .optim_config import OPTIMIZERS, SAM_VARIANTS, SCHEDULES, OptimConfig, ScheduleConfig

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- optimizers


@dataclass(frozen=True)
class OptimInfo:
    """How to build one optimizer from an ``OptimConfig`` (timm-style spec)."""

    name: str
    opt_class: type[torch.optim.Optimizer]
    description: str
    kwargs: Callable[[OptimConfig], dict[str, Any]]  # constructor arguments from the config

    def create(self, params: Iterable, cfg: OptimConfig) -> torch.optim.Optimizer:
        return self.opt_class(params, **self.kwargs(cfg))


def _adam_kwargs(cfg: OptimConfig) -> dict[str, Any]:
    return {"lr": cfg.lr, "betas": tuple(cfg.betas), "weight_decay": cfg.weight_decay}


def _sgd_kwargs(cfg: OptimConfig) -> dict[str, Any]:
    return {"lr": cfg.lr, "momentum": cfg.momentum, "nesterov": cfg.nesterov,
            "weight_decay": cfg.weight_decay}


OPTIMIZERS.add("adam", OptimInfo("adam", torch.optim.Adam, "Adam, L2 weight decay", _adam_kwargs))
OPTIMIZERS.add("adamw", OptimInfo("adamw", torch.optim.AdamW, "Adam, decoupled weight decay", _adam_kwargs))
OPTIMIZERS.add("sgd", OptimInfo("sgd", torch.optim.SGD, "SGD with (Nesterov) momentum", _sgd_kwargs))


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimization (Foret et al. 2021) and Adaptive SAM (Kwon et al. 2021).

    Wraps ``base_optimizer_cls(params, **base_kwargs)``, available as ``base_optimizer``.
    ``param_groups`` is the very list of the base optimizer, so an LR schedule attached
    to either changes both. Per step: ``first_step`` moves to ``w + e_w`` with
    ``e_w = rho * T^2 g / ||T g||`` (``T = |w| + eta`` for ASAM, identity for SAM), then
    the caller recomputes the gradient there and ``second_step`` restores ``w`` and lets
    the base optimizer step with that gradient. ``eta`` (Kwon et al.'s 0.01 by default)
    keeps T > 0, so parameters that are exactly zero (fresh biases) are perturbed too."""

    second_order = True  # the engine checks this flag to do the two-pass step

    def __init__(self, params: Iterable, base_optimizer_cls: type[torch.optim.Optimizer],
                 rho: float = 0.05, adaptive: bool = False, eta: float = 0.01,
                 **base_kwargs: Any) -> None:
        if not rho >= 0:
            raise ValueError(f"SAM rho={rho}: must be >= 0")
        if not eta >= 0:
            raise ValueError(f"ASAM eta={eta}: must be >= 0")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, eta=eta, **base_kwargs))
        # The base optimizer adopts our group dicts, then we adopt its list, so the
        # groups (lr, rho, ...) exist once and schedules on either side stay in sync.
        self.base_optimizer = base_optimizer_cls(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    def _group_opt(self, group: dict, key: str) -> Any:
        # groups loaded from a plain (non-SAM) state dict lack rho/adaptive/eta
        return group.get(key, self.defaults[key])

    def _scale(self, group: dict, p: torch.Tensor) -> torch.Tensor | None:
        """ASAM's T_w = |w| + eta in float32; None for plain SAM (T = identity)."""
        if not self._group_opt(group, "adaptive"):
            return None
        return p.detach().float().abs().add_(self._group_opt(group, "eta"))

    @torch.no_grad()
    def _grad_norm(self) -> torch.Tensor:
        """||T g|| over all parameters, in float32."""
        norms = []
        device = None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if device is None:
                    device = p.device
                g = p.grad.float()
                t = self._scale(group, p)
                if t is not None:
                    g = g * t
                norms.append(torch.linalg.vector_norm(g).to(device))
        if not norms:
            return torch.zeros(())
        return torch.linalg.vector_norm(torch.stack(norms))

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move every parameter to ``w + e_w`` (the sharpest nearby point)."""
        scale_base = 1.0 / (self._grad_norm() + 1e-12)  # guards a zero gradient
        for group in self.param_groups:
            scale = self._group_opt(group, "rho") * scale_base
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.detach().clone()
                e_w = p.grad.float() * scale.to(p.device)
                t = self._scale(group, p)
                if t is not None:
                    e_w = e_w * t.pow(2)
                p.add_(e_w.to(p.dtype))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w`` and take the base optimizer's step with the gradient at ``w + e_w``."""
        for group in self.param_groups:
            for p in group["params"]:
                old = self.state[p].pop("old_p", None)
                if old is not None:
                    # copy back rather than subtract e_w: exact, no rounding drift
                    p.copy_(old)
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Full SAM step for callers that already ran ``backward`` at ``w``;
        ``closure`` must recompute the loss and call ``backward`` (it runs at ``w + e_w``)."""
        if closure is None:
            raise RuntimeError("SAM needs two gradient evaluations per step: call first_step() and "
                               "second_step() around a second backward pass, or pass a closure "
                               "that recomputes the loss and calls backward()")
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (its groups carry rho/adaptive); ``old_p``
        only lives between the two half-steps and is not saved."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        # loading replaces the base's group list: share the new one again
        self.param_groups = self.base_optimizer.param_groups


def is_second_order(opt: Any) -> bool:
    """True when ``opt`` needs the two-pass (SAM) step."""
    return bool(getattr(opt, "second_order", False))


def build_optimizer(cfg: OptimConfig, params: Iterable) -> torch.optim.Optimizer:
    """Validate ``cfg`` and build its optimizer over ``params`` (SAM-wrapped when
    ``cfg.sam != "none"``)."""
    cfg.validate()
    info = OPTIMIZERS.get(cfg.name, where="optimizer.name")
    adaptive = SAM_VARIANTS.get(cfg.sam, where="optimizer.sam")
    if adaptive is None:
        return info.create(params, cfg)
    log.debug("wrapping %s in %s (rho=%s)", cfg.name, cfg.sam, cfg.rho)
    return SAM(params, info.opt_class, rho=cfg.rho, adaptive=adaptive, eta=cfg.asam_eta,
               **info.kwargs(cfg))


_SAVED_MOMENTUM = "_cxrtune_saved_momentum"
_SAVED_COUNT = "_cxrtune_saved_num_batches"


def disable_running_stats(model: nn.Module) -> None:
    """Freeze BatchNorm running statistics (momentum 0) for SAM's second forward pass,
    so the statistics see each batch once, at the real weights (davda54/sam trick)."""

    def _disable(module: nn.Module) -> None:
        if isinstance(module, _BatchNorm) and not hasattr(module, _SAVED_MOMENTUM):
            setattr(module, _SAVED_MOMENTUM, module.momentum)
            # momentum=None (cumulative average) reads num_batches_tracked: restore it too
            if module.num_batches_tracked is not None:
                setattr(module, _SAVED_COUNT, module.num_batches_tracked.clone())
            module.momentum = 0.0

    model.apply(_disable)


def enable_running_stats(model: nn.Module) -> None:
    """Undo ``disable_running_stats``."""

    def _enable(module: nn.Module) -> None:
        if isinstance(module, _BatchNorm) and hasattr(module, _SAVED_MOMENTUM):
            module.momentum = getattr(module, _SAVED_MOMENTUM)
            delattr(module, _SAVED_MOMENTUM)
            if hasattr(module, _SAVED_COUNT):
                module.num_batches_tracked.copy_(getattr(module, _SAVED_COUNT))
                delattr(module, _SAVED_COUNT)

    model.apply(_enable)


# ---------------------------------------------------------------- schedules


class Scheduler:
    """An LR schedule plus when to step it.

    Call ``step_batch()`` after every optimizer step and ``step_epoch(metric)`` after
    every epoch's validation; each is a no-op for schedules of the other cadence."""

    def __init__(self, name: str, scheduler: Any | None, per_batch: bool = False,
                 needs_metric: bool = False, total_batch_steps: int | None = None) -> None:
        self.name = name
        self.scheduler = scheduler
        self.per_batch = per_batch
        self.needs_metric = needs_metric
        self.total_batch_steps = total_batch_steps
        self.batch_steps = 0

    def step_batch(self) -> None:
        if self.scheduler is None or not self.per_batch:
            return
        if self.total_batch_steps is not None and self.batch_steps >= self.total_batch_steps:
            # batch i trains at schedule step i, so the last batch already used the final
            # LR; stepping on would wrap one_cycle's cosine (or raise), so extra batches
            # (e.g. a ragged last epoch) keep the final LR
            return
        self.batch_steps += 1
        self.scheduler.step()

    def step_epoch(self, metric: float | None = None) -> None:
        if self.scheduler is None or self.per_batch:
            return
        if self.needs_metric:
            if metric is None:
                raise ValueError(f"schedule {self.name!r} needs the monitored metric: step_epoch(metric)")
            self.scheduler.step(metric)
        else:
            self.scheduler.step()

    def get_last_lr(self) -> list[float]:
        """Current LR of each param group."""
        return [g["lr"] for g in self.optimizer.param_groups] if self.scheduler is not None else []

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.scheduler.optimizer

    def state_dict(self) -> dict[str, Any]:
        inner = self.scheduler.state_dict() if self.scheduler is not None else {}
        return {"name": self.name, "batch_steps": self.batch_steps, "scheduler": inner}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"scheduler state is for {state.get('name')!r}, not {self.name!r}")
        self.batch_steps = state["batch_steps"]
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])


@dataclass(frozen=True)
class _Plan:
    """What a schedule builder gets: config, the optimizer to attach to, run length."""

    cfg: ScheduleConfig
    optimizer: torch.optim.Optimizer
    epochs: int
    steps_per_epoch: int
    mode: str

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


PLATEAU_MODES = ("min", "max")


@SCHEDULES.register("none")
def _none(plan: _Plan) -> Scheduler:
    return Scheduler("none", None)


@SCHEDULES.register("reduce_on_plateau")
def _plateau(plan: _Plan) -> Scheduler:
    c = plan.cfg
    sched = lr_scheduler.ReduceLROnPlateau(plan.optimizer, mode=plan.mode, factor=c.factor,
                                           patience=c.patience, min_lr=c.min_lr)
    return Scheduler("reduce_on_plateau", sched, needs_metric=True)


@SCHEDULES.register("step")
def _step(plan: _Plan) -> Scheduler:
    sched = lr_scheduler.StepLR(plan.optimizer, step_size=plan.cfg.step_size, gamma=plan.cfg.gamma)
    return Scheduler("step", sched)


@SCHEDULES.register("cosine_warm_restarts")
def _cosine_restarts(plan: _Plan) -> Scheduler:
    c = plan.cfg
    sched = lr_scheduler.CosineAnnealingWarmRestarts(plan.optimizer, T_0=c.t0, T_mult=c.t_mult,
                                                     eta_min=c.min_lr)
    return Scheduler("cosine_warm_restarts", sched)


def warmup_cosine_factor(step: int, warmup: int, total: int, base_lr: float, min_lr: float) -> float:
    """LR multiplier at batch ``step``: linear warmup to 1 over ``warmup`` steps, then a
    cosine from 1 down to ``min_lr / base_lr`` at the last step (``total - 1``)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    floor = min_lr / base_lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@SCHEDULES.register("warmup_cosine")
def _warmup_cosine(plan: _Plan) -> Scheduler:
    c = plan.cfg
    warmup = c.warmup_epochs * plan.steps_per_epoch
    total = plan.total_steps
    if warmup >= total:
        raise ConfigError(f"schedule.warmup_epochs={c.warmup_epochs}: must be less than the "
                          f"{plan.epochs} training epochs")
    # initial_lr: the base LR even when the optimizer state was loaded mid-schedule
    lambdas = [
        (lambda s, base=g.get("initial_lr", g["lr"]): warmup_cosine_factor(s, warmup, total, base, c.min_lr))
        for g in plan.optimizer.param_groups
    ]
    return Scheduler("warmup_cosine", lr_scheduler.LambdaLR(plan.optimizer, lambdas),
                     per_batch=True, total_batch_steps=total - 1)


@SCHEDULES.register("one_cycle")
def _one_cycle(plan: _Plan) -> Scheduler:
    c = plan.cfg
    # max_lr: the peak even when the optimizer state was loaded mid-schedule
    max_lrs = [g.get("max_lr", g["lr"]) for g in plan.optimizer.param_groups]
    div_factor = 25.0  # torch's default: start at max_lr / 25
    final_div = (max_lrs[0] / div_factor) / c.min_lr if c.min_lr > 0 else 1e4
    # momentum/betas are searched hyperparameters: cycling them would override the trial's values
    sched = lr_scheduler.OneCycleLR(plan.optimizer, max_lr=max_lrs, total_steps=plan.total_steps,
                                    div_factor=div_factor, final_div_factor=final_div,
                                    cycle_momentum=False)
    return Scheduler("one_cycle", sched, per_batch=True, total_batch_steps=plan.total_steps - 1)


def build_scheduler(cfg: ScheduleConfig, optimizer: torch.optim.Optimizer, epochs: int,
                    steps_per_epoch: int, mode: str = "max") -> Scheduler:
    """Validate ``cfg`` and build its schedule for a run of ``epochs`` x ``steps_per_epoch``
    optimizer steps. ``mode`` is the monitored metric's direction for the plateau
    schedule: "min" for a loss, "max" for accuracy/AUC. With SAM the schedule is
    attached to ``optimizer.base_optimizer`` (sharing the same param groups).

    To resume, build the scheduler before ``optimizer.load_state_dict`` (building a
    torch scheduler resets the groups' LRs), then ``Scheduler.load_state_dict``."""
    cfg.validate()
    if mode not in PLATEAU_MODES:
        raise ConfigError(f"schedule mode={mode!r}: must be 'min' (loss) or 'max' (accuracy, AUC)")
    if epochs < 1 or steps_per_epoch < 1:
        raise ConfigError(f"schedule: epochs={epochs} and steps_per_epoch={steps_per_epoch} must be >= 1")
    target = getattr(optimizer, "base_optimizer", optimizer)
    plan = _Plan(cfg, target, epochs, steps_per_epoch, mode)
    return SCHEDULES.get(cfg.name, where="schedule.name")(plan)
