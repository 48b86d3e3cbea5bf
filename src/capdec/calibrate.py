"""Choosing the noise level ε (and the modality offset) from a few paired images and captions.

CapDec's rule (Nukrai et al. 2022, §3): with ``v`` an image embedding and ``t`` the embedding of one
of its captions, both L2-normalised, ε = mean over pairs of ``‖v − t‖∞``; training then adds
``N(0, ε²·I)`` to text embeddings. About 15 pairs suffice (results are robust to ε within an order
of magnitude). With more images (no captions needed), the modality centroids and their difference,
the *offset* ``image_mean − text_mean``, describe the gap itself.

The result is a ``noise.json`` (format ``capdec.noise/2``; ``capdec.noise/1`` files, which lack the
gap covariance and the shift convention, still load)::

    {"format": "capdec.noise/2", "encoder": spec, "encoder_identity": {...}, "dim": d,
     "epsilon": ε, "variance": ε², "n_pairs", "n_paired_images", "mean_linf", "std_linf",
     "mean_l2", "mean_cosine",
     # with extra images and/or a text store:
     "image_mean": [...], "text_mean": [...], "offset": [...], "offset_norm", "n_images", "n_texts",
     "text_mean_source": "pairs" | "store", "renormalize_shift": true | false,
     # with a gap rank:
     "gap_factor": [[...], ...] (r, d), "gap_diag": [...] (d), "gap_rank": r, "gap_pairs": n, "gap_shrinkage": α,
     "gap_source": "pairs" | "images and their K nearest store captions"}

The *modality offset* is ``image_mean − text_mean``. The text centroid comes from the paired captions,
or from an embedding store (``text_store``: the training corpus, as CapDec's released
``modality_offset_calculator.py`` took it from 20,000 training rows); the image centroid from the
paired images plus any unlabelled ones. ``renormalize_shift`` says how the opposite vector (the
caption-time *shift*) is applied: capdec renormalises the shifted image embedding; CapDec's released
``predictions_runner.py`` adds its offset to the normalised image embedding and decodes that as is
(``reference_offset=True`` records that convention).

The *gap covariance* is the covariance of the residuals ``normalize(v) − normalize(t)`` over the pairs
(or over unlabelled images and their nearest training captions: no captions needed),
shrunk toward a multiple of the identity (Ledoit–Wolf: a few pairs leave most directions unsampled), as
a rank-r factor plus a diagonal (:func:`gap_covariance`): training with ``--noise-shape gap`` draws noise
of that shape instead of CapDec's isotropic ``N(0, ε²·I)``.

``capdec train --noise-file`` reads it with :func:`read_noise_file` (``variance``, the ``offset`` when
asked to use it, the gap covariance with ``--noise-shape gap``); ``capdec caption --shift`` its
``−offset``.

The same unlabelled images give *pseudo-pairs* (:func:`pseudo_pair_store`): an image store of their real
embeddings, each paired with its K nearest training captions, that ``capdec train`` mixes with the text store
(``capdec calibrate --pseudo-pairs``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from capdec.errors import InputError
from capdec.images import list_images, load_image  # noqa: F401  (re-exported)
from capdec.io.image_datasets import read_pairs  # noqa: F401  (re-exported)
from capdec.io.text import read_json

logger = logging.getLogger(__name__)

NOISE_FORMAT = "capdec.noise/2"
NOISE_FORMATS = ("capdec.noise/1", NOISE_FORMAT)  # read; /1 files predate the gap covariance
PSEUDO_PAIRS = "pseudo-pairs"  # meta.json corpus format of the stores pseudo_pair_store makes


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def unlabelled_images(extra_images: Sequence[Any], paired: Sequence[Any] = ()) -> list[Any]:
    """The images of ``extra_images`` (PIL images or paths) that are not among the ``paired`` ones: a path given
    in both is labelled and counts once, as a paired image."""
    paths = {os.path.abspath(p) for p in paired if isinstance(p, (str, os.PathLike))}
    kept = [im for im in extra_images if not (isinstance(im, (str, os.PathLike)) and os.path.abspath(im) in paths)]
    if len(kept) < len(extra_images):
        logger.info("%d of the extra images are paired images too; counted once", len(extra_images) - len(kept))
    return kept


# ---------------------------------------------------------------------------------------------
# the statistics
# ---------------------------------------------------------------------------------------------
def encode_images(encoder: Any, images: Sequence[Any], *, batch_size: int = 32, desc: str = "calibrate: images"):
    """L2-normalised float64 embeddings (n, d) of ``images`` (PIL images or paths), ``batch_size`` at a time."""
    import torch

    from capdec.utils import progress

    chunks = []
    for start in progress(range(0, len(images), batch_size), desc=desc, unit="batch"):
        batch = [im if hasattr(im, "convert") else load_image(im) for im in images[start:start + batch_size]]
        chunks.append(encoder.encode_image(batch))
    return _unit64(torch.cat(chunks) if chunks else torch.empty(0, encoder.dim))


def _unit64(x):
    import torch.nn.functional as F

    return F.normalize(x.double(), dim=-1)


def store_centroid(store: Any, max_rows: int | None = None, *, chunk: int = 65536) -> tuple[Any, int]:
    """Mean of the (re-normalised, float64) embeddings of a store's first ``max_rows`` rows, and how many."""
    import torch

    n = len(store) if max_rows is None else min(max_rows, len(store))
    if n < 1:
        raise InputError(f"embedding store {store.path}: no rows to average")
    total = torch.zeros(store.dim, dtype=torch.float64)
    for lo in range(0, n, chunk):
        rows = torch.from_numpy(np.asarray(store.embeddings[lo:min(n, lo + chunk)], dtype=np.float64))
        total += _unit64(rows).sum(dim=0)
    return total / n, n


