"""Choosing the noise level ε (and the modality offset) from a few paired images and captions.

CapDec's rule (Nukrai et al. 2022, §3): with ``v`` an image embedding and ``t`` the embedding of one
of its captions, both L2-normalised, ε = mean over pairs of ``‖v − t‖∞``; training then adds
``N(0, ε²·I)`` to text embeddings. About 15 pairs suffice (results are robust to ε within an order
of magnitude). With more images (no captions needed), the modality centroids and their difference,
the *offset* ``image_mean − text_mean``, describe the gap itself.

The result is a ``noise.json`` (format ``capdec.noise/1``)::

    {"format": "capdec.noise/1", "encoder": spec, "encoder_identity": {...}, "dim": d,
     "epsilon": ε, "variance": ε², "n_pairs", "n_paired_images", "mean_linf", "std_linf",
     "mean_l2", "mean_cosine",
     # with extra images:
     "image_mean": [...], "text_mean": [...], "offset": [...], "offset_norm", "n_images", "n_texts"}

``capdec train --noise-file`` reads it with :func:`read_noise_file` (``variance``, and ``offset`` when
asked to use it).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from capdec.errors import InputError
from capdec.images import list_images, load_image  # noqa: F401  (re-exported)
from capdec.io.image_datasets import read_pairs  # noqa: F401  (re-exported)
from capdec.io.text import read_json

logger = logging.getLogger(__name__)

NOISE_FORMAT = "capdec.noise/1"


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# the statistics
# ---------------------------------------------------------------------------------------------
def _encode_images(encoder: Any, images: Sequence[Any], batch_size: int, desc: str):
    import torch

    from capdec.utils import progress

    chunks = []
    for start in progress(range(0, len(images), batch_size), desc=desc, unit="batch"):
        batch = [im if hasattr(im, "convert") else load_image(im) for im in images[start:start + batch_size]]
        chunks.append(encoder.encode_image(batch))
    return torch.cat(chunks) if chunks else torch.empty(0, encoder.dim)


def _unit64(x):
    import torch.nn.functional as F

    return F.normalize(x.double(), dim=-1)


def calibrate(encoder: Any, images: Sequence[Any], captions: Sequence[str | Sequence[str]],
              extra_images: Sequence[Any] | None = None, *, batch_size: int = 32) -> dict[str, Any]:
    """ε and modality-gap statistics of ``encoder`` from paired ``images`` and ``captions``.

    ``images``: PIL images or paths; ``captions[i]``: the caption (or list of captions) of
    ``images[i]``, each caption making one pair. ``extra_images`` (PIL images or paths, no captions
    needed) add the centroids: ``image_mean`` over the paired and extra images (a path given in both
    counts once), ``text_mean`` over the captions, and ``offset = image_mean − text_mean``.
    Returns the ``noise.json`` dict (module docstring); statistics are computed in float64 on the
    re-normalised embeddings, ``std_linf`` is the population standard deviation over pairs.
    """
    import torch

    if len(images) != len(captions):
        raise InputError(f"calibrate: {len(images)} images but {len(captions)} caption entries")
    caps = [[c] if isinstance(c, str) else list(c) for c in captions]
    owner = [i for i, cs in enumerate(caps) for _ in cs]
    texts = [c for cs in caps for c in cs]
    if not texts:
        raise InputError("calibrate: no image/caption pairs")
    if any(not isinstance(t, str) or not t.strip() for t in texts):
        raise InputError("calibrate: captions must be non-empty strings")

    v = _unit64(_encode_images(encoder, images, batch_size, "calibrate: paired images"))
    t = _unit64(encoder.encode_text(texts))
    diff = v[torch.tensor(owner)] - t  # (pairs, d)
    linf = diff.abs().amax(dim=-1)
    eps = float(linf.mean())
    out: dict[str, Any] = {
        "format": NOISE_FORMAT,
        "encoder": encoder.spec,
        "encoder_identity": encoder.identity,
        "dim": int(v.shape[-1]),
        "epsilon": eps,
        "variance": eps * eps,
        "n_pairs": len(texts),
        "n_paired_images": len(images),
        "mean_linf": eps,
        "std_linf": float(linf.std(unbiased=False)),
        "mean_l2": float(diff.norm(dim=-1).mean()),
        "mean_cosine": float((v[torch.tensor(owner)] * t).sum(-1).mean()),
    }
    if extra_images is not None:
        paired = {os.path.abspath(p) for p in images if isinstance(p, (str, os.PathLike))}
        extra = [im for im in extra_images
                 if not (isinstance(im, (str, os.PathLike)) and os.path.abspath(im) in paired)]
        if len(extra) < len(extra_images):
            logger.info("%d of the extra images are paired images too; counted once",
                        len(extra_images) - len(extra))
        all_v = torch.cat([v, _unit64(_encode_images(encoder, extra, batch_size, "calibrate: images"))])
        image_mean, text_mean = all_v.mean(dim=0), t.mean(dim=0)
        offset = image_mean - text_mean
        out.update({
            "image_mean": image_mean.tolist(), "text_mean": text_mean.tolist(), "offset": offset.tolist(),
            "offset_norm": float(offset.norm()), "n_images": int(all_v.shape[0]), "n_texts": len(texts),
        })
    from capdec import __version__

    out["capdec_version"] = __version__
    return out


# ---------------------------------------------------------------------------------------------
# noise.json
# ---------------------------------------------------------------------------------------------
def write_noise_file(path: str | os.PathLike, stats: dict[str, Any]) -> None:
    """Write a ``calibrate`` result as noise.json (atomically), after validating it."""
    from capdec.utils import write_json

    _validate_noise(stats, str(path))
    write_json(path, stats)


def _finite_vector(value: Any, name: str, where: str, dim: int | None) -> list[float]:
    if not isinstance(value, list) or not value or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value):
        raise InputError(f"{where}: {name!r} must be a non-empty list of finite numbers")
    if dim is not None and len(value) != dim:
        raise InputError(f"{where}: {name!r} has {len(value)} values but the encoder dimension is {dim}")
    return [float(x) for x in value]


def _validate_noise(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise InputError(f"{where}: a noise file holds a JSON object, got {type(data).__name__}")
    fmt = data.get("format")
    if fmt != NOISE_FORMAT:
        raise InputError(f"{where}: not a capdec noise file (format {fmt!r}, expected {NOISE_FORMAT!r}); "
                         f"make one with 'capdec calibrate'")
    out = dict(data)
    number = {}
    for key in ("variance", "epsilon"):
        value = data.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise InputError(f"{where}: {key!r} must be a finite number >= 0, got {value!r}")
        number[key] = float(value)
    if not number:
        raise InputError(f"{where}: the noise file has neither 'variance' nor 'epsilon'")
    if "variance" not in number:
        number["variance"] = number["epsilon"] ** 2
    if "epsilon" not in number:
        number["epsilon"] = math.sqrt(number["variance"])
    if not math.isclose(number["epsilon"] ** 2, number["variance"], rel_tol=1e-6, abs_tol=1e-12):
        logger.warning("%s: 'variance' %.6g is not 'epsilon'² (%.6g); training uses the variance",
                       where, number["variance"], number["epsilon"] ** 2)
    out.update(number)
    dim = data.get("dim")
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0):
        raise InputError(f"{where}: 'dim' must be a positive integer, got {dim!r}")
    for key in ("offset", "image_mean", "text_mean"):
        if data.get(key) is not None:
            out[key] = _finite_vector(data[key], key, where, dim)
    for key in ("encoder", "encoder_identity"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise InputError(f"{where}: {key!r} must be a JSON object")
    return out


def read_noise_file(path: str | os.PathLike, *, encoder_identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read and validate a noise.json; returns the dict with ``variance`` and ``epsilon`` both set.

    ``offset``/``image_mean``/``text_mean`` (when present) are lists of finite floats whose length is
    the file's ``dim``. With ``encoder_identity`` (e.g. the embedding store's), a file made with a
    different encoder raises :class:`capdec.encoders.EncoderMismatchError`.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: noise file not found (make one with 'capdec calibrate')")
    data = read_json(path)
    out = _validate_noise(data, str(path))
    if encoder_identity is not None:
        from capdec.encoders.base import check_identity

        if out.get("encoder_identity") is None:
            logger.warning("%s records no encoder identity; cannot check it matches the encoder", path)
        else:
            check_identity(out["encoder_identity"], encoder_identity, what=f"noise file {path}")
    return out
