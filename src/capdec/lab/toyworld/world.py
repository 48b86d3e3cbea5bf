"""Scenes of the toy world: what is where, independent of how it is drawn or described.

A :class:`Scene` is a background colour plus 1-3 coloured shapes, each in one cell of a 3x3 grid.
Everything is sampled from a seeded :class:`random.Random`, so ``sample_scenes(n, seed, split)`` is
the same list on every machine and Python version.

Splits are a property of the scene itself, not of the sampling: a scene's split is read from a hash
of its canonical description (:meth:`Scene.canonical`), so the same scene can never land in both
train and test, whatever seed, order or world configuration produced it.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace

from capdec.errors import InputError

logger = logging.getLogger(__name__)

# name -> RGB. Object colours and background colours are disjoint, so a colour word in a caption
# always names either an object or the background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 32, 32),
    "orange": (250, 140, 10),
    "yellow": (245, 215, 20),
    "green": (40, 170, 60),
    "blue": (35, 80, 230),
    "purple": (135, 45, 175),
    "pink": (250, 120, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (242, 242, 242),
    "gray": (128, 128, 128),
    "black": (18, 18, 18),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
SIZES: tuple[str, ...] = ("small", "large")

# Fraction of all possible scenes in each split, read off the scene hash (fixed: changing it would
# move scenes between splits and leak test scenes into training).
SPLITS: dict[str, tuple[float, float]] = {"test": (0.0, 0.10), "val": (0.10, 0.15), "train": (0.15, 1.0)}


@dataclass(frozen=True)
class ToyObject:
    """One shape in a scene."""

    shape: str  # one of SHAPES
    colour: str  # one of COLOURS
    size: str  # "small" or "large"
    cell: tuple[int, int]  # (row, col) in the grid; (0, 0) is the top left
    # sub-cell jitter in [-1, 1]² as a fraction of the free room around the shape; it changes the
    # pixels only, not what the scene *is* (it is left out of the canonical description)
    offset: tuple[float, float] = (0.0, 0.0)

    def describe(self) -> str:
        return f"{self.cell[0]},{self.cell[1]} {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A background and its objects, sorted by cell (reading order)."""

    objects: tuple[ToyObject, ...]
    background: str  # one of BACKGROUNDS
    grid: int = 3  # the grid is grid x grid cells

    def canonical(self) -> str:
        """The scene's identity as text: background and objects by cell, no rendering details."""
        objs = "; ".join(o.describe() for o in sorted(self.objects, key=lambda o: o.cell))
        return f"grid={self.grid} background={self.background}; {objs}"

    @property
    def key(self) -> str:
        """sha256 of :meth:`canonical` (hex): a stable scene id."""
        return hashlib.sha256(self.canonical().encode()).hexdigest()

    @property
    def split(self) -> str:
        return split_of(self)


def split_of(scene: Scene) -> str:
    """``"train"``, ``"val"`` or ``"test"``, decided by the hash of the scene's canonical description."""
    u = int(scene.key[:12], 16) / 16**12
    for name, (lo, hi) in SPLITS.items():
        if lo <= u < hi:
            return name
    raise AssertionError(u)  # the SPLITS intervals cover [0, 1)


@dataclass(frozen=True)
class WorldConfig:
    """What scenes look like: the vocabulary of things and how often they occur.

    Another *domain* (other shapes, busier scenes, one background) is another instance of this
    class; the caption grammar and the renderer take any of them.
    """

    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = tuple(COLOURS)
    sizes: tuple[str, ...] = SIZES
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)
    grid: int = 3  # grid x grid cells, at most one object per cell
    # relative frequency of 1, 2, 3, ... objects (index i -> i + 1 objects)
    count_weights: tuple[float, ...] = (1.0, 1.0, 1.0)
    # chance that an object repeats the colour and shape of an earlier one, so that captions need
    # counting ("two red circles"); with independent draws that would be rare (1 in 35)
    p_repeat: float = 0.3
    jitter: float = 0.8  # how far a shape may wander inside its cell (0 = centred)

    def __post_init__(self) -> None:
        unknown = ([c for c in self.colours if c not in COLOURS] + [b for b in self.backgrounds if b not in BACKGROUNDS]
                   + [s for s in self.shapes if s not in SHAPES] + [s for s in self.sizes if s not in SIZES])
        if unknown:
            raise InputError(f"WorldConfig: unknown shape/colour/size/background {unknown}; known: "
                             f"{SHAPES}, {tuple(COLOURS)}, {SIZES}, {tuple(BACKGROUNDS)}")
        if not 1 <= len(self.count_weights) <= self.grid**2 or sum(self.count_weights) <= 0:
            raise InputError(f"WorldConfig: count_weights needs 1..{self.grid ** 2} non-negative weights "
                             f"with a positive sum, got {self.count_weights}")

    @property
    def max_objects(self) -> int:
        return len(self.count_weights)


DEFAULT_WORLD = WorldConfig()

#: named worlds (scene distributions). "busy" is the Flickr30k-like domain's: busier scenes on grey or
#: dark backgrounds, more repeated objects.
WORLDS: dict[str, WorldConfig] = {
    "default": DEFAULT_WORLD,
    "busy": WorldConfig(backgrounds=("gray", "black"), count_weights=(0.25, 1.0, 1.5), p_repeat=0.4),
}


