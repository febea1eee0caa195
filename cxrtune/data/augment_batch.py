"""Training augmentation of a whole uint8 batch at once, on the batch's device (kornia).

``BatchAugment`` is the batched counterpart of ``augment.train_transform``: the same
ops, in the same order, with the same probabilities and ranges, but every sample of a
(B, C, S, S) uint8 batch gets its own random parameters in one call on the GPU instead
of one torchvision call per image in a DataLoader worker. ``normalize_batch_eval`` is
the batched ``eval_transform``.

Seeding: every random parameter is drawn on the CPU from torch's default generator,
which ``__call__`` seeds from the caller's ``torch.Generator`` (or int seed) and
restores afterwards, so a call never changes the caller's global RNG state and the same
seed gives the same parameters on any device. The CUDA generator of the batch's device
gets the same save/seed/restore, as a guard should any kornia op ever draw there.
Swapping the global generator is not thread-safe: no other thread may draw from torch's
global RNG during a call (the training loop is single-threaded; DataLoader workers are
processes with their own RNG).

Differences from the torchvision path that remain (the rest matches op for op; the
tests check each op against torchvision's functional with the same parameters):
- Ops run on float32 in [0, 1]; torchvision runs them on uint8 and truncates each op's
  output to an integer (a bias of up to -1/255 per intensity op, absent here).
- RandomResizedCrop resizes without antialiasing (kornia's crop does not pass it on);
  torchvision antialiases. This only matters when a crop is shrunk, i.e. size < S;
  the trainer uses size == S, where every crop is enlarged and the two agree.
- With the crop off and size != S the batch is resized (bilinear, antialiased) to
  ``size``; torchvision's pipeline has no resize then and returns S x S.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Union

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import nn

from .augment_config import AugmentConfig

log = logging.getLogger(__name__)

Seed = Union[int, torch.Generator]


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image batch, got {x.dtype}")
    if x.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) image batch, got shape {tuple(x.shape)}")
    # the arithmetic of torchvision's ToDtype(float32, scale=True), so that the eval
    # path is bit-identical to eval_transform
    return x.to(torch.float32).mul_(1.0 / 255)


def _normalize(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    # float32 tensors rather than Python scalars, as torchvision's Normalize does
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    return x.sub_(m).div_(s)


def normalize_batch_eval(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 (B, C, H, W) -> normalised float32 (B, C, H, W) on the same device, no augmentation."""
    return _normalize(_to_unit(x), mean, std)


