"""Bootstrap standard errors of per-image scores."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from capdec.errors import InputError


def bootstrap_se(per_image: Mapping[Any, float] | Sequence[float] | np.ndarray, n: int = 1000,
                 seed: int = 0) -> float:
    """Bootstrap standard error of the mean of per-image scores.

    Resamples images with replacement ``n`` times and returns the standard deviation (ddof=1) of
    the resampled means. The per-image scores are fixed, so CIDEr's IDF (document frequencies over
    the whole reference set) is held at its full-set value rather than recomputed per resample; for
    corpus BLEU (not a mean of per-image BLEU) this is the SE of the per-image mean, an
    approximation.
    """
    values = np.asarray(list(per_image.values()) if isinstance(per_image, Mapping) else per_image,
                        dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise InputError("bootstrap_se needs a non-empty 1-d set of per-image scores")
    if n < 2:
        raise InputError(f"bootstrap_se needs n >= 2 resamples, got {n}")
    rng = np.random.default_rng(seed)
    means = np.empty(n)
    for b in range(n):  # a loop, not an (n, N) index matrix: N may be large
        means[b] = values[rng.integers(0, values.size, values.size)].mean()
    return float(means.std(ddof=1))
