"""Pictures of detections: translucent masks, outlines, score tags and a legend drawn onto an image.

Everything is numpy in, numpy out (H, W, 3 uint8 RGB), so the same drawing serves still images, video frames
and notebooks. Mask blending is one vectorised pass over the image; only the text goes through PIL.
"""

from __future__ import annotations

import colorsys
import functools
import os
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .files import atomic_path
from .masks import MaskCrops

__all__ = ["class_color", "instance_colors", "draw_detections", "save_png", "to_display_uint8", "paint_order",
           "topmost_instance"]

_GOLDEN_RATIO = 0.6180339887498949
# (saturation, value) pairs cycled alongside the hue so that colours whose hues end up close (there are
# only so many distinguishable hues for 80 classes) still differ in strength. Golden-ratio hues come back
# closest after 21, 34, 55 and 89 steps; a cycle of four never repeats its tone at those distances. Value
# stays >= 0.8 and saturation >= 0.5 so no colour is near black (lost on dark photos) or near white.
_TONES = ((0.85, 1.00), (0.50, 1.00), (1.00, 0.80), (0.65, 0.88))
_LEGEND_MAX_SWATCH_STRIPES = 4


def _palette_color(index: int) -> tuple[int, int, int]:
    """Golden-ratio hue steps: any two consecutive indices are about 137 degrees apart on the colour wheel,
    and the sequence never settles into a pattern, so neighbours in a list are always easy to tell apart."""
    hue = (0.12 + index * _GOLDEN_RATIO) % 1.0
    saturation, value = _TONES[index % len(_TONES)]
    r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def class_color(label: int) -> tuple[int, int, int]:
    """Colour of a class id, the same in every picture and in the semantic palette PNG."""
    return _palette_color(int(label))


def instance_colors(n: int) -> list[tuple[int, int, int]]:
    """`n` distinct colours, one per detection, the same for the same `n` every time."""
    return [_palette_color(i) for i in range(int(n))]


def _lighter(color, amount: float = 0.45) -> tuple[int, int, int]:
    """Outlines are drawn lighter than the fill so the mask edge stays visible over its own tint."""
    return tuple(int(round(c + (255 - c) * amount)) for c in color)


def _text_color(background) -> tuple[int, int, int]:
    """Black or white, whichever has the higher WCAG contrast ratio against `background`."""
    channels = np.asarray(background, dtype=np.float64) / 255.0
    linear = np.where(channels <= 0.04045, channels / 12.92, ((channels + 0.055) / 1.055) ** 2.4)
    luminance = float(linear @ np.array([0.2126, 0.7152, 0.0722]))
    contrast_with_black = (luminance + 0.05) / 0.05
    contrast_with_white = 1.05 / (luminance + 0.05)
    return (0, 0, 0) if contrast_with_black >= contrast_with_white else (255, 255, 255)


def to_display_uint8(image: np.ndarray) -> np.ndarray:
    """Any common image array as (H, W, 3) uint8 RGB.

    16-bit and other integer images are stretched to their own maximum (microscopy and depth images often use
    a small part of the range and would otherwise look black); float images are taken as 0..1 when their
    maximum is at most 1, else as 0..255. Gray is repeated to three channels and an alpha channel dropped.
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"expected an image of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), "
                         f"got {image.shape}")
    if image.dtype != np.uint8:
        if image.dtype == np.bool_:
            pixels, top = image.astype(np.float32), 1.0
        elif np.issubdtype(image.dtype, np.floating):
            pixels = np.nan_to_num(image.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
            top = 1.0 if float(pixels.max(initial=0.0)) <= 1.0 else 255.0
        elif np.issubdtype(image.dtype, np.integer):
            pixels = image.astype(np.float32)
            top = max(float(pixels.max(initial=0.0)), 1.0)
        else:
            raise ValueError(f"cannot display an image of dtype {image.dtype}")
        image = np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image)


def paint_order(scores: np.ndarray) -> np.ndarray:
    """Indices in the order to paint detections so the best ends up on top: lowest score first; among equal
    scores the one earlier in the arrays is painted later, so it wins like a higher score would."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    return np.argsort(-scores, kind="stable")[::-1]


