"""The names of the class-imbalance samplers, without torch (``TrialConfig.sampler`` is
checked against them); ``samplers.py`` registers the samplers themselves."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..registry import Registry

if TYPE_CHECKING:
    from .samplers import SamplerFactory

SAMPLERS: Registry[SamplerFactory] = Registry(
    "sampler", names=("shuffle", "oversample", "undersample"), provider="cxrtune.data.samplers")

__all__ = ["SAMPLERS"]
