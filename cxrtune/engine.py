"""The training loop of one trial: train_one_epoch, evaluate, fit (with checkpoint/resume).

It knows nothing of Ray or MLflow: ``fit`` takes a TrialConfig, the prepared data and
a ``report(metrics, checkpoint_dir)`` callback. The Ray trainable and `cxrtune train`
are two thin callers of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler

from .atomic import replacing_dir
from .config import TrialConfig, from_dict, to_dict
from .cost import measure_costs
from .cost_names import TRAIN_S
from .data.augment import eval_transform, train_transform
from .data.cxrnorm import normalized
from .data.augment_batch import BatchAugment
from .data.dataset import CachedImages, channel_stats
from .data.device_batches import IndexBatches, batch_normalizer, normalize_placed, place_images
from .data.pipeline import PreparedData
from .data.samplers import SAMPLERS
from .errors import ConfigError
from .losses import build_loss
from .metrics import confusion, scheme_metrics
from .models import (build_model, input_size, keep_frozen_batchnorm_in_eval, logits_and_aux,
                     set_backbone_frozen)
from .optim import (build_optimizer, build_scheduler, disable_running_stats, enable_running_stats,
                    is_second_order)
from .selection import BestSoFar

log = logging.getLogger(__name__)

# cuBLAS reads this when it creates its first handle, which may be long before a trial
# asks for determinism (an earlier trial of the same Ray worker, a benchmark): set it
# at import, before any CUDA work. It only reserves a small fixed workspace.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

Report = Callable[[dict[str, float], Path], None]
CHECKPOINT_FILE = "checkpoint.pt"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the trial cannot continue."""


# ------------------------------------------------------------------ set-up


def pick_device(name: str) -> torch.device:
    """``auto``: cuda:0 when present, else the CPU; says which."""
    if name == "auto":
        name = "cuda:0" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"loop.device={name!r} but CUDA is not available; use device: auto or cpu")
    log.info("training on %s", torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU")
    return device


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed every RNG and set the process-wide determinism switches both ways: a reused
    Ray worker must not carry one trial's determinism (or lack of it) into the next."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    # warn_only: a few CUDA kernels have no deterministic version; the run goes on.
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    # benchmark picks the fastest (possibly nondeterministic) kernels for the fixed input size
    torch.backends.cudnn.benchmark = not deterministic


def derived_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (e.g. seed, epoch, position), well mixed."""
    state = np.random.SeedSequence([k % 2**63 for k in keys]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


class EpochSampler(Sampler):
    """Wraps the training sampler so that an epoch's draws are a function of (seed, epoch).

    ``set_epoch`` reseeds the sampler's generator, and every index is yielded as
    ``(epoch, position, index)`` for :class:`SeededItems`. No sampler or worker RNG
    state then needs to be checkpointed: a resumed run, with or without DataLoader
    workers (persistent or not), draws exactly what a straight run draws."""

    def __init__(self, inner: Sampler, generator: torch.Generator, seed: int) -> None:
        self.inner, self.generator, self.seed = inner, generator, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.generator.manual_seed(derived_seed(self.seed, epoch))

    def __iter__(self):
        epoch = self.epoch
        for position, index in enumerate(self.inner):
            yield epoch, position, index

    def __len__(self) -> int:
        return len(self.inner)


class SeededItems(Dataset):
    """``dataset[index]`` with the augmentation RNG seeded from (seed, epoch, position).

    Worker processes have their own RNG streams, which a checkpoint cannot capture;
    seeding per item makes each image's augmentation independent of which worker (or
    the main process) draws it. The caller's RNG state is left untouched."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int, int]):
        epoch, position, index = key
        # the CPU generator alone (augmentation runs on CPU tensors): torch.manual_seed
        # and fork_rng also visit every accelerator backend, ~50x slower per image
        rng = torch.default_generator
        saved = rng.get_state()
        try:
            rng.manual_seed(derived_seed(self.seed, epoch, position))
            return self.dataset[index]
        finally:
            rng.set_state(saved)


