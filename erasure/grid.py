"""Labelled image grids: base-versus-edited comparison grids and plain sample grids.

A comparison grid has one column per model (the base model first, then each edit) and one row per prompt. Rows
are grouped by their role, erased prompts first, then held-out paraphrases (``generality``), then preserved
neighbours, each group under a header band. The prompt (and its seed) is written at the left of its row and the
model labels across the top::

    +---------------------+--------+--------+--------+
    |                     |  base  |  uce   |  esd   |
    | erased (2 prompts)  ---------------------------|
    | a drawing of Pip    | [img]  | [img]  | [img]  |
    | seed 3              |        |        |        |
    | ...                 |        |        |        |
    | preserved (...)     ---------------------------|
    +---------------------+--------+--------+--------+

Every image of a row comes from the same prompt and seed, so the columns differ only by the model.

Cell size: images smaller than 128 pixels (the toy world's 64x64) are enlarged by a whole factor with
nearest-neighbour sampling, so pixels stay sharp; images of 128-256 pixels are kept; larger ones are reduced to
256 pixels high (Lanczos), which keeps a grid of Stable Diffusion images small enough to inline in a report. Pass
``cell_size`` to choose the height yourself. :func:`comparison_layout` holds the arithmetic, so callers (and
tests) can find each cell without drawing.

Text uses Pillow's built-in font (``ImageFont.load_default(size=...)``); nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from erasure.files import atomic_path, atomic_write_text, to_pil

logger = logging.getLogger(__name__)

__all__ = [
    "GROUP_ORDER",
    "GridLayout",
    "comparison_grid",
    "comparison_layout",
    "group_order",
    "sample_grid",
    "save_grid",
    "to_pil_images",
]

#: Known row groups, in the order a grid shows them; other groups follow in order of first appearance.
GROUP_ORDER: tuple[str, ...] = ("erased", "generality", "preserved")

MIN_CELL = 128
MAX_CELL = 256
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
MUTED = (90, 90, 90)
GROUP_FILL = (226, 230, 240)

ImageColumn = np.ndarray | Sequence[Image.Image] | Sequence[np.ndarray]


# --------------------------------------------------------------------------------------------------------------
# Images and text
# --------------------------------------------------------------------------------------------------------------


def to_pil_images(images: ImageColumn) -> list[Image.Image]:
    """RGB PIL images from an array (uint8, or float in 0-1) or a list of PIL images/arrays.

    An array is ``(N, H, W, C)`` (C = 1, 3 or 4) or ``(N, H, W)`` (grey).
    """
    if isinstance(images, np.ndarray) and images.ndim not in (3, 4):
        raise ValueError(f"Expected an (N, H, W, 3) array of images, got shape {images.shape}.")
    return [to_pil(image) for image in images]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _line_height(font: ImageFont.FreeTypeFont) -> int:
    ascent, descent = font.getmetrics()
    return ascent + descent + 2


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Break ``text`` into lines no wider than ``width`` pixels (words longer than a line are split)."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while font.getlength(word) > width and len(word) > 1:
                cut = 1
                while cut < len(word) - 1 and font.getlength(word[: cut + 1]) <= width:
                    cut += 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def _fit_lines(lines: list[str], max_lines: int, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """At most ``max_lines`` lines; a cut last line ends in an ellipsis."""
    if len(lines) <= max_lines:
        return lines
    kept = lines[: max(max_lines, 1)]
    last = kept[-1]
    while last and font.getlength(last + "...") > width:
        last = last[:-1]
    kept[-1] = last.rstrip() + "..."
    return kept


def _cell_shape(image_size: tuple[int, int], cell_size: int | None) -> tuple[tuple[int, int], bool]:
    """Cell ``(width, height)`` for images of ``image_size`` and whether to resize with nearest-neighbour."""
    width, height = image_size
    if cell_size is None:
        if height < MIN_CELL:
            target = height * math.ceil(MIN_CELL / height)
        else:
            target = min(height, MAX_CELL)
    else:
        if cell_size < 1:
            raise ValueError(f"cell_size must be a positive number of pixels, got {cell_size}.")
        target = int(cell_size)
    nearest = target >= height and target % height == 0
    return (max(1, round(width * target / height)), target), nearest


def _resize(image: Image.Image, shape: tuple[int, int], nearest: bool) -> Image.Image:
    if image.size == shape:
        return image
    return image.resize(shape, Image.Resampling.NEAREST if nearest else Image.Resampling.LANCZOS)


def group_order(groups: Sequence[str]) -> list[str]:
    """The distinct groups of ``groups`` in display order: :data:`GROUP_ORDER` first, the rest as they appear."""
    present = list(dict.fromkeys(groups))
    return [g for g in GROUP_ORDER if g in present] + [g for g in present if g not in GROUP_ORDER]


# --------------------------------------------------------------------------------------------------------------
# Comparison grid
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridLayout:
    """Where everything of a comparison grid goes, in pixels (``(left, top, right, bottom)`` boxes).

    Attributes:
        width: Width of the whole grid.
        height: Height of the whole grid.
        cell: ``(width, height)`` of one image cell.
        label_width: Width of the prompt-label column at the left.
        title_box: Box of the title band (empty when there is no title).
        column_boxes: One box per model column for its label, in column order.
        group_boxes: ``{group: header band box}``.
        row_order: The input row indices, top to bottom.
        row_label_boxes: ``{input row index: box of its prompt label}``.
        cell_boxes: ``{(input row index, column index): box of its image}``.
    """

    width: int
    height: int
    cell: tuple[int, int]
    label_width: int
    title_box: tuple[int, int, int, int]
    column_boxes: tuple[tuple[int, int, int, int], ...]
    group_boxes: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)
    row_order: tuple[int, ...] = ()
    row_label_boxes: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)
    cell_boxes: dict[tuple[int, int], tuple[int, int, int, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (for a grid's manifest): sizes and each row's cell boxes."""
        rows = range(len(self.row_label_boxes))
        columns = range(len(self.column_boxes))
        return {
            "width": self.width,
            "height": self.height,
            "cell": list(self.cell),
            "row_order": list(self.row_order),
            "cell_boxes": [[list(self.cell_boxes[row, col]) for col in columns] for row in rows],
        }


