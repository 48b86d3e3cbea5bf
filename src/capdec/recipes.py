"""Named training recipes: the reference settings of the CapDec paper, as ``capdec train --recipe NAME``.

A recipe is a partial set of config values, one dict per config it touches (``model``: ``ModelConfig``
fields, ``train``: ``TrainConfig``, ``noise``: ``NoiseConfig``). The training planner
(:func:`capdec.train.plan_training`) puts them under everything the user gives: flags on the command
line win, then ``--config`` file values (and a calibrated ``--noise-file``'s variance), then the recipe,
then capdec's defaults. A recipe never overrides what a checkpoint fixes (the architecture under
``--init-from``, the model, noise and data under ``--resume``), and its noise does not reach an image
store (ClipCap trains on the embeddings it will caption). From Python: ``train(..., recipe=NAME)``, or
one config at a time, ``TrainConfig.from_recipe(NAME, batch_size=8)``.

The values follow CapDec's released training code (DavidHuji/CapDec ``train.py``, itself ClipCap's):
GPT-2 fine-tuned with a transformer mapper of 8 layers, prefix 40 and clip length 40; AdamW at 2e-5 with
no weight decay and no gradient clipping, 5,000 warm-up steps then linear decay to 0; 10 epochs;
ε² = 0.016 on L2-normalised embeddings; a checkpoint kept for every epoch and the best one by
validation loss.

docs/reproduce.md gives the commands from the raw files to each row of the paper's tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from capdec.errors import InputError

_PAPER_MODEL = dict(mapper="transformer", mapper_variant="clipcap", prefix_length=40, clip_length=40,
                    mapper_depth=8, mapper_heads=8, lm="gpt2", freeze_lm=False)
_PAPER_TRAIN = dict(epochs=10, lr=2e-5, weight_decay=0.0, warmup_steps=5000, schedule="linear", grad_clip=0.0,
                    keep_epochs=True, keep_best=True)
_PAPER_NOISE = dict(variance=0.016)
SECTIONS = ("model", "train", "noise")  # the configs a recipe may set: ModelConfig, TrainConfig, NoiseConfig


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str  # one line for --help
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig field -> value
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig field -> value
    noise: dict[str, Any] = field(default_factory=dict)  # NoiseConfig field -> value
    needs_init_from: bool = False  # a fine-tuning recipe: starts from a trained checkpoint

    def section(self, name: str) -> dict[str, Any]:
        """The recipe's values for one config (``model``, ``train`` or ``noise``)."""
        if name not in SECTIONS:
            raise ValueError(f"a recipe has no {name!r} section; it has {', '.join(SECTIONS)}")
        return dict(getattr(self, name))


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("capdec-coco", "CapDec on COCO captions (Karpathy train + restval): batch 30",
           model=_PAPER_MODEL, train={**_PAPER_TRAIN, "batch_size": 30}, noise=_PAPER_NOISE),
    Recipe("capdec-flickr30k", "CapDec on Flickr30k captions (Karpathy train): batch 16",
           model=_PAPER_MODEL, train={**_PAPER_TRAIN, "batch_size": 16}, noise=_PAPER_NOISE),
    Recipe("capdec-style", "style fine-tuning: continue a trained CapDec checkpoint (--init-from) on a FlickrStyle10K "
           "styled corpus (romantic or humorous), batch 16",
           train={**{k: v for k, v in _PAPER_TRAIN.items() if k != "warmup_steps"}, "batch_size": 16},
           noise=_PAPER_NOISE, needs_init_from=True),
]}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise InputError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]


def describe_recipes() -> str:
    """One line per recipe, for --help."""
    return "\n".join(f"  {r.name}: {r.summary}" for r in RECIPES.values())