@dataclass
class Setup:
    """The objects a run is made of (built once, restored from a checkpoint on resume)."""

    model: nn.Module  # the module whose state is saved (never the compiled wrapper)
    forward: nn.Module  # what is called: the compiled model when loop.compile
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_loader: DataLoader
    val_loader: DataLoader
    generator: torch.Generator
    device: torch.device
    input_stats: tuple[float, float]


def _train_sampler(cfg: TrialConfig, train_y: np.ndarray, generator: torch.Generator) -> EpochSampler:
    inner = SAMPLERS.get(cfg.sampler)(train_y, generator) or RandomSampler(range(len(train_y)), generator=generator)
    return EpochSampler(inner, generator, cfg.loop.seed)


def _dataloaders(cfg: TrialConfig, data: PreparedData, images: np.ndarray, generator: torch.Generator,
                 stats: tuple[float, float]) -> tuple[DataLoader, DataLoader]:
    """Per-image tensors and augmentation on the CPU, in DataLoader workers."""
    mean, std = stats
    train_rows, train_y = data.rows("train"), data.targets("train")
    train = CachedImages(images, train_rows, train_y, train_transform(cfg.augment, data.cache.size, mean, std))
    val = CachedImages(images, data.rows("val"), data.targets("val"), eval_transform(mean, std))
    loop = cfg.loop
    # The loaders' own generators only seed worker processes (overridden per item by
    # SeededItems); without them DataLoader draws from the global RNG, and a resumed
    # run (fresh persistent workers) would draw once more than a straight one.
    # A last batch of one image breaks BatchNorm; dropping it costs < 1 batch per epoch.
    train_loader = DataLoader(SeededItems(train, loop.seed), batch_size=loop.batch_size,
                              sampler=_train_sampler(cfg, train_y, generator),
                              generator=torch.Generator().manual_seed(loop.seed),
                              num_workers=loop.num_workers, drop_last=len(train) > loop.batch_size,
                              persistent_workers=loop.num_workers > 0)
    val_loader = DataLoader(val, batch_size=loop.eval_batch_size, num_workers=loop.num_workers,
                            generator=torch.Generator().manual_seed(loop.seed))
    return train_loader, val_loader


def _device_images(cfg: TrialConfig, data: PreparedData, device: torch.device) -> torch.Tensor:
    """The trial's images placed for ``device`` once. On CUDA the raw cache goes there and
    CXR-Norm runs on it at trial start (the log gives its time; no per-trial copy on
    disk); elsewhere the memoised OpenCV result is placed."""
    if device.type != "cuda":
        return place_images(_normalized(data, cfg), device)
    return normalize_placed(place_images(data.cache.images, device, cfg.loop.gpu_share), cfg.preprocess, device)


def _device_batches(cfg: TrialConfig, data: PreparedData, generator: torch.Generator,
                    device: torch.device) -> tuple[IndexBatches, IndexBatches, tuple[float, float]]:
    """The images placed on the device once; batches gathered by index, augmented as a whole."""
    placed = _device_images(cfg, data, device)
    train_rows, train_y = data.rows("train"), data.targets("train")
    mean, std = stats = channel_stats(placed, train_rows)
    loop = cfg.loop
    train = IndexBatches(placed, train_rows, train_y, loop.batch_size,
                         BatchAugment(cfg.augment, data.cache.size, mean, std), device,
                         sampler=_train_sampler(cfg, train_y, generator),
                         batch_seed=lambda epoch, batch: derived_seed(loop.seed, epoch, batch),
                         drop_last=len(train_rows) > loop.batch_size)
    val = IndexBatches(placed, data.rows("val"), data.targets("val"), loop.eval_batch_size,
                       batch_normalizer(mean, std), device)
    return train, val, stats


def _uses_device_batches(cfg: TrialConfig, device: torch.device) -> bool:
    pipeline = cfg.loop.input_pipeline
    return pipeline == "device" or (pipeline == "auto" and device.type == "cuda")


