"""The user's own data as an experiment data source: stores + a test split + images.

The experiments (:mod:`capdec.lab.sweep`, :mod:`capdec.lab.demo`'s comparison, :mod:`capdec.lab.transfer`'s styles and
cross-domain runs) train decoders on an embedding store and score them on test images with references.
In the toy world, :func:`capdec.lab.experiment.prepare_data` generates all of it; here
:func:`prepare_user_data` builds the same :class:`~capdec.lab.experiment.ToyData` from

- the user's text store (``capdec embed``), and optionally an image store (``capdec embed --modality
  image``) for the supervised baseline and the image mean of the centroid shift;
- a test split read with :func:`capdec.io.read_image_dataset` (a COCO annotation file, a JSON list
  of ``{file_name, captions}`` or a JSONL of ``{image, caption}``); its images are encoded once with the
  store's encoder (unreadable ones are listed and left out) and cached in ``cache_dir``, so every seed,
  noise level and rerun of an experiment scores the same images without encoding them again.

:func:`user_config` turns the user's decoder and budget choices into the
:class:`~capdec.lab.experiment.ExperimentConfig` the experiment code reads.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capdec.errors import InputError
from capdec.io.datasets import ImageDataset
from capdec.io.image_datasets import read_image_dataset
from capdec.lab.experiment import ExperimentConfig, ToyData
from capdec.noise import PAPER_VARIANCE, mean_embedding

logger = logging.getLogger(__name__)

_CACHE_FORMAT = "capdec.testset/1"
_THUMBNAIL = 160  # px, longest side of the report gallery's images


class Thumbnails(Sequence):
    """The test images as small PIL thumbnails, loaded when the report asks for one (not held in memory)."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        from capdec.images import load_image

        im = load_image(self.paths[i])
        im.thumbnail((_THUMBNAIL, _THUMBNAIL))
        return im


def user_config(*, steps: int = 1000, batch_size: int = 64, lr: float | None = None, seed: int = 0,
                noise_variance: float = PAPER_VARIANCE, model: dict[str, Any] | None = None,
                decode: dict[str, Any] | None = None) -> ExperimentConfig:
    """An :class:`ExperimentConfig` for the user's data: the decoder is ``ModelConfig``'s defaults with
    ``model``'s overrides (not the toy decoder), the learning rate the one ``capdec train`` would pick."""
    from capdec.model import ModelConfig

    try:
        full = ModelConfig(**(model or {})).to_dict()
    except TypeError as e:
        raise InputError(f"decoder options: {e}; use ModelConfig's field names (mapper, prefix_length, lm, ...)") from e
    full.pop("embed_dim", None)  # taken from the store
    full.pop("lm_config", None)
    if lr is None:
        from capdec.train.schedule import default_lr

        lr = default_lr(full["lm"])
    return ExperimentConfig(seed=seed, n_captions=0, n_test=0, steps=steps, batch_size=batch_size, lr=lr,
                            noise_variance=noise_variance, model=full,
                            decode=decode or {"strategy": "beam", "beam_size": 3})


def _open_store(path: str | os.PathLike, modality: str) -> Any:
    from capdec.store import EmbeddingStore

    store = EmbeddingStore.open(path)
    if store.modality != modality:
        what = {"text": "a text store ('capdec embed CAPTIONS')",
                "image": "an image store ('capdec embed DATASET --modality image')"}[modality]
        raise InputError(f"{path}: a {store.modality} store, but this needs {what}")
    return store


def read_test_split(test: str | os.PathLike, *, split: str | None, images_root: str | os.PathLike | None,
                    max_test_images: int | None = None) -> ImageDataset:
    """The test images with their references; a Karpathy-split file needs the split named (no default)."""
    dataset = read_image_dataset(test, split=split or "all", images_root=images_root)
    if dataset.format == "karpathy" and split in (None, "all"):
        raise InputError(f"{test} is a Karpathy-split file: name the split to score with --split (test or val)")
    if max_test_images is not None:
        dataset = replace(dataset, images=dataset.images[:max_test_images])
    return dataset