def topmost_instance(masks, scores: np.ndarray) -> np.ndarray:
    """(H, W) int32 index of the detection seen at each pixel (highest score among overlapping masks), -1 where
    none; `masks` (N, H, W) or a `MaskCrops`. Shared by the pictures and the semantic/instance maps so they
    always agree about overlaps."""
    return MaskCrops.coerce(masks).paint(paint_order(scores))


@functools.lru_cache(maxsize=16)
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: only the small fixed bitmap font
        return ImageFont.load_default()


def _sizes(height: int, width: int) -> dict:
    """Text and line sizes that grow with the picture, so tags are readable on a 256 px thumbnail and not
    tiny on a 4K frame."""
    longest = max(height, width)
    font_size = int(np.clip(round(longest * 0.017), 10, 40))
    return {
        "font": font_size,
        "line": max(1, int(round(longest / 700))),
        "contour": 1 if longest < 900 else 2,
        "pad": max(2, font_size // 5),
    }


def _text_extent(font) -> tuple[int, int]:
    """Top and bottom of the tallest glyphs, so every tag has the same height whatever its letters."""
    _, top, _, bottom = font.getbbox("Agjy|0.9")
    return top, bottom


def _boundary(region: np.ndarray, thickness: int) -> np.ndarray:
    """Pixels of `region` within `thickness` of its edge (4-neighbour erosion). The image border does not count
    as an edge, so a mask cut off by the frame is not outlined along the frame."""
    inner = region
    for _ in range(thickness):
        padded = np.pad(inner, 1, mode="edge")
        inner = (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1]
                 & padded[1:-1, :-2] & padded[1:-1, 2:])
    return region & ~inner


def _check_inputs(image, boxes, labels, scores, masks):
    n = len(boxes)
    if boxes.shape != (n, 4):
        raise ValueError(f"boxes must have shape (N, 4), got {boxes.shape}")
    if labels.shape != (n,):
        raise ValueError(f"expected {n} labels (one per box), got shape {labels.shape}")
    if scores is not None and scores.shape != (n,):
        raise ValueError(f"expected {n} scores (one per box), got shape {scores.shape}")
    shape = getattr(masks, "shape", None) if not isinstance(masks, MaskCrops) else (len(masks), *masks.image_size)
    if masks is not None and shape != (n, *image.shape[:2]):
        raise ValueError(f"masks must have shape (N, H, W) = {(n, *image.shape[:2])} to match the boxes and "
                         f"the image, got {shape}")


