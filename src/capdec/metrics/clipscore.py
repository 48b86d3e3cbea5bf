"""CLIPScore and RefCLIPScore (Hessel et al., 2021)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from capdec.errors import InputError

CLIP_METRICS = ("CLIPScore", "RefCLIPScore")


@dataclass
class ClipScoreResult:
    """``scores``: CLIPScore / RefCLIPScore means; ``per_image``: metric -> list (input order)."""

    scores: dict[str, float | None]
    per_image: dict[str, list[float]]


def clip_score(encoder: Any, images: Sequence[Any], captions: Sequence[str],
               references: Sequence[Sequence[str]] | None = None, w: float = 2.5, *,
               prefix: str = "A photo depicts ", batch_size: int = 64) -> ClipScoreResult:
    """Reference-free CLIP-S and (with ``references``) RefCLIP-S of each caption (Hessel et al. 2021).

    CLIP-S = ``w * max(cos(image, caption), 0)``; RefCLIP-S = harmonic mean of CLIP-S and
    ``max(max_r cos(caption, r), 0)``. ``encoder`` is any :class:`capdec.encoders.Encoder`; ``images``
    are PIL images or paths. Like the authors' code, captions and references are prefixed with
    ``"A photo depicts "`` (pass ``prefix=""`` to turn that off). The numbers depend on the encoder:
    compare them only between runs with the same one.
    """
    from capdec.images import load_image
    from capdec.utils import progress

    if len(images) != len(captions):
        raise InputError(f"clip_score: {len(images)} images but {len(captions)} captions")
    if references is not None and len(references) != len(captions):
        raise InputError(f"clip_score: {len(captions)} captions but {len(references)} reference lists")
    if not captions:
        raise InputError("clip_score: no images to score")
    image_chunks = []
    for start in progress(range(0, len(images), batch_size), desc="CLIPScore images", unit="batch"):
        chunk = [im if hasattr(im, "convert") else load_image(im) for im in images[start:start + batch_size]]
        image_chunks.append(encoder.encode_image(chunk))
    import torch

    img = torch.cat(image_chunks).float()
    cap = encoder.encode_text([prefix + c for c in captions]).float()
    clip = w * (img * cap).sum(-1).clamp(min=0)
    scores: dict[str, float | None] = {"CLIPScore": float(clip.mean()), "RefCLIPScore": None}
    per = {"CLIPScore": clip.tolist()}
    if references is not None:
        flat = [prefix + r for refs in references for r in refs]
        owner = torch.tensor([i for i, refs in enumerate(references) for _ in refs])
        if len(owner) != len(flat) or any(len(r) == 0 for r in references):
            raise InputError("clip_score: every image needs at least one reference caption for RefCLIPScore")
        ref = encoder.encode_text(flat).float()
        sims = (cap[owner] * ref).sum(-1)
        best = torch.full((len(captions),), -math.inf).scatter_reduce(0, owner, sims, reduce="amax")
        best = best.clamp(min=0)
        denom = clip + best
        ref_clip = torch.where(denom > 0, 2 * clip * best / denom.clamp(min=1e-12), torch.zeros_like(denom))
        scores["RefCLIPScore"] = float(ref_clip.mean())
        per["RefCLIPScore"] = ref_clip.tolist()
    return ClipScoreResult(scores=scores, per_image=per)
