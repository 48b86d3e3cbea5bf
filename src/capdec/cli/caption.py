"""``capdec caption``: caption image files with a trained checkpoint.

Exit status: 0 when every image was captioned, 1 when some files were skipped (each is listed with
its reason at the end; the output holds all the others), 2 on a usage or input error (nothing done).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path
from typing import IO, Any

from capdec.config_base import add_arguments as add_config_arguments
from capdec.config_base import given
from capdec.configs import DecodeConfig, InferenceConfig  # torch-free: cheap for --help
from capdec.encoders import PRECISION_HELP, PRECISIONS  # torch-free: cheap for --help
from capdec.images import DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS  # stdlib-only module: cheap for --help

HELP = "caption images with a trained checkpoint (JSONL, COCO results JSON or CSV)"
DESCRIPTION = (
    "Caption image files with a trained checkpoint. IMAGES are files, directories (image files by "
    "extension; --recursive descends), glob patterns, or list files (@FILE, or a .txt/.lst file: one path "
    "per line, relative to the list's directory). Large images are decoded reduced to the encoder's input size "
    "(as capdec serve decodes uploads, so both give the same captions). Bad files (corrupt, truncated, empty, not "
    "an image, over --max-pixels or --max-aspect-ratio) are skipped with a warning and listed at the end. Results "
    "are written as they are produced, into OUT.partial.jsonl (OUT.partial.csv) after every batch, which becomes "
    "OUT when every image is done (COCO results JSON is written from it then): OUT is never half-written, an "
    "interrupted run keeps the partial file, a failed write (disk full) leaves OUT as it was. To stdout, a FIFO or "
    "a device, results go straight there. Exit status: 0 all captioned, 1 some files skipped, 2 usage or input "
    "error (or a failed write)."
)
FORMATS = ("jsonl", "coco", "csv")
DECODE_FLAGS = ["strategy", "beam_size", "length_penalty", "max_length", "stop_at_period", "top_p", "top_k",
                "temperature", "seed"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="checkpoint directory (from capdec train) or Hugging Face Hub repo id org/name[@revision]")
    parser.add_argument("images", nargs="*", metavar="IMAGES",
                        help="image files, directories, globs or @list files (or --dataset instead)")
    parser.add_argument("--recursive", action="store_true", help="descend into subdirectories (and ** in globs)")
    ds = parser.add_argument_group("dataset images (instead of IMAGES)")
    ds.add_argument("--dataset", metavar="FILE",
                    help="caption the images of a Karpathy-split file (dataset_coco.json, dataset_flickr30k.json) "
                         "or a FlickrStyle10K caption .txt; output image ids are the dataset's, so 'capdec "
                         "evaluate --references FILE --split SPLIT' matches them")
    ds.add_argument("--split", choices=["train", "restval", "val", "test", "all"], default="test",
                    help="which images of --dataset (train includes restval)")
    ds.add_argument("--images-root", metavar="DIR",
                    help="folder the dataset's images are under, as DIR/filepath/filename (COCO: the folder "
                         "holding val2014/; Flickr30k: the folder of the .jpg files)")
    ds.add_argument("--style-names", metavar="FILE", help="FlickrStyle10K image-name list (default: train.p beside it)")
    ds.add_argument("--style-test", type=int, default=0, metavar="N",
                    help="FlickrStyle10K: the last N images are the test split")
    out = parser.add_argument_group("output")
    out.add_argument("--out", metavar="FILE", help="output file (default: JSONL on stdout)")
    out.add_argument("--format", choices=FORMATS,
                     help="jsonl: {\"image\", \"caption\"} per line; coco: [{\"image_id\", \"caption\"}] JSON; "
                          "csv: image,caption. Default: from the --out extension (.json coco, .csv csv), else jsonl")
    out.add_argument("--image-ids", metavar="MAP",
                     help="file name -> image id map (COCO annotation JSON, JSON object, or CSV file_name,image_id); "
                          "default: the id in COCO file names (COCO_val2014_000000000257.jpg, 000000000785.jpg)")
    enc = parser.add_argument_group("encoder and embeddings")
    enc.add_argument("--encoder", metavar="SPEC",
                     help="encoder to use instead of the one the checkpoint records (e.g. a local copy of the same "
                          "weights: hf:/models/clip-vit-base-patch32); a different model is refused")
    enc.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                     help="L2-normalise image embeddings (--no-normalize: feed the encoder's raw features, as ClipCap's "
                          "MLP models take them; default: as the checkpoint records)")
    enc.add_argument("--shift", metavar="FILE",
                     help="vector added to the normalised image embeddings (.npy, JSON list, or {\"shift\": [...]}); "
                          "given calibrate's noise.json, the shift is text mean − image mean (= −offset), which "
                          "moves image embeddings toward the captions'; given CapDec's centers file as JSON "
                          "({\"offset_to_add_in_inference\": [...]}), that vector. Overrides the checkpoint's. The "
                          "shifted embedding is renormalised, unless the file says the offset is CapDec's released "
                          "code's (calibrate --reference-offset, or CapDec's centers file), which adds it as is")
    enc.add_argument("--renormalize-shift", action=argparse.BooleanOptionalAction, default=None,
                     help="renormalise the image embedding after adding --shift (default: as the shift file says, "
                          "else as the checkpoint records, else on)")
    enc.add_argument("--image-mean", metavar="FILE",
                     help="vector subtracted from image embeddings first (.npy, JSON list, or noise.json "
                          "'image_mean'); overrides the checkpoint's")
    # --project / --tau / --project-k override the checkpoint's InferenceConfig: not given = as recorded
    add_config_arguments(enc, InferenceConfig, ["project", "tau", "project_k"], unset_default=True, overrides={
        "project": {"help": "DeCap projection: replace each image embedding by a softmax-weighted mix of the text "
                            "memory's embeddings (default: as the checkpoint records)"},
        "tau": {"help": "projection temperature (default: the checkpoint's, else 0.01)"},
        "project_k": {"help": "project over the k nearest memory items only (default: the checkpoint's, else all)"}})
    enc.add_argument("--memory", metavar="DIR",
                     help="text memory for --project and retrieval-augmented checkpoints: an embedding store "
                          "('capdec embed') or a saved memory made with the same encoder (default: the "
                          "checkpoint's memory/)")
    dec = parser.add_argument_group("decoding")
    add_config_arguments(dec, DecodeConfig, DECODE_FLAGS)  # every DecodeConfig option but use_cache
    run_ = parser.add_argument_group("run")
    run_.add_argument("--batch-size", type=int, default=64, help="images per batch")
    run_.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    run_.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    run_.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                      help="skip images with more pixels than this (a decompression-bomb guard; the default is "
                           "PIL's); 0 for no limit")
    run_.add_argument("--max-aspect-ratio", type=float, default=DEFAULT_MAX_ASPECT,
                      help="skip images whose long side is over this many times their short side (as capdec serve "
                           "refuses them; an encoder that resizes the short side makes a long strip huge); 0 for no "
                           "limit")
    run_.add_argument("--workers", type=int, default=4, help="image loading threads (0: load in the main thread)")


def _format(args: argparse.Namespace) -> str:
    if args.format:
        return args.format
    suffix = Path(args.out).suffix.lower() if args.out else ""
    return {".json": "coco", ".csv": "csv"}.get(suffix, "jsonl")


class _Writer:
    """Writes results as they are made. To a file OUT: streamed into ``OUT.partial.jsonl`` (``.csv``), flushed
    after each batch, and renamed to OUT when every image is done (COCO results JSON is written from those
    rows), so OUT is never half-written; an interrupted run keeps the partial file, a failed write (disk full)
    removes it. To stdout, a FIFO or a device: streamed straight there (COCO: at the end)."""

    def __init__(self, fmt: str, out: str | None, image_ids: dict[str, Any] | None):
        from capdec.output import open_through, output_target

        self.fmt, self.out, self.image_ids = fmt, out, image_ids
        self.coco: list[dict[str, Any]] = []
        self.partial: Path | None = None
        self.where: Path | None = None
        self.stream: IO[str] | None = sys.stdout if out is None and fmt != "coco" else None
        if out is not None:
            kind, self.where = output_target(out)
            if kind == "file":
                self.where.parent.mkdir(parents=True, exist_ok=True)
                self.partial = Path(f"{self.where}.partial.{'csv' if fmt == 'csv' else 'jsonl'}")
                self.stream = self._guard(lambda: open(self.partial, "w", encoding="utf-8", newline=""))
            elif fmt != "coco":
                self.stream = open_through(out, kind)
        self.csv = csv.writer(self.stream) if fmt == "csv" else None
        if self.csv is not None:
            self._guard(lambda: self.csv.writerow(["image", "caption"] + (["image_id"] if image_ids is not None
                                                                           else [])))

    def _guard(self, write: Any) -> Any:
        """Run one write; an OSError (disk full, ...) removes the partial file and is one line naming OUT."""
        from capdec.output import OutputError, write_error

        try:
            return write()
        except OSError as e:
            if isinstance(e, OutputError):
                raise
            self._discard()
            raise write_error(self.out or "stdout", e) from None

    def _discard(self) -> None:
        if self.stream is not None and self.stream is not sys.stdout:
            try:
                self.stream.close()
            except OSError:
                pass
        self.stream = None
        if self.partial is not None:
            self.partial.unlink(missing_ok=True)
            self.partial = None

    def _image_id(self, image: str) -> Any:
        from capdec.images import lookup_image_id

        return lookup_image_id(image, self.image_ids)

    def write(self, results: list[Any]) -> None:
        lines = []
        for r in results:
            row: dict[str, Any] = {"image": r.image, "caption": r.caption}
            if self.fmt == "coco" or self.image_ids is not None:
                row["image_id"] = self._image_id(r.image)
            if self.fmt == "coco":
                self.coco.append({"image_id": row["image_id"], "caption": r.caption})
            if self.csv is not None:
                self._guard(lambda r=r, row=row: self.csv.writerow(
                    [r.image, r.caption] + ([row["image_id"]] if self.image_ids is not None else [])))
            else:
                lines.append(json.dumps(row, ensure_ascii=False) + "\n")
        if self.stream is not None:
            self._guard(lambda: (self.stream.write("".join(lines)), self.stream.flush()))

    def close(self, *, success: bool) -> None:
        from capdec.output import publish, write_text

        if self.stream is not None and self.stream is not sys.stdout:
            stream, self.stream = self.stream, None
            if success:
                self._guard(stream.close)
            else:
                try:
                    stream.close()
                except OSError:  # the partial file is incomplete as well: nothing worth keeping
                    self._discard()
        if not success:
            return
        if self.fmt == "coco":
            text = json.dumps(self.coco, indent=2, ensure_ascii=False) + "\n"
            if self.out is None:
                sys.stdout.write(text)
                sys.stdout.flush()
            else:
                write_text(self.out, text)
        elif self.partial is not None:
            self._guard(lambda: publish(self.partial, self.where))
            self.partial = None
        if self.partial is not None:
            self.partial.unlink(missing_ok=True)
            self.partial = None


REFERENCE_SHIFT_KEY = "offset_to_add_in_inference"  # CapDec's CLIP_embeddings_centers_info (converted to JSON)


def _read_shift(path: str) -> tuple[list[float], bool | None]:
    """The caption-time shift and whether to renormalise after it (None: the file does not say).

    A plain vector / {"shift": ...} is used as is; a calibrate noise.json gives ``-offset`` (its offset
    is image mean − text mean, added to *text* embeddings in training, and an image embedding moves
    toward the text cone by the opposite vector) and its ``renormalize_shift``; CapDec's centers file
    its ``offset_to_add_in_inference``, added without renormalising as CapDec's predictions_runner.py does.
    """
    from capdec.io.vectors import read_vector

    if Path(path).suffix.lower() == ".json":
        from capdec.io.text import read_json

        data = read_json(path)
        if isinstance(data, dict) and data.get("shift") is None:
            if data.get(REFERENCE_SHIFT_KEY) is not None:
                return read_vector(path, keys=(REFERENCE_SHIFT_KEY,)), False
            if data.get("offset") is not None:
                renormalize = data.get("renormalize_shift")
                return [-x for x in read_vector(path, keys=("offset",))], (
                    renormalize if isinstance(renormalize, bool) else None)
    return read_vector(path, keys=("shift",)), None


def _inference_overrides(args: argparse.Namespace) -> dict[str, Any]:
    from capdec.io.vectors import read_vector

    overrides: dict[str, Any] = {}
    if args.normalize is not None:
        overrides["normalize"] = args.normalize
    if args.shift:
        overrides["shift"], renormalize = _read_shift(args.shift)
        if renormalize is not None:
            overrides["renormalize_shift"] = renormalize
    if args.renormalize_shift is not None:
        overrides["renormalize_shift"] = args.renormalize_shift
    if args.image_mean:
        overrides["image_mean"] = read_vector(args.image_mean, keys=("image_mean", "mean"))
    for name in ("project", "tau", "project_k"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    return overrides


def _dataset_images(args: argparse.Namespace) -> tuple[list[Path], dict[str, Any], list[str]]:
    """(existing image paths, path -> dataset image id, missing paths) of --dataset's --split."""
    from capdec.errors import InputError
    from capdec.io.datasets import read_flickrstyle, read_karpathy

    if not args.images_root:
        raise InputError("--dataset needs --images-root DIR (the folder its images are under)")
    root = Path(args.images_root)
    if not root.is_dir():
        raise InputError(f"--images-root {root}: not a directory")
    if Path(args.dataset).suffix.lower() == ".txt":
        ds = read_flickrstyle(args.dataset, args.style_names, split=args.split, test_size=args.style_test)
    else:
        ds = read_karpathy(args.dataset, args.split)
    paths, ids, missing = [], {}, []
    for img in ds.images:
        path = root / img.file
        if path.is_file():
            paths.append(path)
            ids[str(path)] = img.image_id
        else:
            missing.append(str(path))
    if not paths:
        raise InputError(f"none of the {len(ds)} images of the {args.split!r} split of {args.dataset} is under "
                         f"{root} (looked for e.g. {missing[0]})")
    if missing:
        logging.getLogger("capdec.caption").warning(
            "%d of the %d images of the %r split are missing under %s and will be skipped (e.g. %s)",
            len(missing), len(ds), args.split, root, missing[0])
    return paths, ids, missing


