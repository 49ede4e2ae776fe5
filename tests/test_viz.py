"""Pictures of detections: colours, what changes where, input kinds, memory for many detections."""

import numpy as np
import pytest
from PIL import Image

from maskrcnn.viz import _text_color, class_color, draw_detections, instance_colors, save_png

NAMES = ["__background__", "cat", "dog"]
GRAY = 128


def scene(height=100, width=120):
    """A flat gray image with one cat: mask rows 40-59, cols 50-79, box a little larger than the mask."""
    image = np.full((height, width, 3), GRAY, dtype=np.uint8)
    mask = np.zeros((1, height, width), dtype=bool)
    mask[0, 40:60, 50:80] = True
    boxes = np.array([[45.0, 35.0, 85.0, 65.0]])
    return image, boxes, np.array([1]), np.array([0.93]), mask


def distance(a, b):
    return float(np.linalg.norm(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)))


def test_colours_are_deterministic_distinct_and_never_near_black_or_white():
    assert class_color(7) == class_color(7)
    assert instance_colors(6) == instance_colors(6)
    assert instance_colors(3) == instance_colors(6)[:3]
    colors = instance_colors(200)
    assert len(colors) == 200
    for color in colors + [class_color(k) for k in range(100)]:
        assert len(color) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in color)
        assert max(color) >= 180, f"{color} is too dark"
        assert max(color) - min(color) >= 80, f"{color} is too gray or too close to white"
    assert len(set(colors[:20])) == 20
    for a, b in zip(colors, colors[1:]):
        assert distance(a, b) > 80, f"neighbours {a} and {b} look alike"


def test_text_is_black_on_light_tags_and_white_on_dark_ones():
    assert _text_color((255, 255, 0)) == (0, 0, 0)
    assert _text_color((240, 240, 240)) == (0, 0, 0)
    assert _text_color((0, 0, 200)) == (255, 255, 255)
    assert _text_color((20, 20, 20)) == (255, 255, 255)