def comparison_layout(
    columns: Sequence[str],
    groups: Sequence[str],
    image_size: tuple[int, int],
    *,
    cell_size: int | None = None,
    label_width: int = 260,
    font_size: int = 14,
    padding: int = 4,
    margin: int = 10,
    title: str | None = None,
) -> GridLayout:
    """The geometry of :func:`comparison_grid`, without drawing anything.

    Width is ``2 * margin + label_width + padding + n_columns * cell_width + (n_columns - 1) * padding``; height
    is ``2 * margin + title band + column-label band + one header band per group + n_rows * (cell_height +
    padding)``.

    Args:
        columns: Column labels, base model first.
        groups: The group of each input row (``"erased"``, ``"preserved"``, ...).
        image_size: ``(width, height)`` of the input images.
        cell_size: Height of an image cell; ``None`` picks one from the image size (see the module docstring).
        label_width: Width of the prompt column.
        font_size: Size of the prompt text; labels and headers are a little larger.
        padding: Gap between cells.
        margin: Blank border around the grid.
        title: Optional title above the grid.

    Returns:
        The layout.
    """
    if not columns:
        raise ValueError("A comparison grid needs at least one column of images.")
    (cell_w, cell_h), _ = _cell_shape(image_size, cell_size)
    label_font, header_font = _font(font_size + 2), _font(font_size + 1)
    label_line = _line_height(label_font)
    column_lines = max(len(_wrap(label, label_font, cell_w)) for label in columns)
    column_band = min(column_lines, 3) * label_line + padding
    title_band = _line_height(_font(font_size + 4)) + 2 * padding if title else 0
    group_band = _line_height(header_font) + 2 * padding

    grid_left = margin + label_width + padding
    width = grid_left + len(columns) * cell_w + (len(columns) - 1) * padding + margin
    top = margin
    title_box = (margin, top, width - margin, top + title_band)
    top += title_band
    column_boxes = tuple(
        (grid_left + c * (cell_w + padding), top, grid_left + c * (cell_w + padding) + cell_w, top + column_band)
        for c in range(len(columns))
    )
    top += column_band + padding
    group_boxes: dict[str, tuple[int, int, int, int]] = {}
    row_order: list[int] = []
    row_label_boxes: dict[int, tuple[int, int, int, int]] = {}
    cell_boxes: dict[tuple[int, int], tuple[int, int, int, int]] = {}
    for group in group_order(groups):
        group_boxes[group] = (margin, top, width - margin, top + group_band)
        top += group_band + padding
        for row, row_group in enumerate(groups):
            if row_group != group:
                continue
            row_order.append(row)
            row_label_boxes[row] = (margin, top, margin + label_width, top + cell_h)
            for c in range(len(columns)):
                left = grid_left + c * (cell_w + padding)
                cell_boxes[row, c] = (left, top, left + cell_w, top + cell_h)
            top += cell_h + padding
    height = top - padding + margin
    return GridLayout(
        width=width,
        height=height,
        cell=(cell_w, cell_h),
        label_width=label_width,
        title_box=title_box,
        column_boxes=column_boxes,
        group_boxes=group_boxes,
        row_order=tuple(row_order),
        row_label_boxes=row_label_boxes,
        cell_boxes=cell_boxes,
    )