def run(args: argparse.Namespace) -> int:
    from PIL import Image

    from capdec.caption import Captioner
    from capdec.errors import InputError
    from capdec.images import find_images, lookup_image_id
    from capdec.io.image_datasets import read_image_ids
    from capdec.utils import set_threads_from_env

    log = logging.getLogger("capdec.caption")
    set_threads_from_env()
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    # the configs check their own values (once, in capdec.configs), before anything is loaded
    decode = DecodeConfig(**given(args, DecodeConfig, DECODE_FLAGS))
    InferenceConfig(**given(args, InferenceConfig, ["tau", "project_k"]))
    fmt = _format(args)
    max_pixels = args.max_pixels if args.max_pixels > 0 else None
    if not (args.max_aspect_ratio >= 1 or args.max_aspect_ratio == 0):
        raise InputError(f"--max-aspect-ratio must be ≥ 1 (or 0: no limit), got {args.max_aspect_ratio}")
    max_aspect = args.max_aspect_ratio or None
    if Image.MAX_IMAGE_PIXELS is not None and (max_pixels is None or max_pixels > Image.MAX_IMAGE_PIXELS):
        # our check is the guard now; PIL's own (global) limit would refuse what the user allowed
        Image.MAX_IMAGE_PIXELS = max_pixels

    # everything that can fail on the user's input is checked before the model is loaded
    missing_files: list[str] = []
    if args.dataset:
        if args.images or args.image_ids:
            raise InputError("give either IMAGES (with --image-ids) or --dataset, not both")
        paths, image_ids, missing_files = _dataset_images(args)
    else:
        if not args.images:
            raise InputError("no images: give image files, folders or globs, or --dataset FILE --images-root DIR")
        paths = find_images(args.images, recursive=args.recursive)
        if not paths:
            raise InputError(f"no image files found in {' '.join(args.images)}")
        image_ids = read_image_ids(args.image_ids) if args.image_ids else None
    if fmt == "coco":
        missing = [str(p) for p in paths if lookup_image_id(p, image_ids) is None]
        if missing:
            raise InputError(f"COCO output needs an image id for every image; none for {len(missing)} file(s), e.g. "
                             f"{missing[0]!r}. Give --image-ids MAP, or use --format jsonl")
    overrides = _inference_overrides(args)

    captioner = Captioner.from_pretrained(args.checkpoint, encoder=args.encoder, device=args.device,
                                          precision=args.precision, decode=decode, max_pixels=max_pixels,
                                          max_aspect_ratio=max_aspect, num_workers=args.workers,
                                          memory=args.memory, **overrides)
    encoder = captioner.encoder  # built and checked against the checkpoint before anything is written
    log.info("captioning %d image(s) with %s and encoder %s (%s)", len(paths), args.checkpoint, encoder.spec,
             ", ".join(f"{k}={v}" for k, v in decode.to_dict().items() if v is not None))

    writer = _Writer(fmt, args.out, image_ids)
    if writer.partial is not None:
        log.info("results are written to %s until %s is complete", writer.partial, args.out)
    stream = captioner.stream(paths, batch_size=args.batch_size)
    success = False
    try:
        for results in stream.batches():
            writer.write(results)
        success = True
    finally:
        writer.close(success=success)
        if not success and writer.partial is not None:
            log.warning("interrupted: the %d caption(s) made so far are in %s", stream.captioned, writer.partial)

    where = args.out or "stdout"
    skipped = [(m, "not found under --images-root") for m in missing_files]
    skipped += [(s.image, s.reason) for s in stream.skipped]
    if skipped:
        lines = "\n".join(f"  {image}: {reason}" for image, reason in skipped)
        log.warning("captioned %d of %d image(s) -> %s; skipped %d:\n%s", stream.captioned,
                    len(paths) + len(missing_files), where, len(skipped), lines)
        return 1
    log.info("captioned %d image(s) -> %s", stream.captioned, where)
    return 0

