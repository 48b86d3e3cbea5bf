"""Ready-made data sets of the toy world: caption corpora (text only) and images with references.

These are what a CapDec experiment needs: :func:`corpus` is the text-only training corpus,
:func:`test_set` the images to caption with their reference captions (≥ 5 per image, as in COCO),
and :func:`paired` images with one caption each (for a supervised baseline, or for calibrating ε).
All are deterministic in their arguments, and scenes of different splits never coincide.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator

from PIL import Image

from capdec.errors import InputError
from capdec.lab.toyworld.grammar import Grammar, captions, get_grammar
from capdec.lab.toyworld.render import render
from capdec.lab.toyworld.world import DEFAULT_WORLD, WorldConfig, iter_scenes, sample_scenes

logger = logging.getLogger(__name__)


def corpus(n: int, seed: int = 0, split: str = "train", *, captions_per_scene: int = 1,
           grammar: str | Grammar = "default", world: WorldConfig = DEFAULT_WORLD) -> Iterator[str]:
    """Yield ``n`` captions of ``split`` scenes, ``captions_per_scene`` distinct ones per scene, no images.

    Captions come from one seeded stream, so a scene that recurs (small scenes do) gets fresh wording.
    """
    if captions_per_scene < 1:
        raise InputError(f"captions_per_scene must be >= 1, got {captions_per_scene}")
    g = get_grammar(grammar)
    rng = random.Random(f"capdec.toyworld/corpus/{seed}/{split}/{g.name}")
    left = n
    for scene in iter_scenes(seed, split, world):
        if left <= 0:
            return
        texts = captions(scene, captions_per_scene, rng=rng, grammar=g)[:left]
        yield from texts
        left -= len(texts)


def test_set(n: int, seed: int = 0, *, split: str = "test", size: int = 32, n_refs: int = 5,
             grammar: str | Grammar = "default", world: WorldConfig = DEFAULT_WORLD,
             ) -> tuple[list[Image.Image], list[list[str]]]:
    """``n`` rendered ``split`` scenes and ``n_refs`` distinct reference captions for each.

    The scenes are ``sample_scenes(n, seed, split, world)``; the references of a scene depend only on
    the scene, ``seed`` and the grammar.
    """
    scenes = sample_scenes(n, seed, split, world)
    images = [render(s, size) for s in scenes]
    refs = [captions(s, n_refs, seed=seed, grammar=grammar) for s in scenes]
    return images, refs


def paired(n: int, seed: int = 0, split: str = "train", *, size: int = 32, grammar: str | Grammar = "default",
           world: WorldConfig = DEFAULT_WORLD) -> tuple[list[Image.Image], list[str]]:
    """``n`` rendered ``split`` scenes with one caption each (image-caption pairs)."""
    images, refs = test_set(n, seed, split=split, size=size, n_refs=1, grammar=grammar, world=world)
    return images, [r[0] for r in refs]
