"""The toy world: procedurally rendered scenes, a caption grammar, and a mini-CLIP trained on them.

It is capdec's built-in benchmark: a world small enough to train everything on a laptop CPU, rich
enough that captions must get colours, shapes, sizes, counts and positions right.

>>> from capdec.lab import toyworld
>>> scene = toyworld.sample_scenes(1, seed=0, split="test")[0]
>>> image = toyworld.render(scene)            # 32x32 PIL image
>>> refs = toyworld.captions(scene, n=5)      # five true, differently worded captions
>>> texts = list(toyworld.corpus(1000))       # a text-only training corpus
>>> images, references = toyworld.test_set(100, seed=0)

The shipped mini-CLIP is encoder ``"toy"`` (``capdec.load_encoder("toy")``); the model code is in
:mod:`capdec.encoders.miniclip` (imported on demand: this package does not import torch).
"""

from __future__ import annotations

from capdec.lab.toyworld.data import corpus, paired, test_set
from capdec.lab.toyworld.grammar import (
    DEFAULT_GRAMMAR,
    STYLES,
    Grammar,
    Lexicon,
    captions,
    get_grammar,
    list_grammars,
    register_grammar,
    tokenize_words,
)
from capdec.lab.toyworld.render import contact_sheet, render, render_array
from capdec.lab.toyworld.world import (
    BACKGROUNDS,
    COLOURS,
    DEFAULT_WORLD,
    PERTURBATIONS,
    SHAPES,
    SIZES,
    SPLITS,
    WORLDS,
    Scene,
    ToyObject,
    WorldConfig,
    get_world,
    iter_scenes,
    perturb_scene,
    sample_scenes,
    split_of,
)

__all__ = [
    "BACKGROUNDS", "COLOURS", "DEFAULT_GRAMMAR", "DEFAULT_WORLD", "PERTURBATIONS", "SHAPES", "SIZES", "SPLITS", "STYLES", "WORLDS", "Grammar", "Lexicon",
    "Scene", "ToyObject", "WorldConfig", "captions", "contact_sheet", "corpus", "get_grammar", "get_world", "iter_scenes",
    "list_grammars", "paired", "perturb_scene", "register_grammar", "render", "render_array", "sample_scenes", "split_of",
    "test_set", "tokenize_words",
]
