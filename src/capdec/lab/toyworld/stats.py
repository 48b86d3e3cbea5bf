"""How good a CLIP-like encoder is on the toy world, and how wide its modality gap is.

:func:`gap_stats` is pure maths on paired, L2-normalised embeddings (image ``i`` belongs with text
``i``); :func:`clip_stats` embeds fresh held-out toy scenes and their captions and calls it. Works
with any encoder (``encode_image``/``encode_text`` callables), not only the mini-CLIP.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)


def recall_at_1(queries: torch.Tensor, keys: torch.Tensor, *, block: int = 100) -> float:
    """Fraction of queries whose best key (cosine) is their own, within blocks of ``block`` pairs.

    "R@1 among 100": pair ``i`` competes only with the other pairs of its block, so the number does
    not depend on how many pairs were embedded. A trailing partial block is ignored.
    """
    n = (len(queries) // block) * block
    if n == 0:
        raise ValueError(f"need at least {block} pairs for R@1 among {block}, got {len(queries)}")
    hits = 0
    for start in range(0, n, block):
        sims = queries[start : start + block] @ keys[start : start + block].T
        hits += (sims.argmax(1) == torch.arange(block)).sum().item()
    return hits / n


def linear_separability(a: torch.Tensor, b: torch.Tensor, *, seed: int = 0, steps: int = 30,
                        l2: float = 1e-3) -> float:
    """Held-out accuracy of a logistic regression telling rows of ``a`` from rows of ``b``.

    Fitted on a random half of the rows (Newton's method with a small L2 penalty, which keeps the
    weights finite when the classes are separable), scored on the other half. 1.0 means the two sets
    sit in separate regions of the space, as CLIP's images and texts do; 0.5 means they overlap.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([a, b]).double()
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)  # bias column
    y = torch.cat([torch.ones(len(a)), torch.zeros(len(b))]).double()
    perm = torch.randperm(len(x), generator=g)
    train, test = perm[: len(x) // 2], perm[len(x) // 2 :]
    xt, yt = x[train], y[train]
    w = torch.zeros(x.shape[1], dtype=x.dtype)
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    for _ in range(steps):
        p = torch.sigmoid(xt @ w)
        grad = xt.T @ (p - yt) / len(xt) + l2 * w
        hess = (xt.T * (p * (1 - p))) @ xt / len(xt) + l2 * eye
        step = torch.linalg.solve(hess, grad)
        w = w - step
        if step.abs().max() < 1e-8:
            break
    return ((x[test] @ w > 0) == y[test].bool()).double().mean().item()


def gap_stats(images: torch.Tensor, texts: torch.Tensor, *, block: int = 100, seed: int = 0) -> dict[str, float]:
    """Retrieval and modality-gap statistics of paired, L2-normalised ``(n, d)`` embeddings.

    - ``text_to_image_r1`` / ``image_to_text_r1``: R@1 among ``block`` (see :func:`recall_at_1`);
    - ``matched_cosine``: mean cos(image_i, text_i); ``unmatched_cosine``: mean over i != j;
    - ``centroid_distance``: ‖mean image − mean text‖₂;
    - ``linf_gap``: mean over pairs of ‖image_i − text_i‖∞ (CapDec's way to pick the noise ε);
    - ``separability``: held-out accuracy of a linear image-vs-text classifier.
    """
    images, texts = images.float(), texts.float()
    if images.shape != texts.shape:
        raise ValueError(f"paired embeddings differ in shape: {tuple(images.shape)} vs {tuple(texts.shape)}")
    n = len(images)
    sims = images @ texts.T
    matched = sims.diagonal()
    return {
        "pairs": n,
        "text_to_image_r1": recall_at_1(texts, images, block=block),
        "image_to_text_r1": recall_at_1(images, texts, block=block),
        "matched_cosine": matched.mean().item(),
        "unmatched_cosine": ((sims.sum() - matched.sum()) / (n * n - n)).item(),
        "centroid_distance": (images.mean(0) - texts.mean(0)).norm().item(),
        "linf_gap": (images - texts).abs().amax(1).mean().item(),
        "separability": linear_separability(images, texts, seed=seed),
    }


def hard_negative_stats(encode_image: Callable[[Sequence[Any]], torch.Tensor],
                        encode_text: Callable[[Sequence[str]], torch.Tensor], *, n: int = 300, seed: int = 0,
                        split: str = "test") -> dict[str, float]:
    """How well an encoder tells a scene from its near-duplicate, per kind of change.

    For ``n`` pairs (scene, the scene with one fact changed: see
    :func:`~capdec.lab.toyworld.world.perturb_scene`), both from ``split``, each captioned so that the
    caption states the changed fact: the fraction of the four choices (each caption between the two
    images, each image between the two captions) that pick the right one. 0.5 is chance;
    ``swap_colours`` measures colour-shape binding, which retrieval among random scenes hardly tests.
    """
    import random

    from capdec.lab.toyworld.grammar import DEFAULT_GRAMMAR, captions
    from capdec.lab.toyworld.render import render
    from capdec.lab.toyworld.world import PERTURBATIONS, iter_scenes, perturb_scene, split_of

    def dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x * y).sum(1)

    out = {}
    for kind, fact in PERTURBATIONS.items():
        rng = random.Random(f"capdec.toyworld/hard-negatives/{seed}/{kind}")
        grammar = DEFAULT_GRAMMAR.stating(fact)
        pairs = []
        for scene in iter_scenes(seed, split):
            partner = perturb_scene(scene, kind, rng)
            if partner is not None and split_of(partner) == split:
                pairs.append((scene, partner))
                if len(pairs) == n:
                    break
        a, b = (encode_image([render(p[k]) for p in pairs]) for k in (0, 1))
        ta, tb = (encode_text([captions(p[k], 1, rng=rng, grammar=grammar)[0] for p in pairs]) for k in (0, 1))
        right = [dot(ta, a) > dot(ta, b), dot(tb, b) > dot(tb, a), dot(a, ta) > dot(a, tb), dot(b, tb) > dot(b, ta)]
        out[kind] = torch.stack(right).float().mean().item()
    return out


