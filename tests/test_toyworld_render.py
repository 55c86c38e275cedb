"""The toy world's renderer against its specification.

Geometry is checked against the ideal (continuous) figures with signed distance functions: a pixel whose unit
square lies wholly inside the ideal figure must be drawn, one wholly outside must not, whatever rasterisation rule
the renderer uses for the pixels the boundary cuts. Sizes the specification pins to whole pixels (the square, the
bars' lengths and thicknesses, the bounding box) are counted exactly.
"""

import itertools
import math

import numpy as np
import pytest

from erasure.toyworld import render
from erasure.toyworld.render import (
    BACKGROUND,
    CANVAS,
    CHARACTERS,
    COLOURS,
    FEATURE_COLOUR,
    SHAPES,
    STYLES,
    Scene,
    make_scene,
)

WHITE = (255, 255, 255)
SIZES = range(28, 45)
HALF_DIAGONAL = math.sqrt(2) / 2  # a pixel's unit square lies within this distance of its centre

_YS, _XS = np.mgrid[0:CANVAS, 0:CANVAS]
_PX, _PY = _XS + 0.5, _YS + 0.5  # pixel centres


# ------------------------------------------------------------------------------------------ reference geometry
def sdf_disc(cx, cy, diameter):
    return np.hypot(_PX - cx, _PY - cy) - diameter / 2


def sdf_rectangle(cx, cy, width, height):
    dx, dy = np.abs(_PX - cx) - width / 2, np.abs(_PY - cy) - height / 2
    outside = np.hypot(np.maximum(dx, 0), np.maximum(dy, 0))
    return outside + np.minimum(np.maximum(dx, dy), 0)


def sdf_convex_polygon(vertices):
    """Max of the half-plane distances: exact inside, a lower bound of the distance outside (enough here)."""
    distances = []
    for (x0, y0), (x1, y1) in zip(vertices, vertices[1:] + vertices[:1], strict=True):
        ex, ey = x1 - x0, y1 - y0
        nx, ny = ey, -ex  # outward normal for clockwise-on-screen (y down) vertex order
        norm = math.hypot(nx, ny)
        distances.append(((_PX - x0) * nx + (_PY - y0) * ny) / norm)
    return np.max(distances, axis=0)


def ideal_shape_sdf(shape, s, left, top):
    cx, cy = left + s / 2, top + s / 2
    if shape == "circle":
        return sdf_disc(cx, cy, s)
    if shape == "square":
        return sdf_rectangle(cx, cy, s, s)
    if shape == "triangle":
        return sdf_convex_polygon([(cx, top), (left + s, top + s), (left, top + s)])
    if shape == "cross":
        t = round(s / 3)
        return np.minimum(sdf_rectangle(cx, cy, s, t), sdf_rectangle(cx, cy, t, s))
    raise AssertionError(shape)


def assert_brackets(mask, sdf, what):
    """Pixels wholly inside the ideal figure are in ``mask``; pixels wholly outside are not."""
    missing = (sdf <= -HALF_DIAGONAL) & ~mask
    extra = (sdf >= HALF_DIAGONAL) & mask
    assert not missing.any(), f"{what}: {missing.sum()} pixels wholly inside the ideal figure are not drawn"
    assert not extra.any(), f"{what}: {extra.sum()} pixels wholly outside the ideal figure are drawn"


def colour_mask(image, rgb):
    return (image == np.array(rgb, dtype=np.uint8)).all(-1)


def plain_object(shape, s, left, top, colour="red"):
    return Scene(shape, colour, "plain", None, s, left, top)


def figure_mask(shape, s, left, top):
    """The figure's pixels, read off a plain render (not off the renderer's helpers)."""
    return colour_mask(render.render(plain_object(shape, s, left, top)), COLOURS["red"])


def components(mask):
    """4-connected components of a boolean mask, as lists of (y, x)."""
    seen = np.zeros_like(mask)
    found = []
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        stack, pixels = [(y, x)], []
        seen[y, x] = True
        while stack:
            py, px = stack.pop()
            pixels.append((py, px))
            for ny, nx in ((py + 1, px), (py - 1, px), (py, px + 1), (py, px - 1)):
                if 0 <= ny < CANVAS and 0 <= nx < CANVAS and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        found.append(pixels)
    return found