def get_world(world: str | WorldConfig) -> WorldConfig:
    if isinstance(world, WorldConfig):
        return world
    if world not in WORLDS:
        raise InputError(f"unknown world {world!r}; known: {', '.join(sorted(WORLDS))}")
    return WORLDS[world]


def random_scene(rng: random.Random, world: WorldConfig = DEFAULT_WORLD) -> Scene:
    """Draw one scene (objects in distinct cells)."""
    k = rng.choices(range(1, world.max_objects + 1), weights=world.count_weights)[0]
    cells = rng.sample([(r, c) for r in range(world.grid) for c in range(world.grid)], k)
    objects: list[ToyObject] = []
    for cell in cells:
        if objects and rng.random() < world.p_repeat:
            like = rng.choice(objects)
            shape, colour = like.shape, like.colour
        else:
            shape, colour = rng.choice(world.shapes), rng.choice(world.colours)
        offset = (rng.uniform(-world.jitter, world.jitter), rng.uniform(-world.jitter, world.jitter))
        objects.append(ToyObject(shape, colour, rng.choice(world.sizes), cell, offset))
    objects.sort(key=lambda o: o.cell)
    return Scene(tuple(objects), rng.choice(world.backgrounds), world.grid)


# -- near-duplicates ------------------------------------------------------------------------------
# perturbation -> the fact it changes
PERTURBATIONS: dict[str, str] = {"swap_colours": "binding", "recolour": "colour", "reshape": "shape",
                                 "resize": "size", "move": "position"}


def perturb_scene(scene: Scene, kind: str, rng: random.Random, world: WorldConfig = DEFAULT_WORLD) -> Scene | None:
    """A copy of ``scene`` that differs in one fact, or ``None`` if ``kind`` does not apply to it.

    - ``swap_colours``: two objects of different colour *and* shape trade colours (which colour
      goes with which shape: the "binding" a bag of colours and shapes cannot tell apart);
    - ``recolour`` / ``reshape``: one object gets another colour / shape;
    - ``resize`` / ``move``: one object that is the only one of its colour and shape changes size /
      moves to a free cell (so a caption naming its size / place tells the two scenes apart).

    The mini-CLIP trains on such pairs as hard negatives. The result may fall in another split than
    ``scene``: check :func:`split_of` before training on it.
    """
    objs = list(scene.objects)
    kinds = [(o.colour, o.shape) for o in objs]
    if kind == "swap_colours":
        pairs = [(i, j) for i in range(len(objs)) for j in range(i + 1, len(objs))
                 if objs[i].colour != objs[j].colour and objs[i].shape != objs[j].shape]
        if not pairs:
            return None
        i, j = rng.choice(pairs)
        objs[i], objs[j] = replace(objs[i], colour=objs[j].colour), replace(objs[j], colour=objs[i].colour)
    elif kind in ("recolour", "reshape"):
        i = rng.randrange(len(objs))
        if kind == "recolour":
            objs[i] = replace(objs[i], colour=rng.choice([c for c in world.colours if c != objs[i].colour]))
        else:
            objs[i] = replace(objs[i], shape=rng.choice([s for s in world.shapes if s != objs[i].shape]))
    elif kind in ("resize", "move"):
        single = [i for i, k in enumerate(kinds) if kinds.count(k) == 1]
        taken = {o.cell for o in objs}
        free = [(r, c) for r in range(scene.grid) for c in range(scene.grid) if (r, c) not in taken]
        if not single or (kind == "move" and not free):
            return None
        i = rng.choice(single)
        if kind == "resize":
            objs[i] = replace(objs[i], size=rng.choice([z for z in world.sizes if z != objs[i].size] or [objs[i].size]))
        else:
            objs[i] = replace(objs[i], cell=rng.choice(free))
    else:
        raise InputError(f"unknown perturbation {kind!r}; use one of {', '.join(PERTURBATIONS)}")
    out = Scene(tuple(sorted(objs, key=lambda o: o.cell)), scene.background, scene.grid)
    return None if out.canonical() == scene.canonical() else out


def sample_scenes(n: int, seed: int = 0, split: str | None = "train",
                  world: WorldConfig = DEFAULT_WORLD) -> list[Scene]:
    """``n`` scenes of one split (``"train"``, ``"val"``, ``"test"``, or ``None`` for any).

    Deterministic in ``(n, seed, split, world)``; the first ``m`` scenes of ``sample_scenes(n, ...)``
    are ``sample_scenes(m, ...)``. Scenes may repeat (there are only 1,890 one-object scenes).
    """
    if n < 0:
        raise InputError(f"number of scenes must be >= 0, got {n}")
    return list(itertools.islice(iter_scenes(seed, split, world), n))


def iter_scenes(seed: int = 0, split: str | None = "train", world: WorldConfig = DEFAULT_WORLD) -> Iterator[Scene]:
    """The endless stream that :func:`sample_scenes` takes its first ``n`` scenes from."""
    if split is not None and split not in SPLITS:
        raise InputError(f"unknown split {split!r}; use one of {', '.join(SPLITS)} (or None for any)")
    return _scene_stream(random.Random(f"capdec.toyworld/scenes/{seed}/{split}"), split, world)


def _scene_stream(rng: random.Random, split: str | None, world: WorldConfig) -> Iterator[Scene]:
    while True:
        scene = random_scene(rng, world)
        if split is None or split_of(scene) == split:
            yield scene
