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


def gap_noise(shape: torch.Size | tuple[int, ...], factor: torch.Tensor, diag: torch.Tensor, *, like: torch.Tensor,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise with covariance ``factorᵀ·factor + diag(diag)``: ``z₁·factor + √diag ⊙ z₂``.

    ``factor`` is (r, d), ``diag`` (d,) variances; z₁ (…, r) and z₂ (…, d) are standard normal. The
    low-rank part carries the directions in which image embeddings stray from their captions'
    (the modality gap's principal axes), the diagonal the rest.
    """
    *lead, d = shape
    dev = _gen_device(generator, like)
    z1 = torch.randn((*lead, factor.shape[0]), generator=generator, device=dev, dtype=torch.float32)
    z2 = torch.randn(shape, generator=generator, device=dev, dtype=torch.float32)
    n = z1.to(factor.device) @ factor.float() + z2.to(diag.device) * diag.float().clamp(min=0).sqrt()
    return n.to(device=like.device, dtype=like.dtype)


def _gen_device(generator: torch.Generator | None, like: torch.Tensor) -> torch.device:
    return generator.device if generator is not None else like.device


def add_noise(t: torch.Tensor, config: NoiseConfig, *, generator: torch.Generator | None = None,
              offset: torch.Tensor | None = None, mean: torch.Tensor | None = None,
              sample: bool = True) -> torch.Tensor:
    """CapDec training input: (centre) → normalise → + offset → + noise → normalise.

    ``offset``/``mean`` are (d,) tensors (the modality offset and the text mean for centering);
    when None they are taken from ``config`` (offset) or skipped. The noise is isotropic
    (``variance``) and/or shaped like the modality gap (``gap_factor``/``gap_diag`` × ``gap_scale``),
    each caption's scaled by a factor from ``1 ± scale_spread``. ``sample=False``: every
    deterministic step (centre, offset, normalise) but no noise — the clean validation input.
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
    if sample:
        x = x + _sample_noise(x, config, generator)
    return normalize(x) if config.normalize else x


def _sample_noise(x: torch.Tensor, config: NoiseConfig, generator: torch.Generator | None) -> torch.Tensor:
    """The noise of ``config`` for each row of ``x`` (b, d): isotropic and/or gap-shaped, per-caption scaled."""
    n = torch.zeros_like(x)
    if config.variance > 0:
        if config.distribution == "gaussian":
            n = n + gaussian_noise(x.shape, config.variance, like=x, generator=generator)
        else:
            n = n + uniform_ball_noise(x.shape, config.epsilon, like=x, generator=generator)
    if config.shaped and config.gap_scale > 0:
        factor, diag = gap_tensors(config)
        if diag.shape[0] != x.shape[-1]:
            raise InputError(f"the gap covariance has dimension {diag.shape[0]} but embeddings have {x.shape[-1]}")
        std = math.sqrt(config.gap_scale)
        n = n + std * gap_noise(x.shape, factor.to(x.device), diag.to(x.device), like=x, generator=generator)
    if config.scale_spread > 0:
        u = torch.rand((*x.shape[:-1], 1), generator=generator, device=_gen_device(generator, x))
        n = n * (1 + config.scale_spread * (2 * u - 1)).to(n)
    return n


def gap_tensors(config: NoiseConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The gap covariance of ``config`` as tensors: factor (r, d) and diagonal (d,)."""
    if config.gap_diag is None:
        raise ValueError("this noise config has no gap covariance")
    diag = torch.tensor(config.gap_diag, dtype=torch.float32)
    factor = torch.tensor(config.gap_factor or [], dtype=torch.float32).reshape(-1, diag.shape[0])
    return factor, diag


def shift_embeddings(v: torch.Tensor, *, shift: torch.Tensor | None = None, mean: torch.Tensor | None = None,
                     normalize_output: bool = True, renormalize_shift: bool = True) -> torch.Tensor:
    """Inference-side embedding preparation: (− mean) → normalise → (+ shift) → normalise.

    ``mean`` is e.g. the mean image embedding of unlabelled images (C3 centering); ``shift`` a
    vector added to move image embeddings toward the text cone (e.g. text mean − image mean).
    ``renormalize_shift=False`` skips the last normalisation (CapDec's released inference code).
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
        if normalize_output and renormalize_shift:
            x = normalize(x)
    return x


def expected_cosine(dim: int, variance: float) -> float:
    """E[cos(t, normalize(t + n))] ≈ 1/√(1 + d·var) for a unit t and n ~ N(0, var·I) in high d."""
    return 1.0 / math.sqrt(1.0 + dim * variance)


def mean_embedding(x: torch.Tensor) -> torch.Tensor:
    """Mean of the L2-normalised rows (the modality centroid)."""
    return normalize(x.float()).mean(dim=0)