# Every size, at an even and an odd offset (the centre lands on pixel corners, edges or centres).
PLACEMENTS = [(s, 3 + (s % 5), 4 + (s % 3)) for s in SIZES] + [(s, 61 - s, 3) for s in (28, 33, 44)]


# ------------------------------------------------------------------------------------------------- constants
def test_palette_and_vocabulary_are_the_specified_ones():
    assert CANVAS == 64
    assert BACKGROUND == WHITE
    assert FEATURE_COLOUR == (20, 20, 20)
    assert COLOURS == {
        "red": (220, 40, 40),
        "green": (40, 170, 60),
        "blue": (40, 80, 220),
        "yellow": (235, 200, 30),
        "purple": (150, 60, 190),
    }
    assert set(SHAPES) == {"circle", "square", "triangle", "cross"}
    assert set(STYLES) == {"plain", "striped", "outlined"}
    assert CHARACTERS == {"Pip": ("yellow", "circle"), "Zog": ("green", "triangle"), "Miro": ("blue", "square")}


# ---------------------------------------------------------------------------------------- size and placement
def test_size_is_uniform_on_28_to_44_and_the_box_keeps_3px_inside():
    rng = np.random.default_rng(0)
    draws = np.array([render.place(rng) for _ in range(6800)])
    sizes, lefts, tops = draws.T
    assert sizes.min() == 28 and sizes.max() == 44
    counts = np.bincount(sizes - 28, minlength=17)
    assert len(counts) == 17
    expected = len(sizes) / 17
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 45, f"sizes not uniform on [28, 44]: chi2 = {chi2:.1f} with 16 degrees of freedom"
    for start in (lefts, tops):
        assert (start >= 3).all()
        assert (start + sizes <= CANVAS - 3).all()


@pytest.mark.parametrize("size", [28, 36, 44])
def test_position_is_uniform_over_every_allowed_place(size):
    rng = np.random.default_rng(1)
    positions = []
    while len(positions) < 400:
        s, left, top = render.place(rng)
        if s == size:
            positions.append((left, top))
    positions = np.array(positions)
    low, high = 3, CANVAS - 3 - size  # inclusive range of the box's left/top edge
    for axis in range(2):
        values = positions[:, axis]
        assert values.min() == low and values.max() == high, "both extreme positions must be reachable"
        spread = high - low
        # mean and variance of a discrete uniform on [low, high]
        assert abs(values.mean() - (low + high) / 2) < 4 * math.sqrt((spread * (spread + 2) / 12) / len(values))
        assert values.var() == pytest.approx(spread * (spread + 2) / 12, rel=0.3)
    # x and y are drawn independently
    assert abs(np.corrcoef(positions.T)[0, 1]) < 0.2


def test_make_scene_draws_sizes_and_places_within_the_spec():
    rng = np.random.default_rng(2)
    for _ in range(300):
        scene = make_scene(rng)
        assert 28 <= scene.size <= 44
        assert 3 <= scene.left and scene.left + scene.size <= 61
        assert 3 <= scene.top and scene.top + scene.size <= 61
        assert scene.center == (scene.left + scene.size / 2, scene.top + scene.size / 2)


# ------------------------------------------------------------------------------------------------ the image
def test_every_render_is_64x64_rgb_with_one_figure_and_only_the_allowed_colours():
    rng = np.random.default_rng(3)
    scenes = [
        make_scene(rng, shape=sh, colour=c, style=st) for sh, c, st in itertools.product(SHAPES, COLOURS, STYLES)
    ]
    scenes += [make_scene(rng, character=name) for name in CHARACTERS for _ in range(5)]
    for scene in scenes:
        image = render.render(scene)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        colours = {tuple(int(v) for v in rgb) for rgb in np.unique(image.reshape(-1, 3), axis=0)}
        allowed = {BACKGROUND, WHITE, COLOURS[scene.colour]} | ({FEATURE_COLOUR} if scene.character else set())
        assert colours <= allowed, f"{scene}: colours {colours - allowed} (anti-aliasing or a second figure)"
        assert COLOURS[scene.colour] in colours
        if scene.character:
            assert FEATURE_COLOUR in colours
        # one figure: everything drawn lies inside the scene's bounding box
        drawn = ~colour_mask(image, BACKGROUND)
        ys, xs = np.nonzero(drawn)
        assert xs.min() >= scene.left and xs.max() < scene.left + scene.size
        assert ys.min() >= scene.top and ys.max() < scene.top + scene.size


