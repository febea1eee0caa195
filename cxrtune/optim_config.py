"""How a trial optimizes: ``OptimConfig``, ``ScheduleConfig`` and the names they take,
without torch.

The optimizers and LR schedules are registered by ``optim.py`` under the names
declared here, and imported when one is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .errors import ConfigError
from .registry import Registry

if TYPE_CHECKING:
    from .optim import OptimInfo, Scheduler, _Plan

OPTIMIZERS: Registry[OptimInfo] = Registry("optimizer", names=("adam", "adamw", "sgd"), provider="cxrtune.optim")
SCHEDULES: Registry[Callable[[_Plan], Scheduler]] = Registry(
    "schedule", names=("none", "reduce_on_plateau", "step", "cosine_warm_restarts", "warmup_cosine", "one_cycle"),
    provider="cxrtune.optim")

# sam name -> adaptive flag of the SAM wrapper (None: no wrapper)
SAM_VARIANTS: Registry[bool | None] = Registry("sam variant")
SAM_VARIANTS.add("none", None)
SAM_VARIANTS.add("sam", False)
SAM_VARIANTS.add("asam", True)


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer, its hyperparameters and the optional SAM/ASAM wrapper."""

    name: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    betas: tuple[float, float] = (0.9, 0.999)  # adam, adamw
    sam: str = "none"  # none | sam | asam
    rho: float = 0.05  # SAM neighbourhood size (ASAM typically 0.5-2.0)
    asam_eta: float = 0.01  # ASAM: T_w = |w| + eta, so zero weights are perturbed too (Kwon et al.)
    grad_accum_steps: int = 1

    def validate(self, where: str = "optimizer") -> None:
        """Raise one ConfigError listing every invalid value."""
        problems: list[str] = []
        if self.name not in OPTIMIZERS:
            problems.append(f"{where}.name={self.name!r}: unknown optimizer; valid optimizers: "
                            f"{', '.join(OPTIMIZERS.names())}")
        if not self.lr > 0:
            problems.append(f"{where}.lr={self.lr}: must be > 0, e.g. 1e-3")
        if not self.weight_decay >= 0:
            problems.append(f"{where}.weight_decay={self.weight_decay}: must be >= 0 (e.g. 1e-4)")
        if not 0 <= self.momentum < 1:
            problems.append(f"{where}.momentum={self.momentum}: must be in [0, 1) (e.g. 0.9)")
        if self.nesterov and self.name == "sgd" and self.momentum == 0:
            problems.append(f"{where}.nesterov=true: needs momentum > 0 (e.g. 0.9)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"{where}.betas={list(self.betas)}: must be two numbers in [0, 1) "
                            "(e.g. [0.9, 0.999])")
        if self.sam not in SAM_VARIANTS:
            problems.append(f"{where}.sam={self.sam!r}: valid values: {', '.join(SAM_VARIANTS.names())}")
        if not self.rho >= 0:
            problems.append(f"{where}.rho={self.rho}: must be >= 0 (e.g. 0.05 for sam, 1.0 for asam)")
        if not self.asam_eta >= 0:
            problems.append(f"{where}.asam_eta={self.asam_eta}: must be >= 0 (e.g. 0.01)")
        if self.grad_accum_steps < 1:
            problems.append(f"{where}.grad_accum_steps={self.grad_accum_steps}: must be >= 1 (1 = off)")
        elif self.sam != "none" and self.grad_accum_steps > 1:
            problems.append(
                f"{where}.grad_accum_steps={self.grad_accum_steps} with {where}.sam={self.sam!r}: "
                "gradient accumulation is not supported with SAM/ASAM, whose two-pass step needs the "
                "full-batch gradient at the perturbed point (accumulating would mix gradients taken "
                "at different points); set grad_accum_steps=1 or sam=none")
        if problems:
            raise ConfigError("invalid optimizer config:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule; which fields matter depends on ``name``."""

    name: str = "reduce_on_plateau"  # reduce_on_plateau | step | cosine_warm_restarts | warmup_cosine | one_cycle | none
    factor: float = 0.1  # plateau: lr *= factor
    patience: int = 5  # plateau: epochs without improvement before reducing
    step_size: int = 10  # step: epochs between decays
    gamma: float = 0.5  # step: lr *= gamma
    t0: int = 10  # cosine warm restarts: epochs of the first cycle
    t_mult: int = 1  # cosine warm restarts: cycle length multiplier
    warmup_epochs: int = 1  # warmup_cosine
    min_lr: float = 0.0

    def validate(self, where: str = "schedule") -> None:
        """Raise one ConfigError listing every invalid value."""
        problems: list[str] = []
        if self.name not in SCHEDULES:
            problems.append(f"{where}.name={self.name!r}: unknown schedule; valid schedules: "
                            f"{', '.join(SCHEDULES.names())}")
        if not 0 < self.factor < 1:
            problems.append(f"{where}.factor={self.factor}: must be in (0, 1) (e.g. 0.1)")
        if self.patience < 0:
            problems.append(f"{where}.patience={self.patience}: must be >= 0 (e.g. 5)")
        if self.step_size < 1:
            problems.append(f"{where}.step_size={self.step_size}: must be >= 1 epoch (e.g. 10)")
        if not 0 < self.gamma <= 1:
            problems.append(f"{where}.gamma={self.gamma}: must be in (0, 1] (e.g. 0.5)")
        if self.t0 < 1:
            problems.append(f"{where}.t0={self.t0}: must be >= 1 epoch (e.g. 10)")
        if self.t_mult < 1:
            problems.append(f"{where}.t_mult={self.t_mult}: must be >= 1 (e.g. 2)")
        if self.warmup_epochs < 0:
            problems.append(f"{where}.warmup_epochs={self.warmup_epochs}: must be >= 0 (e.g. 1)")
        if not self.min_lr >= 0:
            problems.append(f"{where}.min_lr={self.min_lr}: must be >= 0 (e.g. 1e-6)")
        if problems:
            raise ConfigError("invalid schedule config:\n  " + "\n  ".join(problems))


__all__ = ["OptimConfig", "ScheduleConfig", "OPTIMIZERS", "SCHEDULES", "SAM_VARIANTS"]
