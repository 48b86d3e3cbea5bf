"""Image-embedding stores: a captioned-image dataset → one CLIP image embedding per image.

The supervised comparison of the paper (ClipCap: the decoder trained on *image* embeddings of paired
data) and its "pre-train on images, then fine-tune on text" recipe both need a store of image
embeddings paired with captions. :func:`embed_image_dataset` reads a dataset with
:func:`capdec.io.read_image_dataset`, loads each image once with the image loader
(:mod:`capdec.images`: EXIF, alpha, bombs; unreadable files are listed in the store's ``stats`` and
skipped, with their captions), encodes it once, and writes a store whose ``rows.npy`` maps every caption
to its image's row — five captions of an image share one stored embedding. The store records
``modality: "image"``; ``capdec train`` on it trains ClipCap (noise off unless asked).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from capdec.artifacts import jsonable
from capdec.corpus import captions_sha256
from capdec.errors import InputError
from capdec.images import DEFAULT_MAX_PIXELS, iter_image_batches
from capdec.io.datasets import ImageDataset
from capdec.io.image_datasets import read_image_dataset
from capdec.store import EmbeddingStore, EmbedRun, _check_target
from capdec.utils import progress, sha256_file

logger = logging.getLogger(__name__)


def dataset_digest(dataset: ImageDataset) -> str:
    """Digest of what an image store is made from: each image path and its captions, in order."""
    return captions_sha256(f"{im.file}\t{im.image_id}\t" + "\t".join(im.captions) for im in dataset.images)


def encode_dataset_images(dataset: ImageDataset, encoder: Any, *, batch_size: int = 64,
                          max_pixels: int | None = DEFAULT_MAX_PIXELS, num_workers: int = 4,
                          show_progress: bool | None = None) -> tuple[np.ndarray, list[int], list[dict[str, str]]]:
    """Encode every image of ``dataset`` once: (embeddings of the readable ones, their record indices, skipped)."""
    index = {im.file: i for i, im in enumerate(dataset.images)}
    parts, kept, skipped = [], [], []
    with progress(total=len(dataset), desc="embed images", unit="image", show=show_progress) as bar:
        for batch in iter_image_batches([im.file for im in dataset.images], batch_size=batch_size,
                                        max_pixels=max_pixels, num_workers=num_workers):
            if batch.images:
                emb = encoder.encode_image(batch.images, batch_size=batch_size)
                parts.append(np.asarray(emb.detach().cpu().float().numpy(), dtype=np.float32))
                kept.extend(index[p] for p in batch.paths)
            skipped.extend({"image": s.image, "reason": s.reason} for s in batch.skipped)
            bar.update(len(batch))
            if skipped:
                bar.set_postfix(skipped=len(skipped), refresh=False)
    emb = np.concatenate(parts) if parts else np.zeros((0, int(encoder.dim)), dtype=np.float32)
    if not np.isfinite(emb).all():
        raise InputError("the image encoder returned non-finite embeddings; try --precision fp32")
    return emb, kept, skipped


def embed_image_dataset(dataset: ImageDataset | str | os.PathLike, out_dir: str | os.PathLike, encoder: Any, *,
                        split: str | None = None, images_root: str | os.PathLike | None = None,
                        dtype: str = "float16", batch_size: int = 64, overwrite: bool = False,
                        num_workers: int = 4, show_progress: bool | None = None) -> EmbeddingStore:
    """Embed a dataset's images into an image store at ``out_dir`` (atomic; a rerun with the same dataset
    and encoder does nothing). ``dataset`` is an :class:`ImageDataset` or a dataset file read with
    ``split`` and ``images_root``. Raises :class:`InputError` when no image could be read."""
    start = time.perf_counter()
    if not isinstance(dataset, ImageDataset):
        dataset = read_image_dataset(dataset, split=split, images_root=images_root)
    out_dir = Path(out_dir)
    digest = dataset_digest(dataset)
    wanted = {"captions_sha256": digest, "encoder_identity": jsonable(encoder.identity), "dtype": dtype}
    replace = _check_target(out_dir, overwrite=overwrite, what=wanted)
    if replace is None:
        store = EmbeddingStore.open(out_dir)
        logger.info("%s is up to date (%d images, same dataset and encoder); nothing to do", out_dir,
                    len(store.vectors))
        store.embed_run = EmbedRun(encoded=0, resumed=0, up_to_date=True, seconds=time.perf_counter() - start)
        return store

    logger.info("embedding %d images (%d captions) of %s", len(dataset), dataset.n_captions, dataset.path)
    emb, kept, skipped = encode_dataset_images(dataset, encoder, batch_size=batch_size, num_workers=num_workers,
                                               show_progress=show_progress)
    if not kept:
        raise InputError(f"none of the {len(dataset)} images of {dataset.path} could be read (first: "
                         f"{skipped[0]['image']}: {skipped[0]['reason']}); check --images-root")
    if skipped:
        logger.warning("%d of %d images could not be read and were left out with their captions (listed in "
                       "%s/meta.json, stats.skipped_images)", len(skipped), len(dataset), out_dir)
    captions, records, rows = [], [], []
    for row, i in enumerate(kept):
        img = dataset.images[i]
        for c in img.captions:
            captions.append(c)
            records.append({"image": img.file, "image_id": img.image_id})
            rows.append(row)
    n_skipped_captions = sum(len(dataset.images[i].captions) for i in set(range(len(dataset))) - set(kept))
    corpus_info = {"paths": [str(Path(dataset.path).resolve())], "sha256": sha256_file(dataset.path),
                   "captions_sha256": digest, "format": dataset.format, "split": dataset.split,
                   "images_root": str(Path(dataset.images_root).resolve())}
    stats = {"read": dataset.n_captions, "empty_skipped": 0, "duplicates_removed": 0, "truncated": None,
             "images": len(kept), "images_left_out": dict(dataset.skipped),
             "captions_of_skipped_images": n_skipped_captions, "skipped_images": skipped}
    store = EmbeddingStore.from_arrays(captions, emb, encoder=encoder, records=records, stats=stats,
                                       row_index=rows, modality="image")
    store.meta["corpus"] = corpus_info
    store = store.save(out_dir, dtype=dtype, overwrite=bool(replace))
    seconds = time.perf_counter() - start
    logger.info("embedded %d images (%d captions, %d skipped) into %s in %.1f s", len(kept), len(captions),
                len(skipped), out_dir, seconds)
    store.embed_run = EmbedRun(encoded=len(kept), resumed=0, up_to_date=False, seconds=seconds)
    return store


__all__ = ["dataset_digest", "embed_image_dataset", "encode_dataset_images"]
