"""The shapes world's vocabulary, its captions, what each caption says, and the caption noise models.

Every caption is made together with its *content* (:class:`CaptionContent`): the objects it mentions, each
with the attributes it names (a shape always; colour and size when the caption says them), and an optional
spatial relation between the first two. The content decides which images a caption fits:
:func:`consistent_images` lists, for every caption, the images holding distinct objects that match every
mention (and the relation). Captions are existential: "a red star" fits every image with a red star in it.

Noise models (each corrupts a *training* caption; evaluation captions are always clean):

* ``caption``: another image's caption (:func:`generate` picks it).
* ``attribute``: one colour word replaced by a wrong colour (:func:`swap_colour`).
* ``partial``: an underspecified caption naming one object by its shape only (:func:`partial_caption`).
* ``hallucination``: the image's objects plus one object it does not hold (:func:`hallucinated_caption`).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np

__all__ = [
    "COLOURS",
    "SHAPES",
    "SIZES",
    "CaptionContent",
    "Mention",
    "ShapesObject",
    "caption_for",
    "caption_with_content",
    "consistent_images",
    "fits",
    "hallucinated_caption",
    "partial_caption",
    "relation",
    "sharing_matrix",
    "swap_colour",
    "target_lift",
]

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "hexagon")
COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
SIZES = ("small", "large")

_SHAPE_WORDS = {
    "circle": ("circle", "disc", "round shape"), "square": ("square", "square block"),
    "triangle": ("triangle",), "diamond": ("diamond", "rhombus"), "star": ("star", "five-pointed star"),
    "cross": ("cross", "plus sign"), "ring": ("ring", "hoop"), "hexagon": ("hexagon",),
}
_COLOUR_WORDS = {
    "red": ("red", "crimson"), "orange": ("orange",), "yellow": ("yellow", "golden"),
    "green": ("green",), "cyan": ("cyan", "turquoise"), "blue": ("blue",),
    "purple": ("purple", "violet"), "pink": ("pink",),
}
_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
_TEMPLATES = (
    "{}.", "a photo of {}.", "an image showing {}.", "a picture with {}.", "there is {} in the picture.",
    "{} on a textured background.", "a drawing of {}.", "look at {}!", "a simple scene with {}.",
)
_RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
_RELATION_KEYS = tuple(_RELATIONS)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ShapesObject:
    """One annotated object: ``box`` is ``(x1, y1, x2, y2)`` in pixels."""

    shape: str
    colour: str
    size: str
    box: tuple[float, float, float, float]

    def to_json(self) -> dict:
        return {"box": list(self.box), "shape": self.shape, "colour": self.colour, "size": self.size}


@dataclasses.dataclass(frozen=True, slots=True)
class Mention:
    """One object a caption names: its shape, and its colour and size when the caption says them."""

    shape: str
    colour: str | None = None
    size: str | None = None

    def matches(self, obj: ShapesObject) -> bool:
        return (obj.shape == self.shape and self.colour in (None, obj.colour)
                and self.size in (None, obj.size))


@dataclasses.dataclass(frozen=True, slots=True)
class CaptionContent:
    """What a caption claims: distinct objects matching ``mentions``; with ``relation`` (a key of
    ``left/right/above/below``), ``mentions[0]`` stands in that relation to ``mentions[1]``."""

    mentions: tuple[Mention, ...]
    relation: str | None = None

    def to_json(self) -> dict:
        return {"mentions": [[m.shape, m.colour, m.size] for m in self.mentions], "relation": self.relation}

    @classmethod
    def from_json(cls, data: dict) -> CaptionContent:
        return cls(tuple(Mention(*m) for m in data["mentions"]), data["relation"])


def relation(a: ShapesObject, b: ShapesObject) -> str:
    """Where ``a`` is relative to ``b``: ``left``/``right`` when the centres differ more horizontally
    (ties count as horizontal), else ``above``/``below`` (image y grows downwards)."""
    dx = (a.box[0] + a.box[2] - b.box[0] - b.box[2]) / 2
    dy = (a.box[1] + a.box[3] - b.box[1] - b.box[3]) / 2
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def fits(content: CaptionContent, objects: Sequence[ShapesObject]) -> bool:
    """Whether an image holding ``objects`` fits the caption: one distinct object per mention, matching
    it, in the stated relation. (The direct definition; :func:`consistent_images` is the fast one.)"""
    for chosen in itertools.permutations(objects, len(content.mentions)):
        if all(m.matches(o) for m, o in zip(content.mentions, chosen)) and (
                content.relation is None or relation(chosen[0], chosen[1]) == content.relation):
            return True
    return False


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _describe(rng: np.random.Generator, obj: ShapesObject) -> tuple[str, Mention]:
    """A noun phrase for one object with a random level of detail and random synonyms, and what it says."""
    shape = str(rng.choice(_SHAPE_WORDS[obj.shape]))
    colour = str(rng.choice(_COLOUR_WORDS[obj.colour]))
    size = str(rng.choice(_SIZE_WORDS[obj.size]))
    detail = rng.random()
    if detail < 0.45:
        return _article(f"{size} {colour} {shape}"), Mention(obj.shape, obj.colour, obj.size)
    if detail < 0.85:
        return _article(f"{colour} {shape}"), Mention(obj.shape, obj.colour)
    return _article(shape), Mention(obj.shape)


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def caption_with_content(rng: np.random.Generator, objects: list[ShapesObject]) -> tuple[str, CaptionContent]:
    """A natural caption (all objects, a subset of them, or a spatial relation between two) and its content."""
    order = [objects[i] for i in rng.permutation(len(objects))]
    choice = rng.random()
    if len(order) >= 2 and choice < 0.2:
        a, b = order[0], order[1]
        (phrase_a, mention_a), key = _describe(rng, a), relation(a, b)
        phrase_b, mention_b = _describe(rng, b)
        return _sentence(f"{phrase_a} {_RELATIONS[key]} {phrase_b}."), CaptionContent((mention_a, mention_b), key)
    if len(order) >= 2 and choice < 0.4:
        order = order[: int(rng.integers(1, len(order)))]
    template = str(rng.choice(_TEMPLATES))
    described = [_describe(rng, o) for o in order]
    text = template.format(_join([phrase for phrase, _ in described]))
    return _sentence(text), CaptionContent(tuple(mention for _, mention in described))


def caption_for(rng: np.random.Generator, objects: list[ShapesObject]) -> str:
    """A natural caption of ``objects`` (see :func:`caption_with_content`)."""
    return caption_with_content(rng, objects)[0]


def swap_colour(rng: np.random.Generator, caption: str) -> str:
    """Replace one colour word of ``caption`` by a different colour (attribute noise); unchanged when the
    caption names no colour."""
    words = caption.split(" ")
    colour_of = {w: c for c, ws in _COLOUR_WORDS.items() for w in ws}
    spots = [i for i, w in enumerate(words) if w.strip(".,!").lower() in colour_of]
    if not spots:
        return caption
    i = int(rng.choice(spots))
    bare = words[i].strip(".,!")
    true_colour = colour_of[bare.lower()]
    wrong = str(rng.choice([c for c in COLOURS if c != true_colour]))
    words[i] = words[i].replace(bare, wrong)
    return " ".join(words)


def partial_caption(rng: np.random.Generator, objects: list[ShapesObject]) -> str:
    """An underspecified but true caption: one of the objects, by its shape only ("A photo of a star.")."""
    obj = objects[int(rng.integers(len(objects)))]
    return _sentence(str(rng.choice(_TEMPLATES)).format(_article(str(rng.choice(_SHAPE_WORDS[obj.shape])))))


def hallucinated_caption(rng: np.random.Generator, objects: list[ShapesObject]) -> str:
    """Every object of the image plus one colour+shape the image does not hold, in random order."""
    present = {(o.colour, o.shape) for o in objects}
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    colour, shape = absent[int(rng.integers(len(absent)))]
    phrases = [_describe(rng, o)[0] for o in objects]
    phrases.insert(int(rng.integers(len(phrases) + 1)),
                   _article(f"{rng.choice(_COLOUR_WORDS[colour])} {rng.choice(_SHAPE_WORDS[shape])}"))
    return _sentence(str(rng.choice(_TEMPLATES)).format(_join(phrases)))


def _object_table(images: Sequence[Sequence[ShapesObject]]) -> dict[str, np.ndarray]:
    """Attributes of every image's objects as ``[images, max objects]`` arrays (-1 = no object) and the
    relation of every ordered object pair as ``[images, max, max]`` indices into ``left/right/above/below``."""
    width = max((len(objs) for objs in images), default=0)
    table = {key: np.full((len(images), width), -1, dtype=np.int64) for key in ("shape", "colour", "size")}
    boxes = np.zeros((len(images), width, 4))
    for i, objs in enumerate(images):
        for j, o in enumerate(objs):
            table["shape"][i, j], table["colour"][i, j] = SHAPES.index(o.shape), COLOURS.index(o.colour)
            table["size"][i, j], boxes[i, j] = SIZES.index(o.size), o.box
    dx = (boxes[:, :, None, 0] + boxes[:, :, None, 2] - boxes[:, None, :, 0] - boxes[:, None, :, 2]) / 2
    dy = (boxes[:, :, None, 1] + boxes[:, :, None, 3] - boxes[:, None, :, 1] - boxes[:, None, :, 3]) / 2
    table["relation"] = np.where(np.abs(dx) >= np.abs(dy), np.where(dx < 0, 0, 1), np.where(dy < 0, 2, 3))
    return table


def _fitting_images(table: dict[str, np.ndarray], content: CaptionContent) -> np.ndarray:
    """Boolean ``[images]``: which images fit ``content`` (vectorised :func:`fits`)."""
    num_images, width = table["shape"].shape
    match = np.ones((num_images, len(content.mentions), width), dtype=bool)
    for k, m in enumerate(content.mentions):
        match[:, k] = table["shape"] == SHAPES.index(m.shape)
        if m.colour is not None:
            match[:, k] &= table["colour"] == COLOURS.index(m.colour)
        if m.size is not None:
            match[:, k] &= table["size"] == SIZES.index(m.size)
    found = np.zeros(num_images, dtype=bool)
    for chosen in itertools.permutations(range(width), len(content.mentions)):
        ok = np.all(match[:, np.arange(len(chosen)), list(chosen)], axis=1)
        if content.relation is not None:
            ok &= table["relation"][:, chosen[0], chosen[1]] == _RELATION_KEYS.index(content.relation)
        found |= ok
    return found


def consistent_images(contents: Sequence[CaptionContent], images: Sequence[Sequence[ShapesObject]]) -> list[list[int]]:
    """For every caption content, the sorted indices of the images that fit it (:func:`fits`)."""
    table = _object_table(images)
    memo: dict[CaptionContent, list[int]] = {}
    out = []
    for content in contents:
        if content not in memo:
            memo[content] = np.flatnonzero(_fitting_images(table, content)).tolist()
        out.append(memo[content])
    return out


def sharing_matrix(images: Sequence[Sequence[ShapesObject]]) -> np.ndarray:
    """``bool [N, N]``: whether images ``i`` and ``j`` truly share an object (the same colour and shape)."""
    kinds = [{(o.colour, o.shape) for o in objs} for objs in images]
    return np.array([[bool(a & b) for b in kinds] for a in kinds], dtype=bool).reshape(len(kinds), len(kinds))


def target_lift(negative_targets: np.ndarray, shared: np.ndarray) -> float:
    """How much of the negatives-only target mass falls on pairs that truly share an object, over its base
    rate: ``lift = mean_i sum_{j != i} ~Y_ij [shared_ij] / (sum_{i != j} [shared_ij] / (N (N - 1)))``.

    ``negative_targets`` ``[N, N]``: rows are distributions over the *other* samples (the positive removed and
    renormalised, ``~Y``; the diagonal is ignored). 1.0 = uninformative (uniform mass), higher = the targets
    point at the truly related images; NaN when no pair shares an object."""
    probs, shared = np.asarray(negative_targets, dtype=np.float64), np.asarray(shared, dtype=bool)
    n = probs.shape[0]
    off = shared & ~np.eye(n, dtype=bool)
    base = off.sum() / (n * (n - 1)) if n > 1 else 0.0
    if base == 0:
        return float("nan")
    return float((probs * off).sum(axis=1).mean() / base)