def calibrate(encoder: Any, images: Sequence[Any], captions: Sequence[str | Sequence[str]],
              extra_images: Sequence[Any] | Any = None, *, batch_size: int = 32, text_store: Any = None,
              max_texts: int | None = None, gap_rank: int = 0, gap_shrinkage: float | None = None,
              gap_neighbours: int = 0, reference_offset: bool = False) -> dict[str, Any]:
    """ε and modality-gap statistics of ``encoder`` from paired ``images`` and ``captions``.

    ``images``: PIL images or paths; ``captions[i]``: the caption (or list of captions) of
    ``images[i]``, each caption making one pair. ``extra_images`` (PIL images or paths, no captions
    needed; or their embeddings, an (n, d) tensor: :func:`encode_images` of :func:`unlabelled_images`,
    which leaves out the paired ones) and/or ``text_store`` (an :class:`~capdec.store.EmbeddingStore` of the training captions,
    made with ``encoder``; its first ``max_texts`` rows) add the centroids: ``image_mean`` over the
    paired and extra images (a path given in both counts once), ``text_mean`` over the store's rows
    (else the captions), and ``offset = image_mean − text_mean``. ``reference_offset`` records that the
    caption-time shift is applied without renormalising, as CapDec's released code does. ``gap_rank``
    > 0 adds the gap covariance of the pairs (:func:`gap_covariance`; ``gap_shrinkage`` None: Ledoit–Wolf's),
    or with ``gap_neighbours`` K > 0 of every image (paired and extra) with its K nearest captions in
    ``text_store`` (:func:`nearest_caption_gaps`: no captions needed).
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

    v = encode_images(encoder, images, batch_size=batch_size, desc="calibrate: paired images")
    t = _unit64(encoder.encode_text(texts))
    diff = v[torch.tensor(owner)] - t  # (pairs, d): the modality gap of each pair
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
    all_v = v
    if gap_neighbours and (text_store is None or extra_images is None):
        raise InputError("calibrate: the gap from nearest captions needs unlabelled images and the training store")
    if extra_images is not None or text_store is not None:
        if isinstance(extra_images, torch.Tensor):
            all_v = torch.cat([v, _unit64(extra_images)])
        elif extra_images is not None:
            all_v = torch.cat([v, encode_images(encoder, unlabelled_images(extra_images, images),
                                                batch_size=batch_size)])
        if text_store is not None:
            from capdec.encoders.base import check_identity

            check_identity(text_store.encoder_identity, encoder.identity, what=f"embedding store {text_store.path}")
            text_mean, n_texts = store_centroid(text_store, max_texts)
        else:
            text_mean, n_texts = t.mean(dim=0), len(texts)
        image_mean = all_v.mean(dim=0)
        offset = image_mean - text_mean
        out.update({
            "image_mean": image_mean.tolist(), "text_mean": text_mean.tolist(), "offset": offset.tolist(),
            "offset_norm": float(offset.norm()), "n_images": int(all_v.shape[0]), "n_texts": n_texts,
            "text_mean_source": "store" if text_store is not None else "pairs",
            "renormalize_shift": not reference_offset,
        })
    if gap_rank > 0:
        if gap_neighbours:
            residuals = nearest_caption_gaps(all_v, text_store, gap_neighbours)
            source = f"images and their {gap_neighbours} nearest store captions"
        else:
            if len(texts) < 2:
                raise InputError("calibrate: the gap covariance needs at least 2 pairs")
            residuals, source = diff, "pairs"
        factor, diag, alpha = gap_covariance(residuals, gap_rank, shrinkage=gap_shrinkage)
        out.update({"gap_factor": factor.tolist(), "gap_diag": diag.tolist(), "gap_rank": int(factor.shape[0]),
                    "gap_pairs": int(residuals.shape[0]), "gap_shrinkage": alpha, "gap_source": source})
    from capdec import __version__

    out["capdec_version"] = __version__
    return out


def nearest_captions(images, store: Any, k: int, *, batch_size: int = 4096):
    """Rows of ``store`` (the training captions' embedding store, or a :class:`~capdec.memory.TextMemory` over
    it) holding each image embedding's ``k`` nearest captions (``images``: (n, d), L2-normalised), nearest
    first: (n, min(k, len(store))) int64. Cosine, through the store's text memory (exact, or faiss on a large
    store)."""
    import torch

    from capdec.memory import TextMemory

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"the number of nearest captions must be >= 1, got {k}")
    memory = store if isinstance(store, TextMemory) else TextMemory.from_store(store)
    k = min(k, len(memory))
    found = [memory.search(images[lo:lo + batch_size].float(), k)[1] for lo in range(0, images.shape[0], batch_size)]
    return torch.cat(found) if found else torch.empty(0, k, dtype=torch.int64)


def nearest_caption_gaps(images, store: Any, k: int, *, batch_size: int = 4096):
    """Pseudo-pairs from unlabelled images: ``v − t`` for each image embedding v (n, d; L2-normalised) and each
    of its ``k`` nearest captions t in the training ``store`` (:func:`nearest_captions`): (n·k, d) float64.

    An image's nearest captions are mostly ones that describe it, so these differences are shaped like the
    modality gap of true pairs; in the toy world their covariance models held-out true gaps as well as 2,000
    true pairs do (docs/results/quality_final.md).
    """
    import torch

    from capdec.memory import TextMemory

    memory = TextMemory.from_store(store)
    idx = nearest_captions(images, memory, k, batch_size=batch_size)
    out = []
    for lo in range(0, images.shape[0], batch_size):
        v = images[lo:lo + batch_size]
        t = _unit64(memory.gather(idx[lo:lo + batch_size], dtype=torch.float64))  # (b, k, d)
        out.append((v[:, None, :].double() - t).reshape(-1, v.shape[-1]))
    return torch.cat(out)


def pseudo_pair_store(images, store: Any, k: int, *, names: Sequence[str] | None = None, source: str | None = None,
                      dtype: str = "float16") -> Any:
    """Pseudo-pairs as an image store: each unlabelled image embedding (``images``: (n, d), L2-normalised, made
    with the encoder of the text ``store``) paired with its ``k`` nearest captions in ``store``
    (:func:`nearest_captions`), for ``capdec train TEXT_STORE PSEUDO`` to train on real image embeddings too.

    An in-memory :class:`~capdec.store.EmbeddingStore` (``modality`` "image"): one embedding row per image in
    ``dtype`` (float16, as ``capdec embed`` writes image stores), its captions nearest first with ``row_index``
    pointing each at its image's row; each caption's record has the image (``names[i]``, else its index) and the
    caption's row in ``store`` (``store_row``). ``meta.corpus`` (format :data:`PSEUDO_PAIRS`) names ``store``,
    ``k`` and ``source`` (where the images came from). Save it with ``.save(path)``.
    """
    import torch

    from capdec.store import DTYPES, EmbeddingStore
    from capdec.textdata import load_text_data

    if dtype not in DTYPES:
        raise InputError(f"unknown store dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    images = torch.as_tensor(images).detach().cpu()
    n = images.shape[0]
    if names is not None and len(names) != n:
        raise InputError(f"{len(names)} image names for {n} image embeddings")
    if n < 1:
        raise InputError("pseudo-pairs need at least one unlabelled image")
    idx = nearest_captions(images, store, k).numpy()  # (n, k)
    wanted = np.unique(idx)
    text = dict(zip(wanted.tolist(), load_text_data([store]).iter_captions(wanted)))  # streamed, in row order
    row_index = np.repeat(np.arange(n), idx.shape[1])  # image i's captions are rows i·k ... i·k + k − 1
    rows = idx.reshape(-1).tolist()
    records = [{"image": names[i] if names is not None else i, "store_row": j} for i, j in zip(row_index.tolist(), rows)]
    captions = [text[j] for j in rows]
    where = str(store.path) if store.path is not None else "(in-memory store)"
    stats = {"read": len(captions), "empty_skipped": 0, "duplicates_removed": 0, "truncated": None, "images": n}
    out = EmbeddingStore.from_arrays(captions, images.double().numpy().astype(dtype), records=records, stats=stats,
                                     encoder_spec=store.encoder_spec, encoder_identity=store.encoder_identity,
                                     row_index=row_index, modality="image")
    out.meta["corpus"].update({
        "format": PSEUDO_PAIRS, "paths": [str(source)] if source is not None else [], "text_store": where,
        "neighbours": int(idx.shape[1]), "images": n,
        "description": f"pseudo-pairs: each image's {idx.shape[1]} nearest captions (cosine) of the store {where}"})
    return out


def ledoit_wolf_shrinkage(residuals) -> float:
    """Ledoit & Wolf's (2004) optimal weight α of the scaled identity in ``(1 − α)·S + α·(tr S / d)·I``.

    With S the covariance of the n centred rows (1/n), m = tr S / d:
    ``α = min(1, (1/n²)·Σᵢ ‖xᵢxᵢᵀ − S‖²_F / ‖S − m·I‖²_F)``. A few pairs give a rank-deficient S whose
    missing directions would get no noise at all; α grows as the pairs get fewer.
    """
    x = residuals.double()
    x = x - x.mean(dim=0)
    return _ledoit_wolf(x, x.T @ x / x.shape[0])


def _ledoit_wolf(x, cov) -> float:
    """:func:`ledoit_wolf_shrinkage` of the centred rows ``x`` (n, d) whose covariance (1/n) is ``cov``."""
    import torch

    n, d = x.shape
    m = torch.trace(cov) / d
    spread = ((cov - m * torch.eye(d, dtype=cov.dtype)) ** 2).sum()
    # Σᵢ ‖xᵢxᵢᵀ − S‖² = Σᵢ ‖xᵢ‖⁴ − n·‖S‖² (the cross term sums to n·‖S‖²)
    scatter = ((x * x).sum(dim=1) ** 2).sum() - n * (cov * cov).sum()
    if float(spread) <= 0:
        return 1.0
    return float(min(1.0, max(0.0, float(scatter / n**2 / spread))))


def gap_covariance(residuals, rank: int, *, shrinkage: float | None = 0.0) -> tuple[Any, Any, float]:
    """Low-rank + diagonal fit of the covariance of ``residuals`` (n, d): (factor (r, d), diag (d,), α).

    The sample covariance S (rows centred, n − 1 in the denominator) is shrunk toward the scaled identity,
    ``(1 − α)·S + α·(tr S / d)·I`` with α = ``shrinkage`` (None: Ledoit–Wolf's, :func:`ledoit_wolf_shrinkage`),
    then split into its top-``rank`` eigen-directions, ``factor = √λ·uᵀ``, and the diagonal of what they
    leave, clipped at 0; so ``trace(factorᵀ·factor) + sum(diag) = trace(S)``. Without shrinkage ``rank``
    is cut to n − 1 (S has no more).
    """
    import torch

    r = residuals.double()
    n, d = r.shape
    if n < 2:
        raise InputError("the gap covariance needs at least 2 pairs")
    centred = r - r.mean(dim=0)
    cov = centred.T @ centred / (n - 1)  # (d, d)
    alpha = _ledoit_wolf(centred, cov * ((n - 1) / n)) if shrinkage is None else float(shrinkage)
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"the gap covariance's shrinkage must be in [0, 1], got {alpha}")
    if alpha > 0:
        cov = (1 - alpha) * cov + alpha * torch.trace(cov) / d * torch.eye(d, dtype=cov.dtype)
    rank = max(0, min(rank, d if alpha > 0 else n - 1, d))
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    evals, evecs = evals.flip(0)[:rank].clamp(min=0), evecs.flip(1)[:, :rank]
    factor = (evecs * evals.sqrt()).T  # (r, d)
    diag = (cov.diagonal() - (factor * factor).sum(dim=0)).clamp(min=0)
    return factor, diag, alpha


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
    if fmt not in NOISE_FORMATS:
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
    for key in ("offset", "image_mean", "text_mean", "gap_diag"):
        if data.get(key) is not None:
            out[key] = _finite_vector(data[key], key, where, dim)
    if (data.get("gap_factor") is None) != (data.get("gap_diag") is None):
        raise InputError(f"{where}: a gap covariance needs both 'gap_factor' and 'gap_diag'")
    if data.get("gap_factor") is not None:
        factor = data["gap_factor"]
        if not isinstance(factor, list):
            raise InputError(f"{where}: 'gap_factor' must be a list of rows")
        out["gap_factor"] = [_finite_vector(row, "gap_factor", where, len(out["gap_diag"])) for row in factor]
        if any(x < 0 for x in out["gap_diag"]):
            raise InputError(f"{where}: 'gap_diag' holds variances: they must be >= 0")
    if not isinstance(data.get("renormalize_shift", True), bool):
        raise InputError(f"{where}: 'renormalize_shift' must be true or false")
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