def draw_detections(image: np.ndarray, boxes, labels, scores=None, masks=None, class_names=None, *,
                    alpha: float = 0.45, show_legend: bool = True, color_by: str = "instance", colors=None,
                    texts=None, keypoints=None, skeleton=()) -> np.ndarray:
    """Detections drawn onto a copy of `image`; returns (H, W, 3) uint8 RGB.

    Masks are tinted with `alpha` opacity and outlined, boxes outlined, and each detection tagged
    "name 0.93"; `masks` are (N, H, W) or a `MaskCrops`. Where masks overlap, the higher score is shown.
    `color_by="instance"` gives every detection its own colour (best for telling touching objects apart);
    `"class"` colours by class (stable across images and video frames). With no detections the image comes
    back unchanged (as uint8 RGB). `colors` (one RGB per detection) and `texts` (one tag per detection) replace
    the chosen colouring and the "name score" tags (the tracker's overlay: a colour and an id per track).
    `keypoints` (N, K, 3) = x, y, visibility: each visible one (v > 0) is a dot in its detection's colour,
    joined along `skeleton` (pairs of 1-based keypoint numbers, as COCO's).
    """
    if color_by not in ("instance", "class"):
        raise ValueError(f"color_by must be 'instance' or 'class', got {color_by!r}")
    out = to_display_uint8(image).copy()
    height, width = out.shape[:2]
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    scores = None if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)
    if masks is not None and not isinstance(masks, MaskCrops):
        masks = np.asarray(masks, dtype=bool)
        if masks.ndim == 3:  # else _check_inputs says what is wrong
            masks = MaskCrops.from_full(masks)
    _check_inputs(out, boxes, labels, scores, masks)
    n = len(boxes)
    if keypoints is not None and (np.ndim(keypoints) != 3 or len(keypoints) != n or np.shape(keypoints)[2] != 3):
        raise ValueError(f"keypoints must have shape ({n}, K, 3), got {np.shape(keypoints)}")
    if n == 0:
        return out
    class_names = list(class_names) if class_names is not None else []

    def name_of(label: int) -> str:
        return class_names[label] if 0 <= label < len(class_names) else f"class {label}"

    if colors is not None:
        colors = np.asarray(colors, dtype=np.uint8).reshape(n, 3)
    elif color_by == "class":
        colors = np.array([class_color(label) for label in labels], dtype=np.uint8)
    else:
        colors = np.array(instance_colors(n), dtype=np.uint8)
    order = paint_order(scores if scores is not None else np.zeros(n))
    sizes = _sizes(height, width)

    # How much the legend would hide at each pixel: masks (or boxes) count 1, tags count more, being the
    # part of the picture people read.
    occupied = np.zeros((height, width), dtype=np.float32)
    if masks is not None:
        _paint_masks(out, occupied, masks, scores if scores is not None else np.zeros(n), colors, order, alpha,
                     sizes["contour"])

    picture = Image.fromarray(out)
    draw = ImageDraw.Draw(picture, "RGBA")
    font = _font(sizes["font"])
    text_top, text_bottom = _text_extent(font)
    pad = sizes["pad"]
    tag_height = text_bottom - text_top + 2 * pad
    for i in order:
        color = tuple(int(c) for c in colors[i])
        x1, y1, x2, y2 = (int(round(v)) for v in boxes[i])
        x2, y2 = max(x2 - 1, x1), max(y2 - 1, y1)  # xyxy corners are exclusive; PIL's rectangle is inclusive
        draw.rectangle([x1, y1, x2, y2], outline=color, width=sizes["line"])
        if keypoints is not None:
            _draw_keypoints(draw, np.asarray(keypoints[i], dtype=np.float64), skeleton, color, sizes["line"])
        if masks is None:
            occupied[max(y1, 0):max(y2 + 1, 0), max(x1, 0):max(x2 + 1, 0)] = 1.0
        if texts is not None:
            text = str(texts[i])
        else:
            text = name_of(int(labels[i])) if scores is None else f"{name_of(int(labels[i]))} {scores[i]:.2f}"
        left, _, right, _ = font.getbbox(text)
        tag_width = right - left + 2 * pad
        # Above the box if there is room, else just inside its top edge; never outside the picture.
        tag_y = y1 - tag_height if y1 - tag_height >= 0 else y1
        tag_y = int(np.clip(tag_y, 0, max(height - tag_height, 0)))
        tag_x = int(np.clip(x1, 0, max(width - tag_width, 0)))
        draw.rectangle([tag_x, tag_y, tag_x + tag_width - 1, tag_y + tag_height - 1], fill=color)
        occupied[tag_y:tag_y + tag_height, tag_x:tag_x + tag_width] = 4.0
        draw.text((tag_x + pad - left, tag_y + pad - text_top), text, font=font, fill=_text_color(color))

    if show_legend:
        _draw_legend(draw, labels, colors, name_of, occupied, font, (text_top, text_bottom), pad)
    return np.asarray(picture.convert("RGB"))


def _draw_keypoints(draw, points: np.ndarray, skeleton, color, line: int) -> None:
    """One detection's visible keypoints (K, 3) as dots, joined by the skeleton's edges, lighter lines
    under the dots."""
    visible = points[:, 2] > 0
    for a, b in skeleton:
        if 1 <= a <= len(points) and 1 <= b <= len(points) and visible[a - 1] and visible[b - 1]:
            draw.line([tuple(points[a - 1, :2]), tuple(points[b - 1, :2])], fill=_lighter(color), width=line + 1)
    radius = line + 2
    for x, y, _ in points[visible]:
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color, outline=(255, 255, 255))