# ----------------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("shape", SHAPES)
def test_shape_matches_its_ideal_figure(shape):
    for s, left, top in PLACEMENTS:
        assert_brackets(figure_mask(shape, s, left, top), ideal_shape_sdf(shape, s, left, top), f"{shape} s={s}")


@pytest.mark.parametrize("shape", ["circle", "square", "cross"])
def test_bounding_box_side_is_s(shape):
    for s, left, top in PLACEMENTS:
        mask = figure_mask(shape, s, left, top)
        cols, rows = np.nonzero(mask.any(0))[0], np.nonzero(mask.any(1))[0]
        assert (cols.min(), cols.max()) == (left, left + s - 1), f"{shape} s={s}"
        assert (rows.min(), rows.max()) == (top, top + s - 1), f"{shape} s={s}"


def test_square_is_exactly_s_by_s():
    for s, left, top in PLACEMENTS:
        mask = figure_mask("square", s, left, top)
        expected = np.zeros_like(mask)
        expected[top : top + s, left : left + s] = True
        np.testing.assert_array_equal(mask, expected)


def test_circle_is_a_symmetric_disc_of_diameter_s():
    for s, left, top in PLACEMENTS:
        mask = figure_mask("circle", s, left, top)
        box = mask[top : top + s, left : left + s]
        np.testing.assert_array_equal(box, box[::-1])
        np.testing.assert_array_equal(box, box[:, ::-1])
        np.testing.assert_array_equal(box, box.T)
        assert abs(mask.sum() - math.pi * s * s / 4) < 2 * s  # within a perimeter's worth of boundary pixels


def test_triangle_points_up_with_base_s_at_the_bottom_and_height_s():
    for s, left, top in PLACEMENTS:
        mask = figure_mask("triangle", s, left, top)
        widths = mask.sum(1)
        rows = np.nonzero(widths)[0]
        assert rows.max() == top + s - 1, "the base is the bounding box's bottom row"
        assert widths[top + s - 1] == s and mask[top + s - 1, left : left + s].all(), "the base is s wide"
        # apex up: the tip is at the top; a sampled point-like apex may fall between pixel centres (even s)
        assert rows.min() in (top, top + 1)
        assert widths[rows.min()] <= 2
        assert (np.diff(widths[rows.min() : top + s]) >= 0).all(), "rows widen towards the base"
        box = mask[top : top + s, left : left + s]
        np.testing.assert_array_equal(box, box[:, ::-1])  # symmetric about the vertical axis
        assert abs(mask.sum() - s * s / 2) < 2 * s


def test_cross_is_two_bars_s_long_and_round_s_over_3_thick():
    for s, left, top in PLACEMENTS:
        mask = figure_mask("cross", s, left, top)
        t = round(s / 3)
        # the box's edge columns/rows cut only one bar: their drawn run is the bar's thickness
        for line in (mask[:, left], mask[:, left + s - 1], mask[top, :], mask[top + s - 1, :]):
            run = np.nonzero(line)[0]
            assert len(run) == t and run.max() - run.min() == t - 1, f"s={s}: bar {len(run)} px thick, want {t}"
        # the bars are s long and cross at the centre
        middle_rows = np.nonzero(mask[:, left])[0]
        middle_cols = np.nonzero(mask[top, :])[0]
        for y in middle_rows:
            assert mask[y].sum() == s
        for x in middle_cols:
            assert mask[:, x].sum() == s
        assert abs(middle_rows.mean() + 0.5 - (top + s / 2)) <= 0.5
        assert abs(middle_cols.mean() + 0.5 - (left + s / 2)) <= 0.5
        assert mask.sum() == 2 * s * t - t * t


# ----------------------------------------------------------------------------------------------------- styles
def scene_with(style, shape, s, left, top, colour="blue"):
    return Scene(shape, colour, style, None, s, left, top)