def clip_stats(encode_image: Callable[[Sequence[Any]], torch.Tensor],
               encode_text: Callable[[Sequence[str]], torch.Tensor], *, n: int = 1000, seed: int = 0,
               split: str = "test", block: int = 100, hard_negatives: int = 0) -> dict[str, Any]:
    """Embed ``n`` fresh ``split`` scenes and one caption each; return :func:`gap_stats` plus the setup.

    With ``hard_negatives`` > 0, also :func:`hard_negative_stats` on that many pairs per kind.
    """
    from capdec.lab.toyworld.data import paired

    images, texts = paired(n, seed, split)
    stats = gap_stats(encode_image(images), encode_text(texts), block=block, seed=seed)
    stats = {**stats, "split": split, "seed": seed, "block": block}
    if hard_negatives:
        stats["hard_negative_accuracy"] = hard_negative_stats(encode_image, encode_text, n=hard_negatives,
                                                              seed=seed, split=split)
    return stats


def format_stats(stats: dict[str, Any]) -> str:
    """Human-readable summary lines."""
    return "\n".join([
        f"pairs: {stats['pairs']} ({stats.get('split', '?')} split, seed {stats.get('seed', '?')})",
        f"R@1 among {stats.get('block', 100)}: caption->image {stats['text_to_image_r1']:.3f}, "
        f"image->caption {stats['image_to_text_r1']:.3f}",
        f"cosine: matched {stats['matched_cosine']:.3f}, unmatched {stats['unmatched_cosine']:.3f}",
        f"modality gap: centroid distance {stats['centroid_distance']:.3f}, mean L-inf gap "
        f"{stats['linf_gap']:.4f}, linear separability {stats['separability']:.3f}",
        *([("near-duplicate accuracy (chance 0.5): " + ", ".join(
            f"{k} {v:.3f}" for k, v in stats["hard_negative_accuracy"].items()))]
          if stats.get("hard_negative_accuracy") else []),
    ])