def _loaders(cfg: TrialConfig, data: PreparedData, generator: torch.Generator, device: torch.device):
    """Training and validation batches by ``loop.input_pipeline``, and the input statistics."""
    if _uses_device_batches(cfg, device):
        return _device_batches(cfg, data, generator, device)
    images = _normalized(data, cfg)
    stats = channel_stats(images, data.rows("train"))
    return (*_dataloaders(cfg, data, images, generator, stats), stats)


def _normalized(data: PreparedData, cfg: TrialConfig) -> np.ndarray:
    """The cache under the trial's CXR-Norm, memoised next to the cache it was computed
    from, within the data's memo budget."""
    return normalized(data.cache.images, data.cache.fingerprint, cfg.preprocess,
                      data.cache.directory.parent / "cxrnorm", budget_bytes=int(data.cfg.memo_budget_gb * 1e9))


def build_setup(cfg: TrialConfig, data: PreparedData, device: torch.device) -> Setup:
    """Model, loss, optimizer, schedule and loaders for ``cfg`` on ``device``."""
    seed_everything(cfg.loop.seed, cfg.loop.deterministic)
    generator = torch.Generator().manual_seed(cfg.loop.seed)
    train_loader, val_loader, stats = _loaders(cfg, data, generator, device)
    if cfg.model.weights != "none" and data.cache.size < input_size(cfg.model.backbone):
        # Pretrained features were learnt at their native scale.
        log.warning("%s weights were trained at %d px; data.image_size is %d", cfg.model.backbone,
                    input_size(cfg.model.backbone), data.cache.size)
    model = build_model(cfg.model, data.scheme.num_classes, data.cache.size).to(device)
    if device.type == "cuda" and cfg.loop.channels_last:
        model = model.to(memory_format=torch.channels_last)
    counts = np.bincount(data.targets("train"), minlength=data.scheme.num_classes)
    criterion = build_loss(cfg.loss, counts.tolist()).to(device)
    optimizer = build_optimizer(cfg.optimizer, model.parameters())
    steps = _steps_per_epoch(cfg, len(train_loader))
    scheduler = build_scheduler(cfg.schedule, optimizer, cfg.loop.epochs, steps, mode=cfg.loop.mode)
    forward = torch.compile(model) if cfg.loop.compile else model
    return Setup(model, forward, criterion, optimizer, scheduler, train_loader, val_loader, generator,
                 device, stats)


def _train_batches(cfg: TrialConfig, batches: int) -> int:
    """Micro-batches one epoch trains on."""
    if cfg.loop.max_train_batches:
        batches = min(batches, cfg.loop.max_train_batches)
    return batches


def _steps_per_epoch(cfg: TrialConfig, batches: int) -> int:
    # the last, partial group of micro-batches steps too: ceil
    return max(1, math.ceil(_train_batches(cfg, batches) / cfg.optimizer.grad_accum_steps))


