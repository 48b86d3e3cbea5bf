"""Noise injection and embedding shifts: the heart of CapDec, as pure functions.

Training sees ``normalize(normalize(t) + offset + n)`` where ``t`` is a caption's text embedding,
``n ~ N(0, variance·I)`` (CapDec) or uniform in a ball of radius ε, and ``offset`` is an optional
modality offset (mean image embedding − mean text embedding). Inference decodes
``normalize(v + shift)`` of an image embedding ``v``. Every function keeps the input's device and
dtype; randomness comes only from the ``generator`` passed in, so a training step's noise is a
function of its seed (which is what makes ``--resume`` exact).

Notation: b - batch, d - embedding dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from capdec.configs import PAPER_VARIANCE, NoiseConfig  # noqa: F401  (re-exported: the config lives in capdec.configs)
from capdec.errors import InputError


def normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """L2-normalise the last dimension (works in the input's dtype; fp16 is upcast internally)."""
    return F.normalize(x.float(), dim=-1, eps=eps).to(x.dtype)


def gaussian_noise(shape: torch.Size | tuple[int, ...], variance: float, *, like: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Isotropic gaussian noise with the given per-coordinate variance, on ``like``'s device/dtype."""
    n = torch.randn(shape, generator=generator, device=_gen_device(generator, like), dtype=torch.float32)
    return (n * math.sqrt(variance)).to(device=like.device, dtype=like.dtype)


def uniform_ball_noise(shape: torch.Size | tuple[int, ...], radius: float, *, like: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise uniform in the L2 ball of the given radius (direction uniform, r = R·U^(1/d))."""
    *lead, d = shape
    dev = _gen_device(generator, like)
    direction = F.normalize(torch.randn(shape, generator=generator, device=dev), dim=-1)
    r = radius * torch.rand((*lead, 1), generator=generator, device=dev).pow(1.0 / d)
    return (direction * r).to(device=like.device, dtype=like.dtype)


def _gen_device(generator: torch.Generator | None, like: torch.Tensor) -> torch.device:
    return generator.device if generator is not None else like.device


def add_noise(t: torch.Tensor, config: NoiseConfig, *, generator: torch.Generator | None = None,
              offset: torch.Tensor | None = None, mean: torch.Tensor | None = None) -> torch.Tensor:
    """CapDec training input: (centre) → normalise → + offset → + noise → normalise.

    ``offset``/``mean`` are (d,) tensors (the modality offset and the text mean for centering);
    when None they are taken from ``config`` (offset) or skipped.
    """
    x = t
    if config.center:
        if mean is None and config.text_mean is not None:
            mean = torch.tensor(config.text_mean)
        if mean is None:
            raise ValueError("config.center is set but no text mean was given")
        x = x - mean.to(x)
    if config.normalize:
        x = normalize(x)
    if offset is None and config.offset is not None:
        offset = torch.tensor(config.offset)
    if offset is not None:
        if offset.shape[-1] != x.shape[-1]:
            raise InputError(f"modality offset has dimension {offset.shape[-1]} but embeddings have {x.shape[-1]}")
        x = x + offset.to(x)
    if config.variance > 0:
        if config.distribution == "gaussian":
            x = x + gaussian_noise(x.shape, config.variance, like=x, generator=generator)
        else:
            x = x + uniform_ball_noise(x.shape, config.epsilon, like=x, generator=generator)
    return normalize(x) if config.normalize else x


def shift_embeddings(v: torch.Tensor, *, shift: torch.Tensor | None = None, mean: torch.Tensor | None = None,
                     normalize_output: bool = True) -> torch.Tensor:
    """Inference-side embedding preparation: (− mean) → normalise → (+ shift) → normalise.

    ``mean`` is e.g. the mean image embedding of unlabelled images (C3 centering); ``shift`` a
    vector added to move image embeddings toward the text cone (e.g. text mean − image mean).
    """
    x = v
    if mean is not None:
        x = x - mean.to(x)
    if normalize_output:
        x = normalize(x)
    if shift is not None:
        if shift.shape[-1] != x.shape[-1]:
            raise InputError(f"shift vector has dimension {shift.shape[-1]} but embeddings have {x.shape[-1]}")
        x = x + shift.to(x)
        if normalize_output:
            x = normalize(x)
    return x


def expected_cosine(dim: int, variance: float) -> float:
    """E[cos(t, normalize(t + n))] ≈ 1/√(1 + d·var) for a unit t and n ~ N(0, var·I) in high d."""
    return 1.0 / math.sqrt(1.0 + dim * variance)


def mean_embedding(x: torch.Tensor) -> torch.Tensor:
    """Mean of the L2-normalised rows (the modality centroid)."""
    return normalize(x.float()).mean(dim=0)