def _test_digest(dataset: ImageDataset, encoder: Any) -> str:
    from capdec.image_store import dataset_digest

    return dataset_digest(dataset) + ":" + json.dumps(encoder.identity, sort_keys=True, default=str)


def encode_test_set(dataset: ImageDataset, encoder: Any, cache_dir: str | os.PathLike | None = None, *,
                    batch_size: int = 64, show_progress: bool | None = None
                    ) -> tuple[torch.Tensor, list[int], list[dict[str, str]]]:
    """Image embeddings of a test split (cached in ``cache_dir``): (embeddings, kept record indices, skipped)."""
    from capdec.image_store import encode_dataset_images
    from capdec.utils import read_artifact_json, write_json

    digest = _test_digest(dataset, encoder)
    if cache_dir is not None:
        cache = Path(cache_dir)
        meta_path, emb_path = cache / "test.json", cache / "test_embeddings.npy"
        if meta_path.is_file() and emb_path.is_file():
            meta = read_artifact_json(meta_path)
            if meta.get("format") == _CACHE_FORMAT and meta.get("digest") == digest:
                logger.info("test images: %d embeddings reused from %s", len(meta["kept"]), cache)
                return torch.from_numpy(np.load(emb_path)), list(meta["kept"]), list(meta["skipped"])
    emb, kept, skipped = encode_dataset_images(dataset, encoder, batch_size=batch_size, show_progress=show_progress)
    if not kept:
        raise InputError(f"none of the {len(dataset)} test images of {dataset.path} could be read (first: "
                         f"{skipped[0]['image']}: {skipped[0]['reason']}); check --images-root")
    if skipped:
        logger.warning("%d of %d test images could not be read and are not scored", len(skipped), len(dataset))
    if cache_dir is not None:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / ".test_embeddings.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, emb, allow_pickle=False)
        os.replace(tmp, emb_path)
        write_json(meta_path, {"format": _CACHE_FORMAT, "digest": digest, "dataset": dataset.describe(),
                               "kept": kept, "skipped": skipped})
    return torch.from_numpy(emb), kept, skipped


def prepare_user_data(config: ExperimentConfig, *, store: str | os.PathLike, test: str | os.PathLike,
                      split: str | None = None, images_root: str | os.PathLike | None = None,
                      image_store: str | os.PathLike | None = None, encoder: Any = None,
                      cache_dir: str | os.PathLike | None = None, device: str = "auto",
                      max_test_images: int | None = None, show_progress: bool | None = None) -> ToyData:
    """The experiment data of a text store, an optional image store and a test split (see the module docstring).

    ``encoder``: the CLIP the stores were made with (default: loaded from the text store's recorded spec);
    its identity must match every store's. ``max_test_images``: score only the first N test images.
    """
    from capdec.encoders import load_encoder
    from capdec.encoders.base import check_identity

    text_store = _open_store(store, "text")
    paired = _open_store(image_store, "image") if image_store is not None else None
    if encoder is None:
        encoder = load_encoder(text_store.encoder_spec, device=device)
    text_store.check_encoder(encoder)
    if paired is not None:
        check_identity(text_store.encoder_identity, paired.encoder_identity, what=f"image store {image_store}")
    dataset = read_test_split(test, split=split, images_root=images_root, max_test_images=max_test_images)
    emb, kept, skipped = encode_test_set(dataset, encoder, cache_dir, show_progress=show_progress)
    images = [dataset.images[i] for i in kept]
    config = replace(config, n_captions=len(text_store), n_test=len(images),
                     n_paired=len(paired) if paired is not None else 0)
    data = ToyData(config=config, encoder=encoder, text_store=text_store,
                   test_images=Thumbnails([im.file for im in images]), test_embeddings=emb,
                   references=[im.captions for im in images], ids=[im.image_id for im in images],
                   paired_store=paired, text_mean=mean_embedding(text_store.tensor()),
                   image_mean=mean_embedding(torch.from_numpy(np.asarray(paired.vectors, dtype=np.float32)))
                   if paired is not None else None)
    data.device = device
    data.source = {"kind": "user", "store": str(store), "image_store": str(image_store) if image_store else None,
                   "test": dataset.describe(), "test_images_scored": len(images),
                   "test_images_unreadable": skipped, "encoder": encoder.spec}
    logger.info("data: %d training captions (%s), %d test images with %.1f references each%s", len(text_store),
                store, len(images), sum(map(len, data.references)) / max(1, len(images)),
                f", image store of {len(paired.vectors)} images" if paired is not None else "")
    return data


