"""The toy world's renderer: the ground truth every toy-world number is measured against.

Specification (issue "Foundation", section 2):

* Canvas 64x64 RGB on white (255, 255, 255), exactly one figure, no anti-aliasing.
* Figure size ``s`` (side of its bounding box) uniform in [28, 44]; the bounding box stays at least 3 px inside
  the canvas. Pixel ``(x, y)`` covers the unit square whose centre is ``(x + 0.5, y + 0.5)``; a pixel belongs to
  a figure when its centre does.
* Shapes: ``circle`` (disc of diameter s), ``square`` (s x s), ``triangle`` (apex up, base s at the bottom,
  height s), ``cross`` (a horizontal and a vertical bar, each s long and ``round(s / 3)`` thick).
* Styles: ``plain``; ``striped`` (pixels of the figure with ``(x + y) % 12 < 5`` are white); ``outlined`` (only
  pixels of the figure within 4 px of its boundary are coloured, i.e. the figure minus its erosion by a disc of
  radius 4).
* Characters, always plain, features in (20, 20, 20): ``Pip`` (yellow circle, two eyes), ``Zog`` (green triangle,
  one eye), ``Miro`` (blue square, two eyes and a mouth).

``round`` is Python's built-in (round half to even), as written in the specification.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

CANVAS = 64
MARGIN = 3
SIZE_RANGE = (28, 44)
BACKGROUND = (255, 255, 255)
FEATURE_COLOUR = (20, 20, 20)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
STYLES: tuple[str, ...] = ("plain", "striped", "outlined")
CHARACTERS: dict[str, tuple[str, str]] = {  # name -> (colour, shape)
    "Pip": ("yellow", "circle"),
    "Zog": ("green", "triangle"),
    "Miro": ("blue", "square"),
}
STRIPE_PERIOD = 12
STRIPE_WIDTH = 5
OUTLINE_WIDTH = 4


@dataclass(frozen=True)
class Scene:
    """Everything that determines one toy-world image.

    Attributes:
        shape: One of ``SHAPES``.
        colour: One of ``COLOURS``.
        style: One of ``STYLES`` (always ``plain`` for characters).
        character: ``Pip``, ``Zog``, ``Miro`` or ``None`` for a plain object.
        size: Side of the bounding box in pixels.
        left: Column of the bounding box's left edge.
        top: Row of the bounding box's top edge.
    """

    shape: str
    colour: str
    style: str
    character: str | None
    size: int
    left: int
    top: int

    @property
    def center(self) -> tuple[float, float]:
        """The bounding box's centre ``(cx, cy)`` in pixel coordinates."""
        return self.left + self.size / 2, self.top + self.size / 2

    def labels(self) -> dict:
        """The scene as a plain dict (JSON-friendly), with ``character`` as ``"none"`` for objects."""
        labels = asdict(self)
        labels["character"] = self.character or "none"
        return labels


def _pixel_centres() -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:CANVAS, 0:CANVAS]
    return xs + 0.5, ys + 0.5


_PX, _PY = _pixel_centres()
_XS, _YS = np.meshgrid(np.arange(CANVAS), np.arange(CANVAS))


def disc_mask(cx: float, cy: float, diameter: float) -> np.ndarray:
    """Pixels whose centre lies in the disc of the given diameter centred at ``(cx, cy)``."""
    return (_PX - cx) ** 2 + (_PY - cy) ** 2 <= (diameter / 2) ** 2


def rectangle_mask(cx: float, cy: float, width: float, height: float) -> np.ndarray:
    """Pixels whose centre lies in the axis-aligned rectangle centred at ``(cx, cy)``.

    The rectangle is half-open, ``[cx - width / 2, cx + width / 2)`` (and likewise in y), so that a bar of integer
    thickness covers exactly that many pixels even when its edges fall on pixel centres (a cross of odd ``s`` with
    even ``round(s / 3)``, for example); a closed interval would add a row there. The ``1e-9`` absorbs rounding
    in ``cx +- width / 2``.
    """
    eps = 1e-9
    inside_x = (_PX - (cx - width / 2) >= -eps) & (_PX - (cx + width / 2) < -eps)
    inside_y = (_PY - (cy - height / 2) >= -eps) & (_PY - (cy + height / 2) < -eps)
    return inside_x & inside_y