def _group_size(i: int, accum: int, batches: int) -> int:
    """How many micro-batches the accumulation group of batch ``i`` has: ``accum``, or
    fewer for the epoch's last group, whose mean gradient must not be scaled down."""
    return min(accum, batches - (i // accum) * accum)


# ------------------------------------------------------------------ one epoch


def _autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        # bf16 has fp32's range: no GradScaler, so SAM's two passes need no unscaling.
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_inputs(x: torch.Tensor, device: torch.device, cfg: TrialConfig) -> torch.Tensor:
    """A batch of (B, 1, S, S) inputs as the model takes them: on ``device``, replicated to
    the trial's channels, in its memory format."""
    x = x.to(device, non_blocking=True)
    if cfg.model.in_channels == 3:
        x = x.expand(-1, 3, -1, -1)
    if device.type == "cuda" and cfg.loop.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device, cfg: TrialConfig):
    return model_inputs(x, device, cfg), y.to(device, non_blocking=True)


def _loss(s: Setup, cfg: TrialConfig, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with _autocast(s.device, cfg.loop.amp):
        logits, aux = logits_and_aux(s.forward(x))
        loss = s.criterion(logits, y)
        if aux is not None:
            loss = loss + cfg.loop.aux_loss_weight * s.criterion(aux, y)
    return loss


def _check_finite(loss: torch.Tensor, epoch: int, batch: int, cfg: TrialConfig) -> None:
    if not torch.isfinite(loss):
        raise TrainingDiverged(
            f"loss became {loss.item()} at epoch {epoch + 1} batch {batch + 1} (optimizer.lr="
            f"{cfg.optimizer.lr:g}); the trial diverged: lower the learning rate, add "
            "loop.grad_clip, or check the data")


def _clip(s: Setup, cfg: TrialConfig) -> None:
    if cfg.loop.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(s.model.parameters(), cfg.loop.grad_clip)


def _sam_step(s: Setup, cfg: TrialConfig, x: torch.Tensor, y: torch.Tensor) -> None:
    """SAM's second pass at w + e_w; BatchNorm statistics are not updated twice."""
    s.optimizer.first_step(zero_grad=True)
    disable_running_stats(s.model)
    try:
        _loss(s, cfg, x, y).backward()
    finally:
        enable_running_stats(s.model)
    _clip(s, cfg)
    s.optimizer.second_step(zero_grad=True)


def _start_epoch(s: Setup, epoch: int) -> None:
    """Train mode (frozen BatchNorm excepted) and the epoch's sampling/augmentation seeds."""
    s.model.train()
    keep_frozen_batchnorm_in_eval(s.model)
    sampler = getattr(s.train_loader, "sampler", None)
    if isinstance(sampler, EpochSampler):
        sampler.set_epoch(epoch)


def train_one_epoch(s: Setup, cfg: TrialConfig, epoch: int) -> float:
    """One pass over the training loader; returns the mean training loss."""
    _start_epoch(s, epoch)
    accum = cfg.optimizer.grad_accum_steps
    batches = _train_batches(cfg, len(s.train_loader))
    second_order = is_second_order(s.optimizer)
    total, n = 0.0, 0
    s.optimizer.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(s.train_loader):
        if i >= batches:
            break
        x, y = _to_device(x, y, s.device, cfg)
        loss = _loss(s, cfg, x, y)
        _check_finite(loss, epoch, i, cfg)
        (loss / _group_size(i, accum, batches)).backward()
        total += loss.item() * len(y)
        n += len(y)
        if (i + 1) % accum and i + 1 < batches:
            continue
        if second_order:
            _sam_step(s, cfg, x, y)
        else:
            _clip(s, cfg)
            s.optimizer.step()
            s.optimizer.zero_grad(set_to_none=True)
        s.scheduler.step_batch()
    return total / max(n, 1)


@torch.no_grad()
def eval_logits(model: nn.Module, x: torch.Tensor, device: torch.device, cfg: TrialConfig) -> torch.Tensor:
    """fp32 logits of one batch of evaluation inputs ((B, 1, S, S), as ``eval_transform``
    makes them), computed as validation and test compute them (the trial's channels,
    memory format and autocast). The model must be in eval mode."""
    with _autocast(device, cfg.loop.amp):
        logits, _ = logits_and_aux(model(model_inputs(x, device, cfg)))
    return logits.float()


def probabilities(logits: torch.Tensor) -> np.ndarray:
    """Class probabilities (fp32 softmax) of ``eval_logits``' output, on the CPU."""
    return torch.softmax(logits, dim=1).cpu().numpy()


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device,
            cfg: TrialConfig) -> tuple[np.ndarray, np.ndarray, float]:
    """(true labels, class probabilities, mean loss) over ``loader``, augmentation-free."""
    model.eval()
    ys, probs, total = [], [], 0.0
    for i, (x, y) in enumerate(loader):
        if cfg.loop.max_eval_batches and i >= cfg.loop.max_eval_batches:
            break
        logits = eval_logits(model, x, device, cfg)
        y = y.to(device, non_blocking=True)
        total += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        ys.append(y.cpu().numpy())
        probs.append(probabilities(logits))
    y_true = np.concatenate(ys)
    return y_true, np.concatenate(probs), total / max(len(y_true), 1)


def split_metrics(y_true: np.ndarray, probs: np.ndarray, loss: float, data: PreparedData,
                  prefix: str) -> dict[str, float]:
    if not np.isfinite(probs).all():
        raise TrainingDiverged("the model's outputs became NaN/inf; the trial diverged: lower the "
                               "learning rate or add loop.grad_clip")
    return {f"{prefix}loss": loss, **scheme_metrics(y_true, probs, data.scheme, prefix)}


def evaluate(s: Setup, cfg: TrialConfig, data: PreparedData, loader: DataLoader,
             prefix: str = "val/") -> dict[str, float]:
    return split_metrics(*predict(s.forward, loader, s.device, cfg), data, prefix)


@dataclass(frozen=True)
class Evaluation:
    """A checkpoint scored on one split: metrics, confusion matrix, raw predictions."""

    metrics: dict[str, float]
    confusion: np.ndarray
    y_true: np.ndarray
    probs: np.ndarray
    config: TrialConfig
    model: nn.Module
    input_stats: tuple[float, float]
    images: np.ndarray  # the whole cache under the trial's CXR-Norm (uint8 (N, S, S)): what the model saw
    device: torch.device

    def inputs(self, rows: np.ndarray) -> torch.Tensor:
        """The model's input tensors for cache ``rows``, as evaluation builds them."""
        transform = eval_transform(*self.input_stats)
        return torch.stack([transform(torch.from_numpy(np.array(self.images[r]))[None]) for r in rows])


def evaluate_checkpoint(checkpoint: Path, data: PreparedData, split: str = "test",
                        device: Optional[torch.device] = None) -> Evaluation:
    """Score a saved checkpoint on ``split`` (the held-out test split by default)."""
    device = device or pick_device("auto")
    state = torch.load(Path(checkpoint) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    cfg = from_dict(TrialConfig, state["config"])
    # The checkpoint holds every weight: no pretrained file needs to be found again.
    model = build_model(dataclasses.replace(cfg.model, weights="none"), data.scheme.num_classes,
                        data.cache.size)
    model.load_state_dict(state["model"])
    model.to(device)
    mean, std = state["input_stats"]
    images = _normalized(data, cfg)
    ds = CachedImages(images, data.rows(split), data.targets(split), eval_transform(mean, std))
    loader = DataLoader(ds, batch_size=cfg.loop.eval_batch_size)
    full = dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, max_eval_batches=0))
    y_true, probs, loss = predict(model, loader, device, full)
    metrics = split_metrics(y_true, probs, loss, data, f"{split}/")
    conf = confusion(y_true, probs.argmax(1), data.scheme.num_classes)
    return Evaluation(metrics, conf, y_true, probs, cfg, model, (mean, std), images, device)