__all__ = ["Thumbnails", "encode_test_set", "prepare_user_data", "user_config"]


# -- the experiments on the user's data -------------------------------------------------------------
def run_user_sweep(out_dir: str | os.PathLike, *, store: str | os.PathLike, test: str | os.PathLike,
                   variances: Sequence[float], seeds: Sequence[int], config: ExperimentConfig,
                   split: str | None = None, images_root: str | os.PathLike | None = None,
                   calibrated: str | os.PathLike | float | None = None, metric: str = "CIDEr",
                   encoder: Any = None, device: str = "auto", max_test_images: int | None = None,
                   show_progress: bool | None = None) -> dict[str, Any]:
    """The ε sweep (:func:`capdec.lab.sweep.run_sweep`) on a store and a test split: the same test images for
    every seed (a seed changes training only); resumable like the toy sweep."""
    from capdec.lab.sweep import run_sweep

    out_dir = Path(out_dir)
    data = prepare_user_data(config, store=store, test=test, split=split, images_root=images_root,
                             encoder=encoder, cache_dir=out_dir / "test_data", device=device,
                             max_test_images=max_test_images, show_progress=show_progress)

    def prepare(cfg: ExperimentConfig, workdir: Path, **_: Any) -> ToyData:
        return replace(data, config=replace(data.config, seed=cfg.seed, noise_variance=cfg.noise_variance))

    source = {k: v for k, v in data.source.items() if k != "encoder"}
    return run_sweep(out_dir, variances=variances, seeds=seeds, config=data.config, calibrated=calibrated,
                     metric=metric, encoder=data.encoder, prepare=prepare, source=source,
                     show_progress=show_progress)


def user_style_sources(styles: dict[str, tuple[str | os.PathLike, str | os.PathLike]], data: ToyData, *,
                       split: str | None = None, images_root: str | os.PathLike | None = None,
                       cache_dir: str | os.PathLike, max_test_images: int | None = None,
                       show_progress: bool | None = None) -> dict[str, Any]:
    """``styles``: name -> (styled store, test dataset with styled references) as
    :class:`capdec.lab.transfer.StyleSource`; each style's test images are encoded once (cached per style)."""
    from capdec.encoders.base import check_identity
    from capdec.lab.transfer import StyleSource

    sources = {}
    for name, (store_path, test_path) in styles.items():
        store = _open_store(store_path, "text")
        check_identity(data.text_store.encoder_identity, store.encoder_identity, what=f"style store {store_path}")
        dataset = read_test_split(test_path, split=split, images_root=images_root, max_test_images=max_test_images)
        emb, kept, _ = encode_test_set(dataset, data.encoder, Path(cache_dir) / name, show_progress=show_progress)
        images = [dataset.images[i] for i in kept]
        sources[name] = StyleSource(store=store, references=[im.captions for im in images], embeddings=emb,
                                    images=Thumbnails([im.file for im in images]))
    return sources


def corpus_style_classifier(factual: Sequence[str], styled: dict[str, Sequence[str]], *, per_class: int = 5000,
                            seed: int = 0) -> Any:
    """A naive Bayes classifier of ``factual`` vs each style, trained on (up to ``per_class`` sentences of)
    the training corpora themselves — the user has no other styled text."""
    import random

    from capdec.lab.toyworld.styles import StyleClassifier

    rng = random.Random(seed)
    texts: list[str] = []
    labels: list[str] = []
    for label, caps in [("factual", factual), *styled.items()]:
        caps = list(caps)
        if len(caps) > per_class:
            caps = rng.sample(caps, per_class)
        texts += caps
        labels += [label] * len(caps)
    return StyleClassifier.fit(texts, labels)


__all__ += ["corpus_style_classifier", "run_user_sweep", "user_style_sources"]