@pytest.mark.parametrize("shape", SHAPES)
def test_striped_whitens_figure_pixels_with_x_plus_y_mod_12_below_5(shape):
    for s, left, top in PLACEMENTS[::3]:
        figure = figure_mask(shape, s, left, top)
        image = render.render(scene_with("striped", shape, s, left, top))
        stripe = (_XS + _YS) % 12 < 5
        np.testing.assert_array_equal(colour_mask(image, COLOURS["blue"]), figure & ~stripe)
        np.testing.assert_array_equal(colour_mask(image, WHITE), ~(figure & ~stripe))


def distance_to_outside(figure):
    """Euclidean distance from every pixel to the nearest pixel centre not in the figure (brute force)."""
    outside = np.argwhere(~figure).astype(float)
    inside = np.argwhere(figure).astype(float)
    distances = np.zeros(figure.shape)
    nearest = np.sqrt(((inside[:, None, :] - outside[None, :, :]) ** 2).sum(-1)).min(1)
    distances[figure] = nearest
    return distances


@pytest.mark.parametrize("shape", SHAPES)
def test_outlined_colours_only_figure_pixels_within_4px_of_the_boundary(shape):
    for s, left, top in [(28, 5, 6), (35, 12, 3), (44, 9, 14)]:
        figure = figure_mask(shape, s, left, top)
        image = render.render(scene_with("outlined", shape, s, left, top))
        band = figure & (distance_to_outside(figure) <= 4)
        np.testing.assert_array_equal(colour_mask(image, COLOURS["blue"]), band)
        assert colour_mask(image, WHITE)[figure & ~band].all(), "the interior is white"
        assert (figure & ~band).any(), "figures of this size have an interior"


def test_outlined_square_is_a_4px_frame():
    for s, left, top in PLACEMENTS:
        image = render.render(scene_with("outlined", "square", s, left, top))
        expected = np.zeros((CANVAS, CANVAS), dtype=bool)
        expected[top : top + s, left : left + s] = True
        expected[top + 4 : top + s - 4, left + 4 : left + s - 4] = False
        np.testing.assert_array_equal(colour_mask(image, COLOURS["blue"]), expected)


# ------------------------------------------------------------------------------------------------- characters
@pytest.mark.parametrize("name", list(CHARACTERS))
def test_characters_are_plain_figures_of_their_colour_and_shape(name):
    rng = np.random.default_rng(4)
    for style in (None, "striped", "outlined"):
        scene = make_scene(rng, character=name, style=style)
        colour, shape = CHARACTERS[name]
        assert (scene.character, scene.colour, scene.shape, scene.style) == (name, colour, shape, "plain")
        image = render.render(scene)
        body = ~colour_mask(image, BACKGROUND)
        # plain: the face is drawn on a solid figure, which is exactly the plain object of the same geometry
        np.testing.assert_array_equal(body, figure_mask(shape, scene.size, scene.left, scene.top))


def face_parts(name, s, left, top):
    """Ideal features: list of (sdf, centre, kind) for the character's eyes and mouth."""
    cx, cy = left + s / 2, top + s / 2
    if name == "Zog":
        d = max(7, round(s / 4))
        return [(sdf_disc(cx, cy + s / 8, d), (cx, cy + s / 8), "eye")]
    d = max(5, round(s / 6))
    parts = [(sdf_disc(x, cy - s / 8, d), (x, cy - s / 8), "eye") for x in (cx - s / 5, cx + s / 5)]
    if name == "Miro":
        thickness = max(3, round(s / 10))
        parts.append((sdf_rectangle(cx, cy + s / 5, s / 2, thickness), (cx, cy + s / 5), "mouth"))
    return parts