# ------------------------------------------------------------------ checkpoints


@dataclass
class Progress:
    """What a checkpoint carries besides the model: where the run stands."""

    epoch: int = 0  # epochs completed
    best: Optional[float] = None
    best_epoch: int = -1
    stale_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def _rng_state(s: Setup) -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # numpy's key array travels as a tensor so the checkpoint loads with weights_only=True.
    state = {"python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state(), "loader": s.generator.get_state()}
    if s.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(s.device)
    return state


def _set_rng_state(s: Setup, state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    s.generator.set_state(state["loader"])
    if "cuda" in state and s.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], s.device)


def save_checkpoint(directory: Path, s: Setup, progress: Progress, cfg: TrialConfig) -> Path:
    """Write model, optimizer (SAM: the base optimizer's state), schedule, progress and RNG
    states into ``directory``, atomically: a crash mid-write leaves the previous one intact."""
    with replacing_dir(directory) as tmp:
        torch.save({
            "model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(),
            "scheduler": s.scheduler.state_dict(), "progress": progress.__dict__, "rng": _rng_state(s),
            "input_stats": s.input_stats, "config": to_dict(cfg),
        }, tmp / CHECKPOINT_FILE)
    return directory


# Config keys a resumed run may change without --resume-with-changes, and why harmless:
RESUME_MAY_DIFFER = frozenset({
    "output_dir",  # where results are written
    "loop.epochs",  # extending a run (a schedule sized by epochs, e.g. one_cycle, then differs)
    "loop.max_train_batches", "loop.max_eval_batches",  # --debug's caps
    "loop.num_workers",  # sampling and augmentation are seeded per image, not per worker
    "loop.eval_batch_size",  # evaluation only
    "loop.cost_repeats",  # measuring only
    "loop.device",  # where it runs
    "loop.gpu_share",  # where the images are held, not what is computed
    "loop.select_mode",  # must agree with loop.select_metric, which is compared
    "data.cache_dir", "data.workers",  # where and how fast the image cache is built
})