def test_mask_pixels_are_tinted_towards_the_instance_colour_and_far_pixels_untouched():
    image, boxes, labels, scores, masks = scene()
    original = image.copy()
    out = draw_detections(image, boxes, labels, scores, masks, NAMES, alpha=0.5, show_legend=False)
    assert out.shape == (100, 120, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(image, original)  # the input is not drawn on

    color = instance_colors(1)[0]
    inside = out[50, 65]
    expected = 0.5 * GRAY + 0.5 * np.array(color)
    assert np.abs(inside.astype(float) - expected).max() <= 1.0
    assert distance(inside, color) < distance((GRAY,) * 3, color)
    for y, x in [(2, 2), (97, 117), (90, 10), (5, 110), (50, 20)]:
        assert tuple(out[y, x]) == (GRAY, GRAY, GRAY), (y, x)


def test_mask_edge_is_brighter_than_the_fill_and_box_is_outlined():
    image, boxes, labels, scores, masks = scene()
    out = draw_detections(image, boxes, labels, scores, masks, NAMES, show_legend=False)
    edge, fill = out[40, 65].astype(int), out[50, 65].astype(int)
    assert edge.sum() > fill.sum()
    # the box's left side (x=45) between mask and box is drawn, the gap next to it is not
    assert tuple(out[50, 45]) != (GRAY, GRAY, GRAY)
    assert tuple(out[50, 47]) == (GRAY, GRAY, GRAY)


def test_label_tag_sits_above_the_box_in_the_instance_colour():
    image, boxes, labels, scores, masks = scene()
    out = draw_detections(image, boxes, labels, scores, masks, NAMES, show_legend=False)
    color = np.array(instance_colors(1)[0])
    band = out[20:35, 45:100]  # rows just above the box top (y=35)
    assert (band == color).all(axis=2).sum() > 50
    # the text in it contrasts with the tag
    assert (np.abs(band.astype(int) - color).sum(axis=2) > 200).sum() > 5


def test_tag_stays_inside_the_image_for_a_box_at_the_corner():
    image = np.full((60, 60, 3), GRAY, dtype=np.uint8)
    out = draw_detections(image, np.array([[40.0, 0.0, 60.0, 20.0]]), [1], [0.5], None, NAMES,
                          show_legend=False)
    color = np.array(instance_colors(1)[0])
    tag_pixels = np.argwhere((out == color).all(axis=2))
    # the tag fill is drawn at the top of the image, inside the box's rows rather than above row 0
    assert len(tag_pixels) > 30
    assert tag_pixels[:, 0].min() == 0


@pytest.mark.parametrize("first_is_best", [False, True])
def test_overlap_shows_the_higher_score_wherever_it_is_in_the_arrays(first_is_best):
    image = np.full((120, 120, 3), GRAY, dtype=np.uint8)
    masks = np.zeros((2, 120, 120), dtype=bool)
    masks[0, 50:90, 20:60] = True
    masks[1, 70:110, 40:80] = True
    boxes = np.array([[20.0, 50.0, 60.0, 90.0], [40.0, 70.0, 80.0, 110.0]])
    scores = [0.9, 0.3] if first_is_best else [0.3, 0.9]
    out = draw_detections(image, boxes, [1, 2], scores, masks, NAMES, alpha=0.6, show_legend=False)
    first, second = instance_colors(2)  # colours follow the array order: detection 0 gets the first
    if first_is_best:
        assert distance(out[85, 55], first) < distance(out[85, 55], second)
        return
    low, high = first, second
    assert distance(out[85, 55], high) < distance(out[85, 55], low)  # overlap, away from tags and edges
    assert distance(out[75, 30], low) < distance(out[75, 30], high)  # only the low-score mask
    assert distance(out[100, 70], high) < distance(out[100, 70], low)  # only the high-score mask


def test_colour_by_class_gives_same_class_the_same_colour():
    image = np.full((60, 60, 3), GRAY, dtype=np.uint8)
    masks = np.zeros((2, 60, 60), dtype=bool)
    masks[0, 30:40, 5:20] = True
    masks[1, 30:40, 35:50] = True
    boxes = np.array([[5.0, 30.0, 20.0, 40.0], [35.0, 30.0, 50.0, 40.0]])
    by_class = draw_detections(image, boxes, [2, 2], [0.9, 0.8], masks, NAMES, show_legend=False, color_by="class")
    assert tuple(by_class[35, 12]) == tuple(by_class[35, 42])
    assert distance(by_class[35, 12], class_color(2)) < distance((GRAY,) * 3, class_color(2))
    by_instance = draw_detections(image, boxes, [2, 2], [0.9, 0.8], masks, NAMES, show_legend=False)
    assert tuple(by_instance[35, 12]) != tuple(by_instance[35, 42])
    with pytest.raises(ValueError):
        draw_detections(image, boxes, [2, 2], [0.9, 0.8], masks, NAMES, color_by="rainbow")


def test_legend_goes_to_a_free_corner():
    image = np.full((200, 200, 3), GRAY, dtype=np.uint8)
    masks = np.zeros((1, 200, 200), dtype=bool)
    masks[0, 0:80, 120:200] = True  # fills the top-right corner
    boxes = np.array([[120.0, 0.0, 200.0, 80.0]])
    plain = draw_detections(image, boxes, [1], [0.8], masks, NAMES, show_legend=False)
    with_legend = draw_detections(image, boxes, [1], [0.8], masks, NAMES, show_legend=True)
    changed = np.argwhere((plain != with_legend).any(axis=2))
    assert len(changed) > 100
    assert changed[:, 1].max() < 100  # all on the left half, away from the detection


def test_no_detections_returns_the_image_unchanged():
    image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    out = draw_detections(image, np.zeros((0, 4)), np.zeros(0, dtype=int), np.zeros(0),
                          np.zeros((0, 30, 40), dtype=bool), NAMES)
    np.testing.assert_array_equal(out, image)


def test_grayscale_input_becomes_rgb():
    image, boxes, labels, scores, masks = scene()
    out = draw_detections(image[:, :, 0], boxes, labels, scores, masks, NAMES, show_legend=False)
    assert out.shape == (100, 120, 3) and out.dtype == np.uint8
    assert tuple(out[2, 2]) == (GRAY, GRAY, GRAY)


def test_uint16_and_float_inputs_are_scaled_for_display():
    _, boxes, labels, scores, masks = scene()
    deep = np.full((100, 120), 2000, dtype=np.uint16)
    deep[0, 0] = 4000  # the brightest pixel maps to 255, so 2000 maps to about half
    out = draw_detections(deep, boxes, labels, scores, masks, NAMES, show_legend=False)
    assert out.dtype == np.uint8 and out.shape == (100, 120, 3)
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert abs(int(out[2, 2, 0]) - 128) <= 1

    unit = np.full((100, 120, 3), 0.25, dtype=np.float32)
    out = draw_detections(unit, boxes, labels, scores, masks, NAMES, show_legend=False)
    assert abs(int(out[2, 2, 1]) - 64) <= 1


def test_masks_must_match_the_image():
    image, boxes, labels, scores, _ = scene()
    with pytest.raises(ValueError):
        draw_detections(image, boxes, labels, scores, np.zeros((1, 50, 50), dtype=bool), NAMES)


def test_hundred_detections_draw_in_bounded_memory():
    """A hundred full-image masks are drawn from tight crops: the extra memory stays well under the size of the
    mask stack itself (100 x H x W booleans, 30.7 MB), which any per-detection full-image copy (a float copy of
    the stack is 123 MB) exceeds. Measured peak: 7.1 MB."""
    import tracemalloc

    rng = np.random.default_rng(1)
    height, width = 480, 640
    corners = rng.uniform(0, [width - 60, height - 60], (100, 2))
    sizes = rng.uniform(10, 60, (100, 2))
    boxes = np.concatenate([corners, corners + sizes], axis=1)
    masks = np.zeros((100, height, width), dtype=bool)
    for i, (x1, y1, x2, y2) in enumerate(boxes.astype(int)):
        masks[i, y1:y2, x1:x2] = True
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    labels = rng.integers(1, 3, 100)
    scores = rng.uniform(0.05, 1.0, 100)
    draw_detections(image, boxes, labels, scores, masks, NAMES)  # warm-up: font loading and caches
    tracemalloc.start()
    try:
        out = draw_detections(image, boxes, labels, scores, masks, NAMES)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < masks.nbytes // 2, f"drawing took {peak / 1e6:.1f} MB"
    assert out.shape == (height, width, 3)
    # every masked pixel is tinted (a 45% blend with a saturated colour leaves no pixel of this random image as it was)
    assert (out != image).any(axis=2)[masks.any(axis=0)].all()


def test_save_png_round_trip(tmp_path):
    picture = np.random.default_rng(2).integers(0, 256, (12, 9, 3), dtype=np.uint8)
    save_png(tmp_path / "sub" / "p.png", picture)
    with Image.open(tmp_path / "sub" / "p.png") as loaded:
        np.testing.assert_array_equal(np.array(loaded), picture)
