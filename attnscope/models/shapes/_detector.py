"""A deterministic detector for the shapes world: colour by hue, objects by connected components,
shape by how the object fills its box."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import AttnscopeError
from ._world import COLOURS, IMAGE_SIZE

__all__ = ["DetectedObject", "detect"]

_HUES = {name: None for name in COLOURS}  # filled below from the palette
_MIN_SATURATION = 0.28
_MIN_VALUE = 0.25
_MIN_AREA = 14  # pixels at IMAGE_SIZE; objects are >= 9x9 px, so anything smaller is a smudge
#: a region 1 px wide or tall is the anti-aliased border of two touching objects (red | green blends to a
#: yellowish line), never an object
_MIN_SIDE = 2


@dataclass(frozen=True)
class DetectedObject:
    """One detected object: colour and shape names, box ``(x0, y0, x1, y1)`` in pixels (x1, y1
    exclusive), area in pixels and the fill ratio (area / box area) the shape was read from."""

    colour: str
    shape: str
    box: tuple[int, int, int, int]
    area: int
    fill: float

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2, (y0 + y1) / 2)


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rgb = rgb.astype(np.float32) / 255.0
    mx, mn = rgb.max(-1), rgb.min(-1)
    delta = mx - mn
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.where(delta > 0, delta, 1.0)
    hue = np.select(
        [mx == r, mx == g],
        [((g - b) / safe) % 6, (b - r) / safe + 2],
        (r - g) / safe + 4,
    ) * 60.0
    saturation = np.where(mx > 0, delta / np.where(mx > 0, mx, 1.0), 0.0)
    return hue, saturation, mx


for _name, _rgb in COLOURS.items():
    _HUES[_name] = float(_hsv(np.asarray(_rgb, np.uint8))[0])


def _components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected components of a boolean mask, each a list of (y, x)."""
    seen = np.zeros_like(mask)
    h, w = mask.shape
    out = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        seen[y, x] = True
        queue, pixels = deque([(y, x)]), []
        while queue:
            cy, cx = queue.popleft()
            pixels.append((cy, cx))
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        out.append(pixels)
    return out


def _shape_of(region: np.ndarray) -> tuple[str, float]:
    """Classify a cropped boolean region: a triangle is narrow at the top, a square fills its corners."""
    h, w = region.shape
    fill = float(region.mean())
    third = max(1, h // 3)
    top, bottom = region[:third].sum(1).mean(), region[-third:].sum(1).mean()
    if top < 0.6 * bottom:
        return "triangle", fill
    ch, cw = max(1, round(0.2 * h)), max(1, round(0.2 * w))
    corners = np.concatenate([c.ravel() for c in (
        region[:ch, :cw], region[:ch, -cw:], region[-ch:, :cw], region[-ch:, -cw:])])
    return ("square" if corners.mean() >= 0.5 else "circle"), fill


def detect(image: Any) -> list[DetectedObject]:
    """Find the coloured objects in a shapes-world image (PIL image or ``(H, W, 3)`` uint8 array).

    A pixel belongs to a colour when it is saturated and its hue is nearest to that colour's hue;
    each 4-connected region of one colour at least ``14 * (H*W / 32**2)`` pixels large and at least 2 pixels
    wide and tall is an object (a 1-px line is the blended border of two touching objects);
    its shape is read from the region: a triangle is much narrower in its top third than in its
    bottom third, a square fills at least half of its box's four corner cells (each a fifth of the
    box's width and height), a circle leaves them empty. Objects are returned left to right.

    Examples
    --------
    >>> from attnscope.models.shapes import detect, render, sample_scene
    >>> scene = sample_scene(1, "single")
    >>> [(o.colour, o.shape) for o in detect(render(scene))] == [(o.colour, o.shape) for o in scene.objects]
    True
    """
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise AttnscopeError(
            f"image: got an array of shape {array.shape} and dtype {array.dtype}, expected (H, W, 3) uint8 or a PIL image"
        )
    hue, saturation, value = _hsv(array)
    foreground = (saturation >= _MIN_SATURATION) & (value >= _MIN_VALUE)
    names = list(_HUES)
    centres = np.asarray([_HUES[n] for n in names])
    distance = np.abs(hue[..., None] - centres)
    distance = np.minimum(distance, 360 - distance)
    nearest = distance.argmin(-1)
    min_area = _MIN_AREA * array.shape[0] * array.shape[1] / IMAGE_SIZE**2
    found = []
    for index, name in enumerate(names):
        for pixels in _components(foreground & (nearest == index)):
            if len(pixels) < min_area:
                continue
            ys, xs = np.asarray(pixels).T
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            if min(y1 - y0, x1 - x0) < _MIN_SIDE:
                continue
            region = np.zeros((y1 - y0, x1 - x0), bool)
            region[ys - y0, xs - x0] = True
            shape, fill = _shape_of(region)
            found.append(DetectedObject(name, shape, (int(x0), int(y0), int(x1), int(y1)), len(pixels), fill))
    return sorted(found, key=lambda o: (o.box[0], o.box[1]))