def _checkpoint_file(path: Path) -> Path:
    """The checkpoint file of ``path``: the file itself, a checkpoint folder or a run folder."""
    path = Path(path)
    if path.is_file():
        return path
    for file in (path / CHECKPOINT_FILE, path / "checkpoint" / CHECKPOINT_FILE):
        if file.is_file():
            return file
    why = "does not exist" if not path.exists() else f"holds no {CHECKPOINT_FILE}"
    raise ConfigError(f"resume checkpoint {path} {why}; pass the checkpoint folder of an earlier run "
                      "(<output_dir>/checkpoint), or leave out --resume to start a new run")


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The saved state of a checkpoint folder (or file), with errors a user can act on."""
    file = _checkpoint_file(path)
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged file raises anything
        raise ConfigError(f"resume checkpoint {file} cannot be read ({type(exc).__name__}); it is "
                          "damaged or not a cxrtune checkpoint: resume from another one") from None


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, (list, tuple)) else v
    return out


def config_changes(saved: dict[str, Any], cfg: TrialConfig) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, ``cfg``'s value) for every key that differs, except
    RESUME_MAY_DIFFER; keys only one side knows (added in another version) are skipped."""
    old, new = _flat(saved), _flat(to_dict(cfg))
    return [(k, old[k], new[k]) for k in sorted(old.keys() & new.keys())
            if old[k] != new[k] and k not in RESUME_MAY_DIFFER]


def check_resume_config(path: Path, state: dict[str, Any], cfg: TrialConfig,
                        allow_changes: bool = False) -> None:
    """A resumed run must be the run that was checkpointed: refuse a changed config
    (a different lr or rho silently makes a different experiment) unless allowed."""
    changes = config_changes(state.get("config", {}), cfg)
    if not changes:
        return
    listed = "; ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, old, new in changes)
    if allow_changes:
        log.warning("resuming %s with changed settings: %s", path, listed)
        return
    raise ConfigError(f"resume checkpoint {path} was trained with other settings: {listed}; resume "
                      "with the checkpoint's values, or pass --resume-with-changes to continue "
                      "with the new ones")


def load_checkpoint(path: Path, s: Setup, state: Optional[dict[str, Any]] = None) -> Progress:
    """Restore ``s`` in place from a checkpoint directory (or file, or its already read
    ``state``); returns the progress."""
    state = state if state is not None else read_checkpoint(path)
    try:
        s.model.load_state_dict(state["model"])
    except RuntimeError:
        saved = state.get("config", {}).get("model", {})
        raise ConfigError(f"resume checkpoint {path} holds weights of another network "
                          f"(model.backbone={saved.get('backbone')!r}, task "
                          f"{state.get('config', {}).get('data', {}).get('task')!r}); resume with "
                          "the config it was trained with") from None
    s.optimizer.load_state_dict(state["optimizer"])
    s.scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(s, state["rng"])
    return Progress(**state["progress"])


# ------------------------------------------------------------------ the run


