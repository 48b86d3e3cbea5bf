"""The input layer: every file a *user* hands capdec is read here, with errors that name the file and line.

Artefacts capdec writes itself (stores, memories, noise files, checkpoints) are read by the artefact
layer (:mod:`capdec.artifacts`); images are found and decoded by :mod:`capdec.images`, which also owns
the rule that turns a file name into an image id.

- :mod:`~capdec.io.text`: text and JSON, parsed one way (``PATH: line N[ column C]: ...`` errors);
- :mod:`~capdec.io.datasets`: the one record of an image with its captions (:class:`CaptionedImage`,
  a split of them an :class:`ImageDataset`) and the standard files: COCO caption annotations (read
  there only), Karpathy splits, FlickrStyle10K;
- :mod:`~capdec.io.corpora`: caption corpora (txt / jsonl / csv / tsv / COCO / Karpathy / FlickrStyle10K);
- :mod:`~capdec.io.references`: reference captions (``capdec evaluate``, calibration);
- :mod:`~capdec.io.predictions`: generated captions (``capdec evaluate``);
- :mod:`~capdec.io.image_datasets`: captioned-image datasets (``capdec embed --modality image``,
  experiment test splits), calibration pairs, image id maps;
- :mod:`~capdec.io.vectors`: shift / image-mean vectors.
"""

from __future__ import annotations

from capdec.io.corpora import FORMATS, detect_format, iter_caption_file
from capdec.io.datasets import (
    SPLITS,
    CaptionedImage,
    ImageDataset,
    check_split,
    json_kind,
    read_coco,
    read_flickrstyle,
    read_karpathy,
    read_name_list,
)
from capdec.io.image_datasets import DATASET_FORMATS, read_image_dataset, read_image_ids, read_pairs
from capdec.io.predictions import Prediction, load_predictions, read_predictions
from capdec.io.references import ReferenceSet, load_references, read_references
from capdec.io.text import at_line, check_utf8, parse_json, read_json, read_text
from capdec.io.vectors import read_vector

__all__ = ["DATASET_FORMATS", "FORMATS", "SPLITS", "CaptionedImage", "ImageDataset", "Prediction", "ReferenceSet",
           "at_line", "check_split", "check_utf8", "detect_format", "iter_caption_file", "json_kind",
           "load_predictions", "load_references", "parse_json", "read_coco", "read_flickrstyle", "read_image_dataset",
           "read_image_ids", "read_json", "read_karpathy", "read_name_list", "read_pairs", "read_predictions",
           "read_references", "read_text", "read_vector"]