@pytest.mark.parametrize("name", list(CHARACTERS))
def test_character_faces_match_the_spec(name):
    colour, shape = CHARACTERS[name]
    for s, left, top in PLACEMENTS:
        image = render.render(Scene(shape, colour, "plain", name, s, left, top))
        features = colour_mask(image, FEATURE_COLOUR)
        parts = face_parts(name, s, left, top)
        assert_brackets(features, np.min([sdf for sdf, _, _ in parts], axis=0), f"{name} s={s}")
        found = components(features)
        assert len(found) == len(parts), f"{name} s={s}: {len(found)} separate features, want {len(parts)}"
        # every feature lies on the figure, and the rest of the figure keeps its colour
        figure = figure_mask(shape, s, left, top)
        assert not (features & ~figure).any()
        np.testing.assert_array_equal(colour_mask(image, COLOURS[colour]), figure & ~features)
        for _, (px, py), kind in parts:
            closest = min(found, key=lambda c: math.hypot(np.mean(c, 0)[1] + 0.5 - px, np.mean(c, 0)[0] + 0.5 - py))
            ys, xs = np.array(closest).T
            assert abs(xs.mean() + 0.5 - px) <= 0.5 and abs(ys.mean() + 0.5 - py) <= 0.5, f"{name} {kind} s={s}"
            if kind == "mouth":
                thickness = max(3, round(s / 10))
                assert len(np.unique(ys)) == thickness, f"Miro s={s}: mouth {len(np.unique(ys))} rows thick"
                assert abs(len(np.unique(xs)) - s / 2) <= 0.5, f"Miro s={s}: mouth {len(np.unique(xs))} px wide"
            else:
                d = max(7, round(s / 4)) if name == "Zog" else max(5, round(s / 6))
                assert abs(len(np.unique(xs)) - d) <= 1 and abs(len(np.unique(ys)) - d) <= 1


def test_character_feature_sizes_follow_the_formulas():
    assert render.eye_diameter("Pip", 28) == 5 and render.eye_diameter("Pip", 44) == 7
    assert render.eye_diameter("Miro", 36) == 6
    assert render.eye_diameter("Zog", 28) == 7 and render.eye_diameter("Zog", 44) == 11


# --------------------------------------------------------------------------------------- determinism, labels
def test_same_seed_same_scenes_and_images():
    from erasure.toyworld.captions import sample_dataset

    images_a, captions_a, scenes_a = sample_dataset(40, seed=7)
    images_b, captions_b, scenes_b = sample_dataset(40, seed=7)
    np.testing.assert_array_equal(images_a, images_b)
    assert captions_a == captions_b and scenes_a == scenes_b
    images_c, _, _ = sample_dataset(40, seed=8)
    assert not np.array_equal(images_a, images_c)
    for scene, image in zip(scenes_a, images_a, strict=True):
        np.testing.assert_array_equal(render.render(scene), image)  # rendering is a pure function of the scene


def test_labels_describe_the_scene():
    rng = np.random.default_rng(5)
    obj = make_scene(rng, shape="cross", colour="purple", style="striped")
    assert obj.labels() == {
        "shape": "cross", "colour": "purple", "style": "striped", "character": "none",
        "size": obj.size, "left": obj.left, "top": obj.top,
    }  # fmt: skip
    pip = make_scene(rng, character="Pip")
    assert pip.labels()["character"] == "Pip" and pip.labels()["colour"] == "yellow"


@pytest.mark.parametrize(
    "call",
    [
        lambda: render.shape_mask("hexagon", 30, 5, 5),
        lambda: render.style_mask(np.zeros((64, 64), bool), "dotted"),
        lambda: render.feature_mask("Bob", 30, 5, 5),
        lambda: make_scene(np.random.default_rng(0), character="Bob"),
    ],
)
def test_unknown_names_raise_with_the_allowed_values(call):
    with pytest.raises(ValueError, match="expected one of"):
        call()


def test_rendered_training_images_come_with_masks_of_their_figures(tmp_path):
    from conftest import load_script

    from erasure.files import load_training_images

    script = load_script("render_toyworld_images.py")
    assert script.main(["--concept", "red", "--count", "3", "--seed", "1", "--out", str(tmp_path / "red")]) == 0
    images = load_training_images(tmp_path / "red")
    assert len(images) == 3
    for image in images:
        pixels, mask = np.asarray(image), np.asarray(image.info["mask"]) > 127
        drawn = (pixels != np.asarray(BACKGROUND, dtype=np.uint8)).any(-1)
        assert drawn.any() and not (drawn & ~mask).any()  # everything drawn lies on the figure's mask
        assert (pixels[drawn] == np.asarray(render.COLOURS["red"], dtype=np.uint8)).all()  # red, in any style
    with pytest.raises(SystemExit, match="exists"):
        script.main(["--concept", "red", "--out", str(tmp_path / "red")])
