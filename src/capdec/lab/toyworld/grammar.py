"""Caption grammar of the toy world: several true, differently worded descriptions per scene.

A caption is built in two layers, so that other styles and domains are configuration, not code:

- a :class:`Lexicon` says *which words* name things (synonyms for each shape, colour, size,
  position, relation, count, plus the glue words the sentence builders use);
- a :class:`Grammar` says *how sentences are built*: a weighted choice among sentence families
  (plain list, objects with positions, a spatial relation, a count-first sentence, background-first),
  how often optional facts (size, position, background) are mentioned, and optional openers and
  closers (where a styled variant, e.g. romantic or humorous, puts its own phrases).

Every caption is true of its scene: it names every object's colour and shape (grouped into counts
when objects share both: "two red circles"), and any size, position, relation or background it
adds is the scene's. Named grammars live in a registry (:func:`get_grammar`, :func:`list_grammars`);
``"default"`` gives COCO-like captions, ``"terse"`` and ``"descriptive"`` are two cheap domains.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from capdec.encoders.miniclip_config import tokenize_words  # noqa: F401  (re-exported)
from capdec.errors import InputError
from capdec.lab.toyworld.world import Scene, ToyObject

logger = logging.getLogger(__name__)


def _frozen(d: dict) -> Mapping:
    return MappingProxyType(d)


@dataclass(frozen=True)
class Lexicon:
    """The words of a grammar. Every value is a tuple of interchangeable phrasings."""

    # shape -> ((singular, plural), ...)
    shapes: Mapping[str, tuple[tuple[str, str], ...]] = field(default_factory=lambda: _frozen({
        "circle": (("circle", "circles"), ("disc", "discs"), ("dot", "dots")),
        "square": (("square", "squares"), ("box", "boxes")),
        "triangle": (("triangle", "triangles"),),
        "diamond": (("diamond", "diamonds"), ("rhombus", "rhombuses")),
        "cross": (("cross", "crosses"), ("plus sign", "plus signs")),
    }))
    colours: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: _frozen({
        "red": ("red",), "orange": ("orange",), "yellow": ("yellow",), "green": ("green",),
        "blue": ("blue",), "purple": ("purple", "violet"), "pink": ("pink",),
    }))
    backgrounds: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: _frozen({
        "white": ("white",), "gray": ("gray", "grey"), "black": ("black", "dark"),
    }))
    sizes: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: _frozen({
        "small": ("small", "little", "tiny"), "large": ("large", "big"),
    }))
    numbers: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    # how a region of the picture is named: (vertical, horizontal) with vertical in top/middle/bottom
    # and horizontal in left/center/right
    positions: Mapping[tuple[str, str], tuple[str, ...]] = field(default_factory=lambda: _frozen({
        ("top", "left"): ("in the top left corner", "in the upper left corner", "at the top left"),
        ("top", "center"): ("at the top", "at the top center", "near the top"),
        ("top", "right"): ("in the top right corner", "in the upper right corner", "at the top right"),
        ("middle", "left"): ("on the left", "on the left side", "at the left"),
        ("middle", "center"): ("in the center", "in the middle", "in the centre"),
        ("middle", "right"): ("on the right", "on the right side", "at the right"),
        ("bottom", "left"): ("in the bottom left corner", "in the lower left corner", "at the bottom left"),
        ("bottom", "center"): ("at the bottom", "at the bottom center", "near the bottom"),
        ("bottom", "right"): ("in the bottom right corner", "in the lower right corner", "at the bottom right"),
    }))
    # A REL B
    relations: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: _frozen({
        "left": ("to the left of", "left of"),
        "right": ("to the right of", "right of"),
        "above": ("above", "over"),
        "below": ("below", "under", "beneath"),
        "adjacent": ("next to", "beside"),
    }))
    # two objects of one kind side by side / one above the other
    pair_relations: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: _frozen({
        "horizontal": ("side by side", "next to each other"),
        "vertical": ("one above the other", "stacked vertically"),
    }))
    intros: tuple[str, ...] = ("", "", "", "a picture of", "an image of", "an image showing", "a drawing of",
                               "there is", "we can see", "this picture shows")
    totals: tuple[str, ...] = ("shapes", "objects", "figures")
    background_phrases: tuple[str, ...] = ("on a {} background", "against a {} background")
    background_leads: tuple[str, ...] = ("a {} background with", "a {} picture with", "on a {} background,")
    # glue words the sentence builders use besides the phrases above (for the vocabulary)
    function_words: tuple[str, ...] = ("a", "an", "and", "there", "is", "are", "in", "total", "pair", "of",
                                       "single", "with", "the", "picture")

    def words(self) -> set[str]:
        """Every word this lexicon can put into a caption."""
        phrases: list[str] = [*self.numbers, *self.intros, *self.totals, *self.function_words]
        phrases += [p.replace("{}", "") for p in (*self.background_phrases, *self.background_leads)]
        for table in (self.colours, self.backgrounds, self.sizes, self.positions, self.relations,
                      self.pair_relations):
            for options in table.values():
                phrases += options
        for options in self.shapes.values():
            for singular, plural in options:
                phrases += [singular, plural]
        return {w for p in phrases for w in tokenize_words(p)}


def region(obj: ToyObject, grid: int) -> tuple[str, str]:
    """(vertical, horizontal) name of the region an object's cell lies in."""
    def third(i: int, names: tuple[str, str, str]) -> str:
        return names[min(2, i * 3 // grid)]
    return third(obj.cell[0], ("top", "middle", "bottom")), third(obj.cell[1], ("left", "center", "right"))


# -- grouping objects into noun phrases ------------------------------------------------------------
@dataclass(frozen=True)
class Group:
    """Objects sharing colour and shape: described together ("two red circles")."""

    colour: str
    shape: str
    objects: tuple[ToyObject, ...]

    @property
    def count(self) -> int:
        return len(self.objects)


def groups(scene: Scene) -> list[Group]:
    by_kind: dict[tuple[str, str], list[ToyObject]] = {}
    for o in scene.objects:
        by_kind.setdefault((o.colour, o.shape), []).append(o)
    return [Group(c, s, tuple(objs)) for (c, s), objs in by_kind.items()]


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


# -- the grammar ----------------------------------------------------------------------------------
SentenceBuilder = Callable[["Grammar", Scene, random.Random], str]


@dataclass(frozen=True)
class Grammar:
    """How captions are built; see the module docstring. Make variants with :meth:`replace`."""

    name: str
    lexicon: Lexicon = field(default_factory=Lexicon)
    # sentence family -> weight (families that do not apply to a scene, e.g. a relation in a
    # one-object scene, are skipped)
    families: Mapping[str, float] = field(default_factory=lambda: _frozen(
        {"list": 3.0, "positions": 2.5, "relation": 2.5, "count": 1.0, "background": 1.0}))
    p_size: float = 0.4  # chance of naming an object's size
    p_position: float = 0.35  # in "list"-like families: chance of naming an object's position
    p_background: float = 0.3  # chance of naming the background (outside the "background" family)
    p_intro: float = 1.0  # chance of drawing an intro from the lexicon (intros include "")
    use_articles: bool = True  # False: "red circle, blue square" (terse)
    use_synonyms: bool = True  # False: always the first phrasing of each word
    openers: tuple[str, ...] = ()  # a styled grammar's lead-in phrases ("what a lovely sight:")
    closers: tuple[str, ...] = ()  # ... and closing phrases ("all in perfect harmony")
    p_styled: float = 0.0  # chance of adding an opener and/or closer
    p_both: float = 0.0  # given a styled caption with both kinds available: chance of opener *and* closer

    def replace(self, **changes) -> Grammar:
        return replace(self, **changes)

    def stating(self, fact: str) -> Grammar:
        """A variant whose captions always state ``fact`` of every object that is the only one of its kind.

        ``fact`` is ``"size"`` or ``"position"``; colours, shapes and their binding are stated by every
        caption already, so for those (``"colour"``, ``"shape"``, ``"binding"``) this grammar is returned.
        """
        if fact == "size":
            return self.replace(name=f"{self.name}+size", p_size=1.0)
        if fact == "position":
            return self.replace(name=f"{self.name}+position", families=_frozen({"positions": 1.0}))
        if fact in ("colour", "shape", "binding"):
            return self
        raise InputError(f"unknown fact {fact!r}; use size, position, colour, shape or binding")

    def vocabulary(self) -> list[str]:
        """Sorted list of every word this grammar can produce."""
        words = self.lexicon.words()
        for phrase in (*self.openers, *self.closers):
            words.update(tokenize_words(phrase))
        return sorted(words)

    # -- small choices --------------------------------------------------------------------------
    def pick(self, options: tuple[str, ...], rng: random.Random) -> str:
        return rng.choice(options) if self.use_synonyms else options[0]

    def shape_word(self, shape: str, plural: bool, rng: random.Random) -> str:
        forms = rng.choice(self.lexicon.shapes[shape]) if self.use_synonyms else self.lexicon.shapes[shape][0]
        return forms[1] if plural else forms[0]

    def position(self, obj: ToyObject, grid: int, rng: random.Random) -> str:
        return self.pick(self.lexicon.positions[region(obj, grid)], rng)

    def background(self, scene: Scene, rng: random.Random) -> str:
        word = self.pick(self.lexicon.backgrounds[scene.background], rng)
        return self.pick(self.lexicon.background_phrases, rng).format(word)

    def noun_phrase(self, group: Group, rng: random.Random, *, size: bool | None = None,
                    article: bool = True) -> str:
        """"a big red circle", "two red circles", "a big and a small red circle"."""
        if size is None:
            size = rng.random() < self.p_size
        colour = self.pick(self.lexicon.colours[group.colour], rng)
        sizes = {o.size for o in group.objects}
        words: list[str] = []
        if group.count == 1:
            if size:
                words.append(self.pick(self.lexicon.sizes[group.objects[0].size], rng))
            words += [colour, self.shape_word(group.shape, False, rng)]
            if article and self.use_articles:
                det = rng.choices(["a", "one", "a single"], weights=[18, 1, 1])[0]
                words.insert(0, _article(words[0]) if det == "a" else det)
            return " ".join(words)
        if size and group.count == 2 and len(sizes) == 2 and self.use_articles:
            a, b = (self.pick(self.lexicon.sizes[s], rng) for s in rng.sample(sorted(sizes), 2))
            return f"{_article(a)} {a} and {_article(b)} {b} {colour} {self.shape_word(group.shape, False, rng)}"
        count = self.lexicon.numbers[group.count]
        if group.count == 2 and self.use_articles and rng.random() < 0.2:
            count = "a pair of"
        if size and len(sizes) == 1:
            words.append(self.pick(self.lexicon.sizes[next(iter(sizes))], rng))
        return " ".join([count, *words, colour, self.shape_word(group.shape, True, rng)])

    def join(self, parts: list[str], rng: random.Random) -> str:
        if len(parts) == 1:
            return parts[0]
        if not self.use_articles:
            return ", ".join(parts)
        return ", ".join(parts[:-1]) + " and " + parts[-1]

    def with_position(self, group: Group, scene: Scene, rng: random.Random, p: float) -> str:
        np_ = self.noun_phrase(group, rng)
        if group.count == 1 and rng.random() < p:
            np_ += " " + self.position(group.objects[0], scene.grid, rng)
        return np_

    # -- whole captions -------------------------------------------------------------------------
    def caption(self, scene: Scene, rng: random.Random) -> str:
        """One caption of ``scene``."""
        usable = {f: w for f, w in self.families.items() if w > 0 and FAMILIES[f].applies(scene)}
        if not usable:
            raise InputError(f"grammar {self.name!r} has no sentence family for a scene with "
                             f"{len(scene.objects)} object(s)")
        family = rng.choices(list(usable), weights=list(usable.values()))[0]
        text = FAMILIES[family].build(self, scene, rng)
        if self.p_styled and rng.random() < self.p_styled:
            if self.openers and self.closers and rng.random() < self.p_both:
                text = f"{rng.choice(self.openers)} {text} {rng.choice(self.closers)}"
            elif self.openers and (not self.closers or rng.random() < 0.5):
                text = f"{rng.choice(self.openers)} {text}"
            else:
                text = f"{text} {rng.choice(self.closers)}"
        return " ".join(text.split())


# -- sentence families ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    build: SentenceBuilder
    applies: Callable[[Scene], bool] = lambda scene: True


def _list(g: Grammar, scene: Scene, rng: random.Random) -> str:
    gs = groups(scene)
    rng.shuffle(gs)
    body = g.join([g.with_position(x, scene, rng, g.p_position) for x in gs], rng)
    intro = g.pick(g.lexicon.intros, rng) if rng.random() < g.p_intro else ""
    if intro == "there is" and body.split()[0] in g.lexicon.numbers[2:]:
        intro = "there are"  # "there are two red circles", but "there is a pair of ..."
    text = f"{intro} {body}"
    if rng.random() < g.p_background:
        text += " " + g.background(scene, rng)
    return text


def _positions(g: Grammar, scene: Scene, rng: random.Random) -> str:
    """Each single object with its place: "a red circle in the center and a blue box at the top"."""
    gs = groups(scene)
    if rng.random() < 0.5:
        rng.shuffle(gs)  # else reading order (top left first)
    parts = [g.with_position(x, scene, rng, 1.0) for x in gs]
    text = g.join(parts, rng)
    if rng.random() < g.p_background:
        text += " " + g.background(scene, rng)
    return text


def _relation_between(a: ToyObject, b: ToyObject) -> list[str]:
    """Lexicon relation keys true of "a REL b"."""
    (ra, ca), (rb, cb) = a.cell, b.cell
    rels = []
    if ca < cb:
        rels.append("left")
    if ca > cb:
        rels.append("right")
    if ra < rb:
        rels.append("above")
    if ra > rb:
        rels.append("below")
    if abs(ra - rb) + abs(ca - cb) == 1:
        rels.append("adjacent")
    return rels


def _relation(g: Grammar, scene: Scene, rng: random.Random) -> str:
    """"a red circle to the left of a blue square, and a green cross at the top"."""
    gs = groups(scene)
    singles = [x for x in gs if x.count == 1]
    pairs = [x for x in gs if _pair_kind(x)]
    if pairs and (len(singles) < 2 or rng.random() < 0.5):  # "two red circles side by side"
        pair = rng.choice(pairs)
        head = f"{g.noun_phrase(pair, rng)} {g.pick(g.lexicon.pair_relations[_pair_kind(pair)], rng)}"
        rest = [g.with_position(x, scene, rng, g.p_position) for x in gs if x is not pair]
        rng.shuffle(rest)
        text = g.join([head, *rest], rng)
        if rng.random() < g.p_background:
            text += " " + g.background(scene, rng)
        return text
    a, b = rng.sample(singles, 2)
    rel = rng.choice(_relation_between(a.objects[0], b.objects[0]))
    head = f"{g.noun_phrase(a, rng)} {g.pick(g.lexicon.relations[rel], rng)} {g.noun_phrase(b, rng)}"
    rest = [g.with_position(x, scene, rng, g.p_position) for x in gs if x is not a and x is not b]
    rng.shuffle(rest)
    text = f"{head}, and {g.join(rest, rng)}" if rest and g.use_articles else ", ".join([head, *rest])
    if rng.random() < g.p_background:
        text += " " + g.background(scene, rng)
    return text


def _pair_kind(group: Group) -> str:
    """"horizontal"/"vertical" for two objects of one kind in one row/column, else ""."""
    if group.count != 2:
        return ""
    (ra, ca), (rb, cb) = group.objects[0].cell, group.objects[1].cell
    return "horizontal" if ra == rb else "vertical" if ca == cb else ""


def _relation_applies(scene: Scene) -> bool:
    gs = groups(scene)
    return sum(1 for x in gs if x.count == 1) >= 2 or any(_pair_kind(x) for x in gs)


def _count(g: Grammar, scene: Scene, rng: random.Random) -> str:
    """"three shapes: two red circles and a blue square"."""
    gs = groups(scene)
    rng.shuffle(gs)
    n = g.lexicon.numbers[len(scene.objects)]
    total = g.pick(g.lexicon.totals, rng)
    body = g.join([g.with_position(x, scene, rng, g.p_position) for x in gs], rng)
    lead = rng.choice([f"{n} {total}", f"there are {n} {total}"]) if g.use_articles else f"{n} {total}"
    text = f"{lead}, {body}" if rng.random() < 0.5 else f"{body}, {n} {total} in total"
    if rng.random() < g.p_background:
        text += " " + g.background(scene, rng)
    return text


def _background(g: Grammar, scene: Scene, rng: random.Random) -> str:
    """"a black background with a red circle and two blue squares"."""
    gs = groups(scene)
    rng.shuffle(gs)
    word = g.pick(g.lexicon.backgrounds[scene.background], rng)
    lead = g.pick(g.lexicon.background_leads, rng).format(word)
    body = g.join([g.with_position(x, scene, rng, g.p_position) for x in gs], rng)
    return f"{lead} {body}"


FAMILIES: dict[str, Family] = {
    "list": Family(_list),
    "positions": Family(_positions),
    "relation": Family(_relation, _relation_applies),
    "count": Family(_count, lambda scene: len(scene.objects) >= 2),
    "background": Family(_background),
}


# -- registry -------------------------------------------------------------------------------------
DEFAULT_GRAMMAR = Grammar("default")

_GRAMMARS: dict[str, Grammar] = {
    "default": DEFAULT_GRAMMAR,
    # short, fixed-word captions: "red circle, blue square"
    "terse": Grammar("terse", families=_frozen({"list": 1.0}), p_size=0.0, p_position=0.0, p_background=0.0,
                     p_intro=0.0, use_articles=False, use_synonyms=False),
    # long captions that state every fact
    "descriptive": Grammar("descriptive", families=_frozen({"positions": 2.0, "relation": 1.0, "count": 1.0}),
                           p_size=1.0, p_position=1.0, p_background=1.0),
}


# -- styles: the facts of "default", said romantically or humorously (FlickrStyle10K's two styles) --
# Styled phrases wrap the caption (openers, closers) and replace the relation words by styled ones
# that keep the relation ("watching over" is still above). A styled caption is as true as a factual one.
def _styled(name: str, *, relations: dict[str, tuple[str, ...]], pairs: dict[str, tuple[str, ...]],
            openers: tuple[str, ...], closers: tuple[str, ...]) -> Grammar:
    """The default grammar with styled relation phrases; every caption gets an opener and/or a closer."""
    lexicon = replace(Lexicon(), relations=_frozen(relations), pair_relations=_frozen(pairs))
    return Grammar(name, lexicon=lexicon, openers=openers, closers=closers, p_styled=1.0, p_both=0.3)


_GRAMMARS["romantic"] = _styled(
    "romantic",
    relations={"left": ("waiting to the left of", "dreaming to the left of"),
               "right": ("longing to the right of", "waiting to the right of"),
               "above": ("watching tenderly over", "gazing down above"),
               "below": ("resting softly below", "sighing beneath"),
               "adjacent": ("cuddling up next to", "holding close beside")},
    pairs={"horizontal": ("side by side like lovers", "holding hands side by side"),
           "vertical": ("one dreaming above the other", "stacked in a tender embrace")},
    openers=("in a dreamy moment,", "lovingly,", "under a soft glow,", "like a love letter,",
             "in a tender scene,", "with all my heart,"),
    closers=("in perfect harmony", "waiting for true love", "dreaming of each other", "sharing a tender moment",
             "together forever", "longing for a sweet embrace", "as the evening falls gently"))

_GRAMMARS["humorous"] = _styled(
    "humorous",
    relations={"left": ("sneaking to the left of", "hiding to the left of"),
               "right": ("showing off to the right of", "sulking to the right of"),
               "above": ("bossing around from above", "floating smugly over"),
               "below": ("grumbling below", "stuck under"),
               "adjacent": ("awkwardly standing next to", "photobombing beside")},
    pairs={"horizontal": ("side by side like two nerds", "racing side by side"),
           "vertical": ("doing a balancing act one above the other", "piled up like pancakes")},
    openers=("believe it or not,", "breaking news:", "plot twist:", "in a hilarious turn of events,",
             "nobody asked, but", "guess what,"),
    closers=("looking rather confused", "pretending to be a pizza", "probably up to no good",
             "having a silly dance party", "trying very hard to look cool", "arguing about who is bigger",
             "waiting for the punchline"))

STYLES: tuple[str, ...] = ("romantic", "humorous")


# -- domains: Flickr30k-like captions beside the COCO-like "default" --------------------------------
# Longer sentences that state places and sizes, another intro habit, and other preferred words for the
# same things (only words of the default lexicon, which the mini-CLIP knows).
_GRAMMARS["flickr"] = Grammar(
    "flickr",
    lexicon=replace(
        Lexicon(),
        shapes=_frozen({"circle": (("disc", "discs"), ("dot", "dots")), "square": (("box", "boxes"),),
                        "triangle": (("triangle", "triangles"),), "diamond": (("rhombus", "rhombuses"),),
                        "cross": (("plus sign", "plus signs"),)}),
        colours=_frozen({"red": ("red",), "orange": ("orange",), "yellow": ("yellow",), "green": ("green",),
                         "blue": ("blue",), "purple": ("violet",), "pink": ("pink",)}),
        backgrounds=_frozen({"white": ("white",), "gray": ("grey",), "black": ("dark",)}),
        sizes=_frozen({"small": ("little", "tiny"), "large": ("big",)}),
        intros=("we can see", "there is", "this picture shows", ""),
    ),
    families=_frozen({"positions": 2.0, "relation": 2.0, "count": 1.0, "background": 1.0}),
    p_size=0.8, p_position=0.8, p_background=0.6)


def register_grammar(grammar: Grammar, *, overwrite: bool = False) -> None:
    """Make ``grammar`` available by name (``get_grammar(grammar.name)``)."""
    if grammar.name in _GRAMMARS and not overwrite:
        raise InputError(f"a grammar named {grammar.name!r} is already registered")
    _GRAMMARS[grammar.name] = grammar


def list_grammars() -> list[str]:
    return sorted(_GRAMMARS)


def get_grammar(grammar: str | Grammar) -> Grammar:
    if isinstance(grammar, Grammar):
        return grammar
    if grammar not in _GRAMMARS:
        raise InputError(f"unknown caption grammar {grammar!r}; known: {', '.join(list_grammars())}")
    return _GRAMMARS[grammar]


def captions(scene: Scene, n: int = 5, *, seed: int | None = None, rng: random.Random | None = None,
             grammar: str | Grammar = "default") -> list[str]:
    """``n`` distinct captions of ``scene`` (fewer only if the grammar cannot say it ``n`` ways).

    Deterministic: with ``seed`` (default 0) the captions depend only on the scene, the seed and the
    grammar, not on which other scenes were captioned before; pass ``rng`` to draw from a stream.
    """
    g = get_grammar(grammar)
    if rng is None:
        rng = random.Random(f"capdec.toyworld/captions/{0 if seed is None else seed}/{scene.key}")
    out: list[str] = []
    for _ in range(20 * n):
        text = g.caption(scene, rng)
        if text not in out:
            out.append(text)
            if len(out) == n:
                break
    if len(out) < n:
        logger.debug("grammar %s gave only %d distinct captions for %s", g.name, len(out), scene.canonical())
    return out