def comparison_grid(
    images: Mapping[str, ImageColumn],
    prompts: Sequence[str],
    groups: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    *,
    title: str | None = None,
    cell_size: int | None = None,
    label_width: int = 260,
    font_size: int = 14,
) -> Image.Image:
    """Draw a base-versus-edited comparison grid.

    Args:
        images: Column label -> one image per prompt (an ``(N, H, W, 3)`` uint8 array or a list of PIL images),
            the base model first; the dict's order is the column order.
        prompts: The prompt of each row.
        groups: The group of each row (``"erased"``, ``"generality"``, ``"preserved"``, ...); rows are shown
            grouped, in :data:`GROUP_ORDER`, keeping their order within a group. ``None``: one group
            ``"prompts"``.
        seeds: The seed of each row, written under its prompt (optional).
        title: A title above the grid (optional).
        cell_size: Height of an image cell in pixels (default: see the module docstring).
        label_width: Width of the prompt column in pixels.
        font_size: Size of the prompt text.

    Returns:
        The grid as an RGB image; :func:`comparison_layout` with the same arguments gives its geometry.

    Raises:
        ValueError: If a column does not hold one image per prompt, or the lengths of ``groups``/``seeds`` differ
            from that of ``prompts``, or the images differ in size.
    """
    prompts = list(prompts)
    groups = list(groups) if groups is not None else ["prompts"] * len(prompts)
    if not prompts:
        raise ValueError("A comparison grid needs at least one prompt.")
    if len(groups) != len(prompts):
        raise ValueError(f"Got {len(groups)} groups for {len(prompts)} prompts; give one group per prompt.")
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"Got {len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt.")
    columns = {label: to_pil_images(column) for label, column in images.items()}
    for label, column in columns.items():
        if len(column) != len(prompts):
            raise ValueError(f"Column '{label}' has {len(column)} images for {len(prompts)} prompts.")
    sizes = {image.size for column in columns.values() for image in column}
    if len(sizes) > 1:
        raise ValueError(f"All images of a grid must have one size; got {sorted(sizes)}.")
    image_size = sizes.pop() if sizes else (0, 0)

    layout = comparison_layout(
        list(columns),
        groups,
        image_size,
        cell_size=cell_size,
        label_width=label_width,
        font_size=font_size,
        title=title,
    )
    _, nearest = _cell_shape(image_size, cell_size)
    canvas = Image.new("RGB", (layout.width, layout.height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    prompt_font, small_font = _font(font_size), _font(max(font_size - 2, 8))
    label_font, header_font = _font(font_size + 2), _font(font_size + 1)

    if title:
        left, top, _, _ = layout.title_box
        draw.text((left, top + 2), title, fill=TEXT, font=_font(font_size + 4))
    for label, (left, _top, right, bottom) in zip(columns, layout.column_boxes, strict=True):
        lines = _fit_lines(_wrap(label, label_font, right - left), 3, label_font, right - left)
        y = bottom - 4 - len(lines) * _line_height(label_font)
        for line in lines:
            x = left + max(0, (right - left - label_font.getlength(line)) / 2)
            draw.text((x, y), line, fill=TEXT, font=label_font)
            y += _line_height(label_font)
    for group, (left, top, right, bottom) in layout.group_boxes.items():
        count = groups.count(group)
        draw.rectangle((left, top, right - 1, bottom - 1), fill=GROUP_FILL)
        text = f"{group} ({count} prompt{'s' if count != 1 else ''})"
        draw.text((left + 6, top + 4), text, fill=TEXT, font=header_font)
    for row in layout.row_order:
        left, top, right, bottom = layout.row_label_boxes[row]
        seed_line = _line_height(small_font) if seeds is not None else 0
        room = max(1, (bottom - top - seed_line) // _line_height(prompt_font))
        lines = _fit_lines(_wrap(prompts[row], prompt_font, right - left - 8), room, prompt_font, right - left - 8)
        y = top + 2
        for line in lines:
            draw.text((left + 4, y), line, fill=TEXT, font=prompt_font)
            y += _line_height(prompt_font)
        if seeds is not None:
            draw.text((left + 4, y), f"seed {int(seeds[row])}", fill=MUTED, font=small_font)
        for c, column in enumerate(columns.values()):
            box = layout.cell_boxes[row, c]
            canvas.paste(_resize(column[row], layout.cell, nearest), box[:2])
    return canvas


# --------------------------------------------------------------------------------------------------------------
# Plain sample grid
# --------------------------------------------------------------------------------------------------------------


def sample_grid(
    images: ImageColumn,
    labels: Sequence[str] | None = None,
    columns: int = 8,
    *,
    cell_size: int | None = None,
    font_size: int = 12,
    padding: int = 6,
    title: str | None = None,
) -> Image.Image:
    """A plain grid of images, each with its label underneath (up to two lines).

    Args:
        images: The images (``(N, H, W, 3)`` array or list), laid out row by row.
        labels: One label per image (optional).
        columns: Images per row.
        cell_size: Height of an image cell (default: see the module docstring).
        font_size: Size of the label text.
        padding: Gap between cells and around the grid.
        title: A title above the grid (optional).

    Returns:
        The grid as an RGB image of width ``padding + columns * (cell_width + padding)``.
    """
    pictures = to_pil_images(images)
    if not pictures:
        raise ValueError("sample_grid needs at least one image.")
    if labels is not None and len(labels) != len(pictures):
        raise ValueError(f"Got {len(labels)} labels for {len(pictures)} images.")
    if columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}.")
    sizes = {picture.size for picture in pictures}
    if len(sizes) > 1:
        raise ValueError(f"All images of a grid must have one size; got {sorted(sizes)}.")
    (cell_w, cell_h), nearest = _cell_shape(pictures[0].size, cell_size)
    font, title_font = _font(font_size), _font(font_size + 4)
    label_band = 2 * _line_height(font) + 2 if labels is not None else 0
    title_band = _line_height(title_font) + padding if title else 0
    columns = min(columns, len(pictures))
    rows = math.ceil(len(pictures) / columns)
    width = padding + columns * (cell_w + padding)
    height = padding + title_band + rows * (cell_h + label_band + padding)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((padding, padding), title, fill=TEXT, font=title_font)
    for index, picture in enumerate(pictures):
        row, col = divmod(index, columns)
        left = padding + col * (cell_w + padding)
        top = padding + title_band + row * (cell_h + label_band + padding)
        canvas.paste(_resize(picture, (cell_w, cell_h), nearest), (left, top))
        if labels is not None:
            lines = _fit_lines(_wrap(labels[index], font, cell_w), 2, font, cell_w)
            y = top + cell_h + 1
            for line in lines:
                draw.text((left + max(0, (cell_w - font.getlength(line)) / 2), y), line, fill=TEXT, font=font)
                y += _line_height(font)
    return canvas


# --------------------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------------------


def save_grid(image: Image.Image, path: str | Path, manifest: Mapping[str, Any] | None = None) -> Path:
    """Write ``image`` as PNG at ``path`` and ``manifest`` as JSON beside it (``grid.png`` -> ``grid.json``).

    Both files are written to temporary names in the same folder and renamed into place, so a crash never leaves
    a half-written grid or manifest. The manifest gets ``image`` (the PNG's file name), ``width`` and ``height``
    unless it already has them.

    Args:
        image: The grid.
        path: Where to write the PNG (``.png`` is required).
        manifest: What the grid shows: prompts, seeds, models, steps, guidance, ... (JSON-serialisable).

    Returns:
        The PNG's path.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"Grids are saved as PNG; give a path ending in .png, not '{path.name}'.")
    data = dict(manifest or {})
    data.setdefault("image", path.name)
    data.setdefault("width", image.width)
    data.setdefault("height", image.height)
    text = json.dumps(data, indent=2, default=str) + "\n"
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG")
    atomic_write_text(path.with_suffix(".json"), text)
    return path
