"""Image-embedding stores: a captioned-image dataset → one CLIP image embedding per image.

The supervised comparison of the paper (ClipCap: the decoder trained on *image* embeddings of paired
data) and its "pre-train on images, then fine-tune on text" recipe both need a store of image
embeddings paired with captions. :func:`embed_image_dataset` reads a dataset with
:func:`capdec.io.read_image_dataset` and embeds each image once; the store's ``rows.npy`` maps
every caption to its image's row — five captions of an image share one stored embedding. The store
records ``modality: "image"``; ``capdec train`` on it trains ClipCap (noise off unless asked).

The work is a pipeline. DataLoader worker processes decode each image with the image loader
(:mod:`capdec.images`: EXIF, alpha, bombs; an unreadable file is listed in the store's ``stats`` and
skipped, with its captions) and turn it into the encoder's input (its ``image_transform``: resize,
crop, normalise); the main process encodes batches and writes a shard of ``shard_size`` images to
``.STORE.partial/`` as each finishes. A killed run resumes from its finished shards; batches start
at shard starts, so the store is byte-identical to one written in a single go. Under torchrun the
ranks share the shards and rank 0 assembles the store, the one a single process writes. Assembly
streams shard by shard and image by image: nothing is held per caption.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from capdec import distributed
from capdec.artifacts import jsonable
from capdec.corpus import captions_sha256
from capdec.errors import InputError
from capdec.images import DEFAULT_MAX_PIXELS, try_load_image
from capdec.io.datasets import ImageDataset
from capdec.io.image_datasets import read_image_dataset
from capdec.store import (
    CAPTIONS,
    EMBEDDINGS,
    META,
    ROWS,
    ROWS_FORMAT,
    EmbeddingStore,
    EmbedRun,
    NpyWriter,
    _check_dtype,
    _check_target,
    _make_meta,
    load_shard,
    plan_shards,
    replaceable,
    save_shard,
    shard_info,
)
from capdec.utils import atomic_dir, progress, sha256_file, write_json

logger = logging.getLogger(__name__)

_PARTIAL_FORMAT = "capdec.image-embeddings.partial/1"
_PR_SET_PDEATHSIG = 1  # prctl(2)


def dataset_digest(dataset: ImageDataset) -> str:
    """Digest of what an image store is made from: each image path and its captions, in order."""
    return captions_sha256(f"{im.file}\t{im.image_id}\t" + "\t".join(im.captions) for im in dataset.images)


# -- the pipeline: files -> model inputs (worker processes) -> embeddings (this process) -------------


class ImageFiles(Dataset):
    """Image files decoded and transformed into model inputs, by index: ``(i, pixels, None)`` or ``(i, None, reason)``.

    The paths are kept as one bytes buffer plus offsets: forked workers share it untouched (a list of
    a million ``str`` objects would be copied into every worker as their reference counts change).
    """

    def __init__(self, paths: Sequence[str | os.PathLike], transform: Callable[[Any], torch.Tensor], *,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS):
        encoded = [os.fsencode(p) for p in paths]
        self._blob = b"".join(encoded)
        self._ends = np.cumsum([len(p) for p in encoded], dtype=np.int64)
        self.transform, self.max_pixels = transform, max_pixels

    def __len__(self) -> int:
        return len(self._ends)

    def path(self, i: int) -> str:
        lo = int(self._ends[i - 1]) if i else 0
        return os.fsdecode(self._blob[lo : int(self._ends[i])])

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        image, reason = try_load_image(self.path(i), max_pixels=self.max_pixels)
        if image is None:
            return i, None, reason or "unknown error"
        return i, self.transform(image), None


def _collate(items: list[tuple[int, torch.Tensor | None, str | None]]) -> tuple[list[int], np.ndarray | None,
                                                                               list[tuple[int, str]]]:
    """(indices of the images that loaded, their (k, 3, H, W) inputs or None, [(index, reason)] of the rest).

    The inputs travel back as a numpy array, pickled through the worker's pipe: a torch tensor would be
    passed as a shared-memory file descriptor, through a Unix socket under $TMPDIR, and a long $TMPDIR
    path (over 107 bytes) makes that fail in the worker's feeder thread and the loader wait forever.
    """
    good = [(i, x) for i, x, _ in items if x is not None]
    pixels = torch.stack([x for _, x in good]).numpy() if good else None
    return [i for i, _ in good], pixels, [(i, reason) for i, x, reason in items if x is None]


class ShardBatches(Sampler):
    """Batches of indices, ``batch_size`` at a time from each shard's start (so a batch never spans two)."""

    def __init__(self, shards: Sequence[tuple[int, int]], batch_size: int):
        self.shards, self.batch_size = list(shards), batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for lo, hi in self.shards:
            for b in range(lo, hi, self.batch_size):
                yield list(range(b, min(b + self.batch_size, hi)))

    def __len__(self) -> int:
        return sum(-(-(hi - lo) // self.batch_size) for lo, hi in self.shards)


def _die_with_parent(parent: int, worker_id: int) -> None:
    """Have the kernel kill this worker when the main process dies (Linux). A worker whose main process
    was killed would otherwise wait forever to flush its last batches into a pipe nobody reads."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the request took effect
        os._exit(1)


def default_workers() -> int:
    """Image loading processes by default: 4, or fewer when fewer CPUs are available to this process."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return min(4, cpus)


def pixel_batches(files: ImageFiles, batches: Sampler, *, num_workers: int | None = None
                  ) -> Iterator[tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]]:
    """Load ``batches`` of ``files`` in order, in ``num_workers`` processes (0: in this one; None:
    :func:`default_workers`); see :func:`_collate`."""
    num_workers = default_workers() if num_workers is None else num_workers
    if num_workers < 0:
        raise InputError(f"the number of image loading workers must be ≥ 0, got {num_workers}")
    context = None
    if num_workers and "fork" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("fork")  # workers start at once, sharing what is loaded
    loader = DataLoader(files, batch_sampler=batches, num_workers=num_workers, collate_fn=_collate,
                        multiprocessing_context=context, prefetch_factor=2 if num_workers else None,
                        worker_init_fn=functools.partial(_die_with_parent, os.getpid()) if num_workers else None)
    for indices, pixels, skipped in loader:
        for i, reason in skipped:
            logger.warning("skipping %s: %s", files.path(i), reason)
        yield indices, (torch.from_numpy(pixels) if pixels is not None else None), skipped


def _encode(encoder: Any, pixels: torch.Tensor | None, batch_size: int) -> np.ndarray:
    if pixels is None:
        return np.zeros((0, int(encoder.dim)), dtype=np.float32)
    return np.asarray(encoder.encode_pixels(pixels, batch_size=batch_size).numpy(), dtype=np.float32)


def _check_finite(emb: np.ndarray, files: ImageFiles, indices: Sequence[int]) -> None:
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():
        raise InputError(f"the image encoder returned non-finite embeddings (first: "
                         f"{files.path(indices[int(np.nonzero(bad)[0][0])])}); try --precision fp32")


def encode_dataset_images(dataset: ImageDataset, encoder: Any, *, batch_size: int = 64,
                          max_pixels: int | None = DEFAULT_MAX_PIXELS, num_workers: int | None = None,
                          show_progress: bool | None = None) -> tuple[np.ndarray, list[int], list[dict[str, str]]]:
    """Encode every image of ``dataset`` once, in memory (a test split): (embeddings of the readable
    ones, their record indices, skipped)."""
    files = ImageFiles([im.file for im in dataset.images], encoder.image_transform(), max_pixels=max_pixels)
    parts, kept, skipped = [], [], []
    with progress(total=len(dataset), desc="embed images", unit="image", show=show_progress) as bar:
        for indices, pixels, bad in pixel_batches(files, ShardBatches([(0, len(files))], batch_size),
                                                  num_workers=num_workers):
            emb = _encode(encoder, pixels, batch_size)
            _check_finite(emb, files, indices)
            parts.append(emb)
            kept.extend(indices)
            skipped.extend({"image": files.path(i), "reason": r} for i, r in bad)
            bar.update(len(indices) + len(bad))
            if skipped:
                bar.set_postfix(skipped=len(skipped), refresh=False)
    emb = np.concatenate(parts) if parts else np.zeros((0, int(encoder.dim)), dtype=np.float32)
    return emb, kept, skipped


# -- the store ---------------------------------------------------------------------------------------


def embed_image_dataset(dataset: ImageDataset | str | os.PathLike, out_dir: str | os.PathLike, encoder: Any, *,
                        split: str | None = None, images_root: str | os.PathLike | None = None,
                        dtype: str = "float16", batch_size: int = 64, shard_size: int = 4096,
                        overwrite: bool = False, num_workers: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                        show_progress: bool | None = None) -> EmbeddingStore:
    """Embed a dataset's images into an image store at ``out_dir``; resumable and atomic.

    ``dataset`` is an :class:`ImageDataset` or a dataset file read with ``split`` and ``images_root``.
    A rerun with the same dataset, encoder and dtype does nothing; an interrupted one computes only
    the shards (``shard_size`` images) it lacks. ``num_workers`` processes decode the images (0: this
    process; None: :func:`default_workers`). Raises :class:`InputError` when no image could be read.
    """
    start = time.perf_counter()
    _check_dtype(dtype)
    if batch_size < 1 or shard_size < 1:
        raise InputError(f"batch_size and shard_size must be positive (got {batch_size}, {shard_size})")
    if not isinstance(dataset, ImageDataset):
        dataset = read_image_dataset(dataset, split=split, images_root=images_root)
    out_dir = Path(out_dir)
    digest = dataset_digest(dataset)
    identity = jsonable(encoder.identity)
    replace = _check_target(out_dir, overwrite=overwrite,
                            what={"captions_sha256": digest, "encoder_identity": identity, "dtype": dtype})
    if replace is None:
        store = EmbeddingStore.open(out_dir)
        logger.info("%s is up to date (%d images, same dataset and encoder); nothing to do", out_dir,
                    len(store.vectors))
        store.embed_run = EmbedRun(encoded=0, resumed=0, up_to_date=True, seconds=time.perf_counter() - start)
        return store

    dist_info = distributed.info()
    n, dim = len(dataset), int(encoder.dim)
    partial = out_dir.parent / f".{out_dir.name}.partial"
    manifest = {"format": _PARTIAL_FORMAT, "captions_sha256": digest, "encoder_identity": identity,
                "count": n, "dim": dim, "shard_size": shard_size, "max_pixels": max_pixels}
    shards = [(lo, min(lo + shard_size, n)) for lo in range(0, n, shard_size)]
    done, todo = plan_shards(partial, manifest, len(shards), lambda i: _load_image_shard(partial, i, dim) is not None)
    resumed = sum(shards[i][1] - shards[i][0] for i in done)
    if dist_info.is_main:
        logger.info("embedding %d images (%d captions) of %s", n, dataset.n_captions, dataset.path)
        if done:
            logger.info("resuming %s: %d of %d shards (%d images) already embedded", out_dir, len(done),
                        len(shards), resumed)
    encoded = _encode_shards(dataset, encoder, partial, [shards[i] for i in todo], shard_size=shard_size,
                             batch_size=batch_size, num_workers=num_workers, max_pixels=max_pixels,
                             show_progress=show_progress if dist_info.is_main else False,
                             bar={"total": n, "initial": resumed} if not dist_info.enabled else
                             {"total": sum(shards[i][1] - shards[i][0] for i in todo),
                              "desc": f"embed images (rank 0 of {dist_info.world_size})"})
    if dist_info.enabled:
        encoded = int(distributed.all_reduce_sum(torch.tensor([encoded])).item())  # waits for every rank's shards
    if dist_info.is_main:
        _assemble(dataset, encoder, partial, out_dir, shards, dtype=dtype, digest=digest, replace=bool(replace))
        shutil.rmtree(partial, ignore_errors=True)
    distributed.barrier()  # the store is complete before any rank returns it

    store = EmbeddingStore.open(out_dir)
    seconds = time.perf_counter() - start
    skipped = store.meta["stats"]["skipped_images"]
    logger.info("embedded %d images (%d captions, %d skipped, %d resumed) into %s in %.1f s", len(store.vectors),
                len(store), len(skipped), resumed, out_dir, seconds)
    store.embed_run = EmbedRun(encoded=encoded, resumed=resumed, up_to_date=False, seconds=seconds)
    return store


def _encode_shards(dataset: ImageDataset, encoder: Any, partial: Path, shards: list[tuple[int, int]], *,
                   shard_size: int, batch_size: int, num_workers: int | None, max_pixels: int | None,
                   show_progress: bool | None, bar: dict[str, Any]) -> int:
    """Encode the images of ``shards`` and write each shard as it completes; returns the images encoded
    (``bar``: the progress bar's total, initial count, description)."""
    if not shards:
        return 0
    files = ImageFiles([im.file for im in dataset.images], encoder.image_transform(), max_pixels=max_pixels)
    ends = {hi: lo // shard_size for lo, hi in shards}  # a shard is complete when its last index arrives
    parts: list[np.ndarray] = []
    left_out: list[dict[str, Any]] = []
    done = 0
    with progress(**{"desc": "embed images", "unit": "image", **bar}, show=show_progress) as pbar:
        for indices, pixels, bad in pixel_batches(files, ShardBatches(shards, batch_size), num_workers=num_workers):
            emb = _encode(encoder, pixels, batch_size)
            _check_finite(emb, files, indices)
            parts.append(emb)
            left_out.extend({"index": i, "image": files.path(i), "reason": r} for i, r in bad)
            last = max(indices[-1] if indices else -1, bad[-1][0] if bad else -1)
            pbar.update(len(indices) + len(bad))
            done += len(indices)
            shard = ends.get(last + 1)
            if shard is not None:
                save_shard(partial, shard, np.concatenate(parts), images=last + 1 - shard * shard_size,
                           skipped=left_out)
                parts, left_out = [], []
    return done


def _load_image_shard(partial: Path, i: int, dim: int) -> np.ndarray | None:
    try:
        info = shard_info(partial, i)
        rows = int(info["images"]) - len(info["skipped"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return load_shard(partial, i, rows, dim)


def _assemble(dataset: ImageDataset, encoder: Any, partial: Path, out_dir: Path, shards: list[tuple[int, int]], *,
              dtype: str, digest: str, replace: bool) -> None:
    """Write the store from the shards (rank 0), streaming: embeddings, the row map and the captions."""
    dim = int(encoder.dim)
    infos = [shard_info(partial, i) for i in range(len(shards))]
    skipped = [{"image": s["image"], "reason": s["reason"]} for info in infos for s in info["skipped"]]
    n_rows = len(dataset) - len(skipped)
    if not n_rows:
        raise InputError(f"none of the {len(dataset)} images of {dataset.path} could be read (first: "
                         f"{skipped[0]['image']}: {skipped[0]['reason']}); check --images-root")
    left_out = {s["index"] for info in infos for s in info["skipped"]}
    if skipped:
        logger.warning("%d of %d images could not be read and were left out with their captions (listed in "
                       "%s/meta.json, stats.skipped_images)", len(skipped), len(dataset), out_dir)
    count = sum(len(im.captions) for i, im in enumerate(dataset.images) if i not in left_out)
    n_skipped_captions = dataset.n_captions - count
    with atomic_dir(out_dir, overwrite=replace, replaceable=replaceable) as tmp:
        with open(tmp / EMBEDDINGS, "wb") as f:
            emb = NpyWriter(f, (n_rows, dim), dtype)
            for i, (lo, hi) in enumerate(shards):
                emb.write(load_shard(partial, i, hi - lo - len(infos[i]["skipped"]), dim))
            emb.close()
        with open(tmp / ROWS, "wb") as rows_f, open(tmp / CAPTIONS, "w", encoding="utf-8") as cap_f:
            rows = NpyWriter(rows_f, (count,), "int64")
            row = 0
            for lo, hi in shards:
                block = []
                for i in range(lo, hi):
                    if i in left_out:
                        continue
                    img = dataset.images[i]
                    for c in img.captions:
                        cap_f.write(json.dumps({"caption": c, "image": img.file, "image_id": img.image_id},
                                               ensure_ascii=False) + "\n")
                    block.append(np.full(len(img.captions), row, dtype=np.int64))
                    row += 1
                if block:
                    rows.write(np.concatenate(block))
            rows.close()
        corpus_info = {"paths": [str(Path(dataset.path).resolve())], "sha256": sha256_file(dataset.path),
                       "captions_sha256": digest, "format": dataset.format, "split": dataset.split,
                       "images_root": str(Path(dataset.images_root).resolve())}
        stats = {"read": dataset.n_captions, "empty_skipped": 0, "duplicates_removed": 0, "truncated": None,
                 "images": n_rows, "images_left_out": dict(dataset.skipped),
                 "captions_of_skipped_images": n_skipped_captions, "skipped_images": skipped}
        meta = _make_meta(encoder.spec, encoder.identity, (count, dim), dtype, corpus_info, stats)
        meta.update(format=ROWS_FORMAT, rows=n_rows, modality="image")
        write_json(tmp / META, meta)  # last: its presence marks a complete store


__all__ = ["ImageFiles", "ShardBatches", "dataset_digest", "default_workers", "embed_image_dataset",
           "encode_dataset_images", "pixel_batches"]