def _paint_masks(out: np.ndarray, occupied: np.ndarray, masks: MaskCrops, scores: np.ndarray, colors: np.ndarray,
                 order, alpha: float, contour: int) -> None:
    """Tints `out` where each mask is the topmost one (marking those pixels 1 in `occupied`) and outlines
    each mask `contour` pixels wide in a lighter shade of its colour."""
    height, width = occupied.shape
    owner = topmost_instance(masks, scores)
    covered = owner >= 0
    occupied[covered] = 1.0
    tint = colors[owner[covered]].astype(np.float32)
    out[covered] = (out[covered].astype(np.float32) * (1.0 - alpha) + tint * alpha + 0.5).astype(np.uint8)
    for i in order:
        if masks.crops[i].size == 0:
            continue
        rows, cols = masks.window(i)  # the mask's bounding box (crops are tight)
        # The mask's bounding box plus a margin: the margin is what lets its outermost pixels be seen
        # as edges (only the true image border is padded by repetition).
        window = (slice(max(rows.start - contour, 0), min(rows.stop + contour, height)),
                  slice(max(cols.start - contour, 0), min(cols.stop + contour, width)))
        edge = _boundary(owner[window] == i, contour)
        out[window][edge] = _lighter(colors[i])


def _draw_legend(draw, labels, colors, name_of, occupied, font, text_extent, pad) -> None:
    """Class names with a colour swatch and a count, in the image corner that hides the fewest detections.
    In instance colouring a class has several colours, so its swatch shows (up to four of) them as stripes."""
    height, width = occupied.shape
    text_top, text_bottom = text_extent
    line_height = text_bottom - text_top
    row_height = line_height + pad
    classes: dict[int, list[int]] = {}
    for i, label in enumerate(labels.tolist()):
        classes.setdefault(label, []).append(i)
    entries = sorted(classes.items(), key=lambda item: (-len(item[1]), name_of(item[0])))

    margin = pad * 2
    # At most about half the picture's height, so on small images the legend does not hide the detections.
    max_rows = max(1, (height // 2 - pad) // row_height)
    hidden = 0
    if len(entries) > max_rows:
        hidden = len(entries) - (max_rows - 1)
        entries = entries[:max_rows - 1]
    rows = [(name_of(label), str(len(members)), members, label) for label, members in entries]
    if hidden:
        rows.append((f"+{hidden} more", "", [], None))

    swatch = line_height
    name_width = max(font.getbbox(name)[2] for name, *_ in rows)
    count_width = max((font.getbbox(count)[2] for _, count, *_ in rows), default=0)
    box_width = pad + swatch + pad + name_width + 2 * pad + count_width + pad
    box_height = pad + len(rows) * row_height
    box_width, box_height = min(box_width, width), min(box_height, height)

    corners = {  # preference order when several corners are equally free
        "top-right": (width - margin - box_width, margin),
        "top-left": (margin, margin),
        "bottom-right": (width - margin - box_width, height - margin - box_height),
        "bottom-left": (margin, height - margin - box_height),
    }

    def hidden_pixels(corner):
        x, y = corners[corner]
        x, y = max(x, 0), max(y, 0)
        return float(occupied[y:y + box_height, x:x + box_width].sum())

    x0, y0 = corners[min(corners, key=hidden_pixels)]
    x0, y0 = max(x0, 0), max(y0, 0)
    draw.rectangle([x0, y0, x0 + box_width - 1, y0 + box_height - 1], fill=(0, 0, 0, 150))
    for row, (name, count, members, _) in enumerate(rows):
        y = y0 + pad + row * row_height
        sx = x0 + pad
        if members:
            stripes = list(dict.fromkeys(tuple(int(c) for c in colors[i]) for i in members))
            stripes = stripes[:_LEGEND_MAX_SWATCH_STRIPES]
            for k, stripe in enumerate(stripes):
                left = sx + k * swatch // len(stripes)
                right = sx + (k + 1) * swatch // len(stripes) - 1
                draw.rectangle([left, y, max(right, left), y + swatch - 1], fill=stripe)
        text_x = sx + swatch + pad
        draw.text((text_x, y - text_top), name, font=font, fill=(255, 255, 255))
        if count:
            count_x = x0 + box_width - pad - font.getbbox(count)[2]
            draw.text((count_x, y - text_top), count, font=font, fill=(255, 255, 255))


def save_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a picture as PNG. uint8 arrays are written as they are (gray, RGB or RGBA); anything else is
    first made displayable with `to_display_uint8`."""
    array = np.asarray(array)
    keep = array.dtype == np.uint8 and (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4)))
    if not keep:
        array = to_display_uint8(array)
    with atomic_path(path) as tmp:  # never a half-written PNG under the final name (a full disk, a kill)
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG")