def shape_mask(shape: str, size: int, left: int, top: int) -> np.ndarray:
    """Boolean mask of a figure's pixels.

    Args:
        shape: One of ``SHAPES``.
        size: Side ``s`` of the bounding box.
        left: Left edge of the bounding box.
        top: Top edge of the bounding box.

    Returns:
        A ``(64, 64)`` boolean array.
    """
    s = size
    cx, cy = left + s / 2, top + s / 2
    if shape == "circle":
        return disc_mask(cx, cy, s)
    if shape == "square":
        return (_PX > left) & (_PX < left + s) & (_PY > top) & (_PY < top + s)
    if shape == "triangle":
        depth = (_PY - top) / s  # 0 at the apex, 1 at the base
        return (depth >= 0) & (depth <= 1) & (np.abs(_PX - cx) <= depth * s / 2)
    if shape == "cross":
        thickness = round(s / 3)
        return rectangle_mask(cx, cy, s, thickness) | rectangle_mask(cx, cy, thickness, s)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Erosion by a disc: keeps pixels whose every neighbour within ``radius`` (Euclidean) is in ``mask``."""
    padded = np.pad(mask, radius, constant_values=False)
    eroded = np.ones_like(mask)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dx * dx + dy * dy <= radius * radius:
                eroded &= padded[radius + dy : radius + dy + CANVAS, radius + dx : radius + dx + CANVAS]
    return eroded


def style_mask(mask: np.ndarray, style: str) -> np.ndarray:
    """The coloured part of a figure's mask under a style."""
    if style == "plain":
        return mask
    if style == "striped":
        return mask & ~(((_XS + _YS) % STRIPE_PERIOD) < STRIPE_WIDTH)
    if style == "outlined":
        return mask & ~erode(mask, OUTLINE_WIDTH)
    raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")


def eye_diameter(character: str, size: int) -> int:
    """Diameter of a character's eyes for a figure of side ``size``."""
    return max(7, round(size / 4)) if character == "Zog" else max(5, round(size / 6))


def feature_mask(character: str, size: int, left: int, top: int) -> np.ndarray:
    """Pixels of a character's face (eyes, and Miro's mouth)."""
    s = size
    cx, cy = left + s / 2, top + s / 2
    if character == "Zog":
        return disc_mask(cx, cy + s / 8, eye_diameter(character, s))
    eyes = disc_mask(cx - s / 5, cy - s / 8, eye_diameter(character, s)) | disc_mask(
        cx + s / 5, cy - s / 8, eye_diameter(character, s)
    )
    if character == "Pip":
        return eyes
    if character == "Miro":
        return eyes | rectangle_mask(cx, cy + s / 5, s / 2, max(3, round(s / 10)))
    raise ValueError(f"unknown character {character!r}; expected one of {tuple(CHARACTERS)}")


def render(scene: Scene) -> np.ndarray:
    """Draw a scene.

    Args:
        scene: What to draw.

    Returns:
        A ``(64, 64, 3)`` uint8 RGB image.
    """
    image = np.empty((CANVAS, CANVAS, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    mask = shape_mask(scene.shape, scene.size, scene.left, scene.top)
    image[style_mask(mask, scene.style)] = COLOURS[scene.colour]
    if scene.character is not None:
        image[feature_mask(scene.character, scene.size, scene.left, scene.top)] = FEATURE_COLOUR
    return image


def figure_mask(scene: Scene) -> np.ndarray:
    """``(64, 64)`` bool: the pixels of the scene's figure, its whole shape whatever its style.

    The region where the image shows its character, shape, colour and style: the ground truth a segmentation model
    would estimate.
    """
    return shape_mask(scene.shape, scene.size, scene.left, scene.top)


def place(rng: np.random.Generator) -> tuple[int, int, int]:
    """Draw a size and a bounding-box position that keeps ``MARGIN`` px inside the canvas."""
    size = int(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1))
    left = int(rng.integers(MARGIN, CANVAS - MARGIN - size + 1))
    top = int(rng.integers(MARGIN, CANVAS - MARGIN - size + 1))
    return size, left, top


def make_scene(
    rng: np.random.Generator,
    shape: str | None = None,
    colour: str | None = None,
    style: str | None = None,
    character: str | None = None,
) -> Scene:
    """A scene with the given attributes; the ones left ``None`` (and size, position) are drawn from ``rng``.

    Args:
        rng: Source of randomness.
        shape: Fixed shape, or ``None`` to draw one.
        colour: Fixed colour, or ``None`` to draw one.
        style: Fixed style, or ``None`` to draw one uniformly.
        character: A character name; it fixes shape, colour and style.

    Returns:
        The scene.
    """
    size, left, top = place(rng)
    if character is not None:
        if character not in CHARACTERS:
            raise ValueError(f"unknown character {character!r}; expected one of {tuple(CHARACTERS)}")
        colour, shape = CHARACTERS[character]
        return Scene(shape, colour, "plain", character, size, left, top)
    shape = shape or SHAPES[int(rng.integers(len(SHAPES)))]
    colour = colour or tuple(COLOURS)[int(rng.integers(len(COLOURS)))]
    style = style or STYLES[int(rng.integers(len(STYLES)))]
    return Scene(shape, colour, style, None, size, left, top)