class _Perspective(K.RandomPerspective):
    """kornia's RandomPerspective with torchvision's corner offsets and pixel convention.

    torchvision draws each corner offset as an integer in 0..int(d * (S // 2)) and
    applies the homography to PIL-style coordinates (pixel centres at i + 0.5); kornia
    draws offsets continuously in [0, d * S / 2) and uses pixel centres at i. Both are
    mapped onto torchvision's here, reusing kornia's uniform draws, so the op is
    torchvision's exactly (up to float rounding)."""

    _SIGNS = ((1.0, 1.0), (-1.0, 1.0), (-1.0, -1.0), (1.0, -1.0))  # towards the centre, per corner

    def __init__(self, distortion_scale: float) -> None:
        super().__init__(distortion_scale, p=0.5, align_corners=False)
        self._d = float(distortion_scale)

    def forward_parameters(self, batch_shape) -> Dict[str, torch.Tensor]:
        params = super().forward_parameters(batch_shape)
        h, w = int(batch_shape[-2]), int(batch_shape[-1])
        start, end = params["start_points"], params["end_points"]
        reach = torch.tensor([self._d * w / 2, self._d * h / 2], dtype=start.dtype, device=start.device)
        bound = torch.tensor([int(self._d * (w // 2)) + 1, int(self._d * (h // 2)) + 1],
                             dtype=start.dtype, device=start.device)
        u = ((end - start).abs() / reach.clamp(min=1e-12)).clamp(0.0, 1.0)
        offset = torch.minimum(torch.floor(u * bound), bound - 1)
        signs = torch.tensor(self._SIGNS, dtype=start.dtype, device=start.device)
        params["start_points"] = start - 0.5
        params["end_points"] = start + offset * signs - 0.5
        return params

    def apply_transform(self, input: torch.Tensor, params: Dict[str, torch.Tensor], flags: Dict[str, Any],
                        transform: Optional[torch.Tensor] = None) -> torch.Tensor:
        # torchvision's fill=0 warps a ones-mask alongside the image and multiplies by it,
        # so the edge pixels that straddle the border are darkened twice; kept, to match
        both = torch.cat([input, torch.ones_like(input[:, :1])], dim=1)
        out = super().apply_transform(both, params, flags, transform)
        return out[:, :-1] * out[:, -1:]


class _ColorJitter(nn.Module):
    """ColorJitter(brightness, contrast) with torchvision's per-sample order.

    kornia draws one order of the steps per call (for the whole batch); torchvision one
    per image. Brightness and contrast commute except where the first step clips, so the
    order matters only there; both orders are run with the same factors and each sample
    takes one of them with probability 1/2."""

    def __init__(self, brightness: float, contrast: float) -> None:
        super().__init__()
        self.first = K.ColorJitter(brightness=brightness, contrast=contrast, p=1.0, order=(0, 1))
        self.second = K.ColorJitter(brightness=brightness, contrast=contrast, p=1.0, order=(1, 0))
        self.both = brightness > 0 and contrast > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = self.first.forward_parameters(x.shape)
        if not self.both:  # a single step has no order
            return self.first(x, params=params)
        brightness_first = (torch.rand(x.shape[0]) < 0.5).to(x.device).view(-1, 1, 1, 1)
        return torch.where(brightness_first, self.first(x, params=dict(params)),
                           self.second(x, params=dict(params)))


class _AutoContrast(K.RandomAutoContrast):
    """torchvision's autocontrast behind kornia's per-sample Bernoulli gate.

    kornia's own rescales by (x - min) / (max - min + 1e-6), which turns a constant
    image black; torchvision leaves a constant channel as it is."""

    def apply_transform(self, input: torch.Tensor, params: Dict[str, torch.Tensor], flags: Dict[str, Any],
                        transform: Optional[torch.Tensor] = None) -> torch.Tensor:
        lo = input.amin(dim=(-2, -1), keepdim=True)
        hi = input.amax(dim=(-2, -1), keepdim=True)
        flat = hi == lo
        lo = torch.where(flat, torch.zeros_like(lo), lo)
        hi = torch.where(flat, torch.ones_like(hi), hi)
        return ((input - lo) * (1.0 / (hi - lo))).clamp_(0.0, 1.0)


def _build_ops(a: AugmentConfig, size: int) -> list[nn.Module]:
    # the order of augment.train_transform; each op's comment names its torchvision twin
    ops: list[nn.Module] = []
    if a.crop_scale < 1.0:  # RandomResizedCrop(size, scale=(crop_scale, 1), ratio=(3/4, 4/3))
        ops.append(K.RandomResizedCrop((size, size), scale=(a.crop_scale, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0),
                                       align_corners=False, cropping_mode="slice"))
    if a.perspective > 0:  # RandomPerspective(distortion_scale, p=0.5)
        ops.append(_Perspective(a.perspective))
    if a.rotation > 0:  # RandomRotation(degrees): always applied, nearest, zero fill
        ops.append(K.RandomRotation(a.rotation, resample="nearest", align_corners=False, p=1.0))
    if a.hflip > 0:
        ops.append(K.RandomHorizontalFlip(p=a.hflip))
    if a.vflip > 0:
        ops.append(K.RandomVerticalFlip(p=a.vflip))
    if a.brightness > 0 or a.contrast > 0:
        # kornia's ColorJitter uses torchvision's factors (brightness multiplies, contrast
        # blends with the image mean); ColorJiggle would add to the brightness instead
        ops.append(_ColorJitter(a.brightness, a.contrast))
    if a.blur > 0:  # RandomApply([GaussianBlur(3)], p): sigma ~ U(0.1, 2.0), reflect padding
        ops.append(K.RandomGaussianBlur((3, 3), (0.1, 2.0), border_type="reflect", p=a.blur))
    if a.sharpness > 0:
        # RandomAdjustSharpness(2.0, p); kornia's scalar sharpness s draws the factor
        # from [0, s], so the range (2, 2) pins it at torchvision's fixed 2
        ops.append(K.RandomSharpness((2.0, 2.0), p=a.sharpness))
    if a.autocontrast > 0:
        ops.append(_AutoContrast(p=a.autocontrast))
    return ops


def _seed_from(seed: Seed) -> int:
    if isinstance(seed, torch.Generator):
        # advances the caller's generator, so successive batches differ
        return int(torch.randint(0, 2**63 - 1, (1,), generator=seed, device=seed.device).item())
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or a torch.Generator, got {type(seed).__name__}")
    return seed


class BatchAugment:
    """uint8 (B, C, S, S) batch -> augmented, normalised float32 (B, C, size, size), same device.

    A plain callable rather than an nn.Module: moving kornia's modules to the GPU would
    move their parameter sampling there too, out of reach of the CPU seeding below.
    """

    def __init__(self, cfg: AugmentConfig, size: int, mean: float, std: float) -> None:
        self.cfg = cfg.resolved()
        self.size, self.mean, self.std = int(size), float(mean), float(std)
        self.ops = _build_ops(self.cfg, self.size)
        log.debug("batch augmentation: %s", ", ".join(type(op).__name__ for op in self.ops) or "none")

    @property
    def active(self) -> bool:
        return bool(self.ops)

    def __repr__(self) -> str:
        return f"BatchAugment({self.cfg}, size={self.size}, mean={self.mean}, std={self.std})"

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (self.size, self.size):
            return x
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)

    def __call__(self, x: torch.Tensor, seed: Seed) -> torch.Tensor:
        """Augment ``x`` with parameters drawn from ``seed``.

        ``seed`` is an int, or a ``torch.Generator`` from which one 63-bit seed is drawn
        (advancing it). A CPU generator is the cheap choice: drawing from a CUDA one
        waits for the device."""
        unit = _to_unit(x)
        if not self.ops or x.shape[0] == 0:
            # consume a seed all the same, so a generator advances alike whatever the preset
            _seed_from(seed)
            return _normalize(self._resize(unit), self.mean, self.std)
        out = self._augment(unit, _seed_from(seed))
        return _normalize(out, self.mean, self.std)

    def _augment(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        # Only the generators that can be drawn from are saved and seeded, not all of them
        # (torch.random.fork_rng + torch.manual_seed visit every CUDA device and would
        # reseed the caller's other devices).
        generators = [torch.default_generator]
        if x.device.type == "cuda":
            generators.append(torch.cuda.default_generators[x.device.index])
        saved = [g.get_state() for g in generators]
        try:
            for g in generators:
                g.manual_seed(seed)
            if self.cfg.crop_scale >= 1.0:
                x = self._resize(x)
            for op in self.ops:
                x = op(x)
            return x
        finally:
            for g, state in zip(generators, saved):
                g.set_state(state)


__all__ = ["BatchAugment", "normalize_batch_eval"]
