"""The shapes world: scenes of coloured circles, squares and triangles with their captions.

Everything is deterministic from a seed, so a training batch, an evaluation prompt set or a test
scene can always be rebuilt exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ...errors import AttnscopeError

__all__ = [
    "BACKGROUND", "COLOURS", "IMAGE_SIZE", "KINDS", "RELATIONS", "SHAPES", "VOCABULARY",
    "Scene", "ShapeObject", "check_vocabulary", "parse_prompt", "relation_holds", "render", "sample_scene",
]

IMAGE_SIZE = 32
BACKGROUND = (232, 232, 226)
#: Clearly separated hues (0°, 48°, 135°, 222°) at high saturation on a light neutral background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "yellow": (235, 190, 25),
    "green": (40, 160, 70),
    "blue": (40, 85, 220),
}
SHAPES = ("circle", "square", "triangle")
#: Relation phrase -> (axis, sign): "A to the left of B" means A's centre has a smaller x than B's.
RELATIONS: dict[str, tuple[int, int]] = {
    "to the left of": (0, -1),
    "to the right of": (0, 1),
    "above": (1, -1),
    "below": (1, 1),
}
KINDS = ("single", "two", "relation", "three")
VOCABULARY: tuple[str, ...] = tuple(dict.fromkeys(
    ["a", "and"] + list(COLOURS) + list(SHAPES) + [w for phrase in RELATIONS for w in phrase.split()]
))
_MIN_SIZE, _MAX_SIZE = 9.0, 14.0  # object side (or diameter) in pixels at IMAGE_SIZE
_GAP = 2.0  # minimum free pixels between two objects' boxes
_SUPERSAMPLE = 4
_MIN_IMAGE = 16  # the smallest image side sample_scene draws (and the shapes model makes)


@dataclass(frozen=True)
class ShapeObject:
    """One object: its colour and shape names and its box ``(x0, y0, x1, y1)`` in pixels."""

    colour: str
    shape: str
    box: tuple[float, float, float, float]

    def __post_init__(self) -> None:
        # render draws only these: an unknown shape would come out a triangle, a flat box divide by zero
        if not isinstance(self.colour, str) or self.colour not in COLOURS:
            raise AttnscopeError(f"colour={self.colour!r}: expected one of {', '.join(COLOURS)}")
        if not isinstance(self.shape, str) or self.shape not in SHAPES:
            raise AttnscopeError(f"shape={self.shape!r}: expected one of {', '.join(SHAPES)}")
        box = self.box
        if (not isinstance(box, (tuple, list)) or len(box) != 4
                or not all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                           and np.isfinite(v) for v in box)
                or not (box[0] < box[2] and box[1] < box[3])):
            raise AttnscopeError(f"box={box!r}: expected (x0, y0, x1, y1), four finite numbers in pixels "
                                 f"with x0 < x1 and y0 < y1")

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2, (y0 + y1) / 2)

    @property
    def phrase(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """Objects on the background, the caption describing them, and the relation the caption states."""

    objects: tuple[ShapeObject, ...]
    caption: str
    relation: str | None = None
    size: int = IMAGE_SIZE

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, (int, np.integer)) or self.size < 1:
            raise AttnscopeError(f"size={self.size!r}: expected an int >= 1 (the image side in pixels)")
        if self.relation is not None and (not isinstance(self.relation, str) or self.relation not in RELATIONS):
            raise AttnscopeError(f"relation={self.relation!r}: expected None or one of {', '.join(RELATIONS)}")


def _boxes_apart(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[2] + _GAP <= b[0] or b[2] + _GAP <= a[0] or a[3] + _GAP <= b[1] or b[3] + _GAP <= a[1]


def _place(rng: np.random.Generator, n: int, size: int, relation: str | None) -> list[tuple[float, ...]] | None:
    scale = size / IMAGE_SIZE
    boxes: list[tuple[float, ...]] = []
    for _ in range(n):
        for _attempt in range(100):
            s = rng.uniform(_MIN_SIZE, _MAX_SIZE) * scale
            x0, y0 = rng.uniform(1, size - 1 - s, size=2)
            box = (x0, y0, x0 + s, y0 + s)
            if all(_boxes_apart(box, b) for b in boxes):
                boxes.append(box)
                break
        else:
            return None
    if relation is not None:
        axis, sign = RELATIONS[relation]
        a, b = boxes
        # The relation must be unambiguous: the boxes are apart along its axis.
        separated = a[2 + axis] + _GAP <= b[axis] if sign < 0 else b[2 + axis] + _GAP <= a[axis]
        if not separated:
            return None
    return boxes


def sample_scene(seed: int | np.random.Generator, kind: str | None = None, size: int = IMAGE_SIZE,
                 mixture: tuple[float, ...] = (0.3, 0.3, 0.25, 0.15)) -> Scene:
    """Draw a random scene of ``kind`` ("single", "two", "relation" or "three"; None draws the kind
    with the probabilities in ``mixture``, in that order), as an image of ``size`` × ``size`` pixels (at least 16).

    Examples
    --------
    >>> from attnscope.models.shapes import sample_scene
    >>> sample_scene(3, "two").caption == sample_scene(3, "two").caption
    True
    >>> len(sample_scene(0, "three").objects)
    3
    """
    if not isinstance(seed, np.random.Generator) and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
                                                      or seed < 0):
        raise AttnscopeError(f"seed={seed!r}: expected an int >= 0 or a numpy Generator")
    # the gap between objects does not scale with the image: below 16 px scenes may not fit (and drawing looped forever)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < _MIN_IMAGE:
        raise AttnscopeError(f"size={size!r}: expected an int >= {_MIN_IMAGE} (the image side in pixels)")
    if kind is None and (len(mixture) != len(KINDS) or any(not np.isfinite(p) or p < 0 for p in mixture)
                         or not np.isclose(sum(mixture), 1.0)):
        raise AttnscopeError(f"mixture={mixture!r}: expected {len(KINDS)} probabilities >= 0 summing to 1, "
                             f"one per kind ({', '.join(KINDS)})")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if kind is None:
        kind = str(rng.choice(KINDS, p=mixture))
    if kind not in KINDS:
        raise AttnscopeError(f"kind={kind!r}: expected one of {', '.join(KINDS)} or None")
    n = {"single": 1, "two": 2, "relation": 2, "three": 3}[kind]
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    chosen = [pairs[i] for i in rng.choice(len(pairs), size=n, replace=False)]
    relation = str(rng.choice(list(RELATIONS))) if kind == "relation" else None
    boxes = None
    while boxes is None:
        boxes = _place(rng, n, size, relation)
    objects = tuple(ShapeObject(c, s, tuple(float(v) for v in box)) for (c, s), box in zip(chosen, boxes))
    phrases = [f"a {o.phrase}" for o in objects]
    caption = f"{phrases[0]} {relation} {phrases[1]}" if relation else " and ".join(phrases)
    return Scene(objects, caption, relation, size)


def _coverage(obj: ShapeObject, size: int) -> np.ndarray:
    """Fraction of each pixel covered by the object, from a supersampled grid."""
    k = _SUPERSAMPLE
    coords = (np.arange(size * k) + 0.5) / k
    x, y = np.meshgrid(coords, coords)
    x0, y0, x1, y1 = obj.box
    cx, cy = obj.centre
    if obj.shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= ((x1 - x0) / 2) ** 2
    elif obj.shape == "square":
        inside = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
    else:  # upright triangle: apex at the top centre, base along the bottom edge
        inside = (y >= y0) & (y <= y1) & (np.abs(x - cx) <= (y - y0) / (y1 - y0) * (x1 - x0) / 2)
    return inside.reshape(size, k, size, k).mean(axis=(1, 3))


def render(scene: Scene) -> np.ndarray:
    """Render a scene as an ``(H, W, 3)`` uint8 array, anti-aliased.

    Examples
    --------
    >>> from attnscope.models.shapes import render, sample_scene
    >>> render(sample_scene(0, "single")).shape
    (32, 32, 3)
    """
    image = np.empty((scene.size, scene.size, 3), dtype=np.float32)
    image[:] = BACKGROUND
    for obj in scene.objects:
        alpha = _coverage(obj, scene.size)[..., None]
        image = image * (1 - alpha) + np.asarray(COLOURS[obj.colour], np.float32) * alpha
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


#: words as CLIP's tokenizer splits them: letter runs (accents included), single digits, other characters
_WORD = re.compile(r"[^\W\d_]+|\d|[^\w\s]|_")


def check_vocabulary(prompt: str, vocabulary: tuple[str, ...] = VOCABULARY, name: str = "prompt") -> None:
    """Raise if ``prompt`` has words the shapes model never saw (they would become untrained letter pieces);
    ``name`` names the argument in the message (``negative_prompt``).

    >>> from attnscope.models.shapes import check_vocabulary
    >>> check_vocabulary("a red circle")
    >>> check_vocabulary("a purple circle")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    attnscope.errors.AttnscopeError: prompt='a purple circle': words outside the shapes model's vocabulary: 'purple'; ...
    """
    if not isinstance(prompt, str):
        raise AttnscopeError(f"{name}={prompt!r}: expected a string (a shapes-world prompt such as 'a red circle')")
    unknown = [w for w in _WORD.findall(prompt.lower()) if w not in vocabulary]
    if unknown:
        raise AttnscopeError(
            f"{name}={prompt!r}: words outside the shapes model's vocabulary: "
            f"{', '.join(map(repr, dict.fromkeys(unknown)))}; the vocabulary is: {' '.join(vocabulary)}"
        )


_OBJECT = re.compile(rf"\ba ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b")


def parse_prompt(prompt: str) -> tuple[list[tuple[str, str]], str | None]:
    """The ``(colour, shape)`` objects a shapes-world prompt asks for, and its relation phrase.

    Examples
    --------
    >>> from attnscope.models.shapes import parse_prompt
    >>> parse_prompt("a red circle to the left of a blue square")
    ([('red', 'circle'), ('blue', 'square')], 'to the left of')
    """
    check_vocabulary(prompt)
    text = " ".join(prompt.lower().split())
    objects = [(m.group(1), m.group(2)) for m in _OBJECT.finditer(text)]
    skeleton = _OBJECT.sub("#", text)
    relation = next((r for r in RELATIONS if skeleton == f"# {r} #"), None)
    if relation is None and skeleton not in ("#", "# and #", "# and # and #"):
        raise AttnscopeError(
            f"prompt={prompt!r}: not a shapes-world prompt; expected e.g. 'a red circle', "
            f"'a red circle and a blue square' or 'a red circle to the left of a blue square' "
            f"(colours {', '.join(COLOURS)}; shapes {', '.join(SHAPES)}; relations {', '.join(RELATIONS)})"
        )
    return objects, relation


def relation_holds(relation: str, a_centre: tuple[float, float], b_centre: tuple[float, float]) -> bool:
    """Whether "A <relation> B" holds for objects centred at ``a_centre`` and ``b_centre``.

    The comparison is along the relation's axis only (centroids, as in T2I-CompBench's spatial check).

    >>> from attnscope.models.shapes import relation_holds
    >>> relation_holds("above", (5.0, 3.0), (6.0, 20.0))
    True
    """
    if not isinstance(relation, str) or relation not in RELATIONS:
        raise AttnscopeError(f"relation={relation!r}: expected one of {', '.join(RELATIONS)}")
    axis, sign = RELATIONS[relation]
    delta = a_centre[axis] - b_centre[axis]
    return delta * sign > 0