def _epoch(s: Setup, cfg: TrialConfig, data: PreparedData, epoch: int) -> dict[str, float]:
    frozen = epoch < cfg.model.freeze_epochs
    set_backbone_frozen(s.model, cfg.model.backbone, frozen)
    start = time.perf_counter()
    train_loss = train_one_epoch(s, cfg, epoch)
    train_s = time.perf_counter() - start
    metrics = evaluate(s, cfg, data, s.val_loader)
    lr = s.optimizer.param_groups[0]["lr"]
    s.scheduler.step_epoch(metrics[cfg.loop.select_metric])
    return {"epoch": epoch + 1, "train/loss": train_loss, **metrics, "lr": lr,
            "time/train_s": train_s, "time/epoch_s": time.perf_counter() - start}


def _costs(s: Setup, cfg: TrialConfig, data: PreparedData, device: torch.device) -> dict[str, float]:
    """The model's cost metrics (cost.py) when ``loop.cost_repeats`` asks for them."""
    if not cfg.loop.cost_repeats:
        return {}
    costs = measure_costs(s.model, cfg, data.cache.size, device, cfg.loop.cost_repeats)
    log.info("cost: %s", ", ".join(f"{k} {v:.4g}" for k, v in costs.items()))
    return costs


def fit(cfg: TrialConfig, data: PreparedData, report: Optional[Report] = None, *,
        workdir: Path, resume: Optional[Path] = None, device: Optional[torch.device] = None,
        allow_changes: bool = False, until: Optional[int] = None) -> Progress:
    """Train ``cfg`` on ``data``; after every epoch write a checkpoint to
    ``workdir/checkpoint`` and call ``report(metrics, that_dir)``. With ``resume``,
    continue exactly where that checkpoint left off; its config must equal ``cfg``
    (but for RESUME_MAY_DIFFER) unless ``allow_changes``. ``until``: stop once this many
    epochs are done (of ``loop.epochs``, which the schedule is sized by), to be resumed
    later, as cross-validation steps its folds epoch by epoch (cv.py)."""
    state = read_checkpoint(resume) if resume else None
    if state is not None:
        check_resume_config(resume, state, cfg, allow_changes)
    device = device or pick_device(cfg.loop.device)
    s = build_setup(cfg, data, device)
    progress = load_checkpoint(resume, s, state) if state is not None else Progress()
    if resume:
        log.info("resumed from %s after epoch %d", resume, progress.epoch)
    best = BestSoFar(cfg.loop.select_metric, cfg.loop.mode, progress.best, progress.best_epoch)
    costs = _costs(s, cfg, data, device)
    ckpt_dir = Path(workdir) / "checkpoint"
    for epoch in range(progress.epoch, min(cfg.loop.epochs, until or cfg.loop.epochs)):
        metrics = _epoch(s, cfg, data, epoch)
        if costs:
            train_s = sum(m["time/train_s"] for m in progress.history) + metrics["time/train_s"]
            metrics.update({**costs, TRAIN_S: train_s})
        value = metrics[cfg.loop.select_metric]
        if best.update(value, epoch + 1):
            progress.best, progress.best_epoch, progress.stale_epochs = best.value, best.step, 0
        else:
            progress.stale_epochs += 1
        progress.epoch = epoch + 1
        progress.history.append(metrics)
        metrics = {**metrics, "best": progress.best, "best_epoch": progress.best_epoch}
        log.info("epoch %d/%d  train/loss %.4f  val/loss %.4f  %s %.4f  (%.1f s)", epoch + 1,
                 cfg.loop.epochs, metrics["train/loss"], metrics["val/loss"], cfg.loop.select_metric,
                 value, metrics["time/epoch_s"])
        save_checkpoint(ckpt_dir, s, progress, cfg)
        if report is not None:
            report(metrics, ckpt_dir)
        patience = cfg.loop.early_stopping_patience
        if patience and progress.stale_epochs >= patience:
            log.info("early stopping: no improvement of %s for %d epochs", cfg.loop.select_metric, patience)
            break
    return progress
