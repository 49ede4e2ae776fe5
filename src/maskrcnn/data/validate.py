"""Checks of a COCO instances json, and of the image headers it points at, before anything is trained.

Every image and annotation is checked and every problem is collected, so one run names all of them (the
first MAX_LISTED lines, and the count) instead of failing on the first, or an hour into training. What is
checked is what pycocotools and the dataset rely on: pycocotools rasterizes whatever it is given, so a NaN
or 1e8 polygon coordinate, or RLE counts that do not add up to the image, make it allocate without bound
or read out of bounds (a segfault, not an exception). Images are checked from their headers only (size
after EXIF rotation, and that JPEG/PNG files are not cut short), never decoded.

With `skip_invalid` the entries with problems are left out (an image with a problem takes its annotations
along) and one warning line says how many.
"""

from __future__ import annotations

import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from maskrcnn.data.images import read_image_size
from maskrcnn.errors import MaskRCNNError

MAX_LISTED = 20
_TOP_LEVEL_KEYS = ("images", "annotations", "categories")
_ANNOTATION_FIELDS = ("image_id", "category_id", "bbox", "segmentation")
# pycocotools rasterizes a polygon by walking its outline at 5x resolution (~100 bytes per pixel of
# outline): 4 million pixels is ~400 MB, far beyond any real outline (COCO's are under 10 thousand).
MAX_POLYGON_OUTLINE = 4_000_000
# A compressed RLE run takes 6 characters up to 2^29; more only for images larger than PIL opens, and
# pycocotools' 32-bit shifts misread longer runs.
_MAX_RUN_CHARS = 6
_HEADER_THREADS = 8


@dataclass
class Report:
    """The problems found in one json, and which entries (by list position) they make unusable."""

    source: str
    problems: list[str] = field(default_factory=list)
    bad: dict[str, set[int]] = field(default_factory=lambda: {key: set() for key in _TOP_LEVEL_KEYS})

    def add(self, section: str, index: int, text: str) -> None:
        self.problems.append(text)
        self.bad[section].add(index)

    def message(self) -> str:
        """One line for one problem; otherwise a summary line, then the first MAX_LISTED problems."""
        if len(self.problems) == 1:
            return self.problems[0]
        lines = [f"{self.source}: {len(self.problems)} problems in the annotations and images (fix them, or "
                 f"pass --skip-invalid / skip_invalid=True to leave out the entries that have them):"]
        lines += [f"  {problem}" for problem in self.problems[:MAX_LISTED]]
        if len(self.problems) > MAX_LISTED:
            lines.append(f"  ... and {len(self.problems) - MAX_LISTED} more")
        return "\n".join(lines)

    def without_problems(self, data: dict) -> tuple[dict, str]:
        """`data` less the bad entries, and annotations of left-out images or categories; and a summary."""
        kept = {key: [entry for index, entry in enumerate(data[key]) if index not in self.bad[key]]
                for key in _TOP_LEVEL_KEYS}
        image_ids = {image["id"] for image in kept["images"]}
        category_ids = {category["id"] for category in kept["categories"]}
        kept["annotations"] = [annotation for annotation in kept["annotations"]
                               if annotation["image_id"] in image_ids and annotation["category_id"] in category_ids]
        counts = {key: len(data[key]) - len(kept[key]) for key in _TOP_LEVEL_KEYS}
        parts = [f"{counts['categories']} categories"] if counts["categories"] else []
        parts += [f"{counts['images']} images", f"{counts['annotations']} annotations"]
        summary = (f"{self.source}: skipped {', '.join(parts[:-1])} and {parts[-1]} with problems "
                   f"({len(self.problems)} problems; first: {self.problems[0]})")
        for key in ("images", "categories"):
            if not kept[key]:
                raise MaskRCNNError(f"{self.source}: no {key} left after leaving out those with problems "
                                    f"({len(self.problems)} problems; first: {self.problems[0]})")
        return {**data, **kept}, summary


def checked_coco(data, source: str, images_dir: Path | None, skip_invalid: bool = False) -> dict:
    """`data` if every entry passes; with problems, a MaskRCNNError listing them, or with `skip_invalid`
    the data without the bad entries (and a warning saying how many were left out).

    `images_dir` None checks the json alone (for evaluation, where no image is read)."""
    report = validate_coco(data, source, images_dir)
    if not report.problems:
        return data
    if not skip_invalid:
        raise MaskRCNNError(report.message())
    data, summary = report.without_problems(data)
    warnings.warn(summary, stacklevel=3)
    return data


def validate_coco(data, source: str, images_dir: Path | None) -> Report:
    """All problems of a COCO instances json (and its image files when `images_dir` is given).

    Raises MaskRCNNError at once only when the top level is unusable (no images, no categories...)."""
    _check_top_level(data, source)
    report = Report(source)
    from maskrcnn.data.validate_keypoints import check_category_keypoints

    category_ids = check_category_keypoints(data["categories"], _check_categories(data["categories"], report), report)
    image_ids, sized = _check_images(data["images"], report, images_dir is not None)
    if images_dir is not None:
        _check_image_files(data["images"], sized, report, Path(images_dir))
    _check_annotations(data["annotations"], report, image_ids, sized, category_ids)
    return report


def _check_top_level(data, source: str) -> None:
    if not isinstance(data, dict):
        raise MaskRCNNError(f"{source}: top level must be a JSON object with 'images', 'annotations', 'categories'")
    for key in _TOP_LEVEL_KEYS:
        if key not in data:
            raise MaskRCNNError(f"{source}: missing top-level key '{key}'")
        if not isinstance(data[key], list):
            raise MaskRCNNError(f"{source}: '{key}' must be a list")
    if not data["images"]:
        raise MaskRCNNError(f"{source}: no images")
    if not data["categories"]:
        raise MaskRCNNError(f"{source}: no categories")


def is_id(value) -> bool:
    """COCO ids are JSON integers (true/false would be read as 1/0 by Python, and collide)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A finite JSON number (not true/false, not an integer too large for a float)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _show(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check_categories(categories: list, report: Report) -> set[int]:
    ids: set[int] = set()
    for index, category in enumerate(categories):
        if not isinstance(category, dict) or "id" not in category:
            report.add("categories", index, f"{report.source}: category at index {index}: missing field 'id'")
        elif not is_id(category["id"]):
            report.add("categories", index, f"{report.source}: category at index {index}: 'id' must be an "
                                            f"integer, got {_show(category['id'])}")
        elif category["id"] in ids:
            report.add("categories", index, f"{report.source}: category id {category['id']} appears twice")
        else:
            ids.add(category["id"])
    return ids


def _check_images(images: list, report: Report, need_file: bool) -> tuple[set[int], dict[int, dict]]:
    """The image ids (first entry of each), and by id the entries with a usable size, against which their
    annotations are checked; problems noted."""
    required = ("id", "file_name", "width", "height") if need_file else ("id", "width", "height")
    ids: set[int] = set()
    sized: dict[int, dict] = {}
    for index, image in enumerate(images):
        problem = _image_entry_problem(image, index, required, ids)
        if problem:
            report.add("images", index, f"{report.source}: {problem}")
        if isinstance(image, dict) and is_id(image.get("id")) and image["id"] not in ids:
            ids.add(image["id"])
            if _is_size(image.get("width")) and _is_size(image.get("height")):
                sized[image["id"]] = image
    return ids, sized


def _is_size(value) -> bool:
    return is_id(value) and value > 0


def _image_entry_problem(image, index: int, required: tuple[str, ...], seen: set[int]) -> str | None:
    if not isinstance(image, dict):
        return f"image at index {index}: must be a JSON object"
    name = f"image {_show(image['id'])}" if "id" in image else f"image at index {index}"
    for key in required:
        if key not in image:
            return f"{name}: missing field '{key}'"
    if not is_id(image["id"]):
        return f"image at index {index}: 'id' must be an integer, got {_show(image['id'])}"
    if image["id"] in seen:
        return f"image id {image['id']} appears twice"
    for key in ("width", "height"):
        if not _is_size(image[key]):
            return f"{name}: '{key}' must be a positive integer, got {_show(image[key])}"
    limit = Image.MAX_IMAGE_PIXELS
    if limit and image["width"] * image["height"] > 2 * limit:
        return f"{name}: {image['width']}x{image['height']} is more pixels than an image can have ({2 * limit})"
    if "file_name" in required and not _confined(image["file_name"]):
        return (f"{name}: 'file_name' must be a relative path inside the images folder, "
                f"got {_show(image['file_name'], 200)}")
    return None


def _confined(name) -> bool:
    """A relative path that stays inside the folder it is joined to (`..` may not climb out).

    Checked on the path as written: a symbolic link inside the images folder is the folder owner's
    choice and is followed; what the json names is not allowed to leave the folder."""
    if not isinstance(name, str) or not name or "\x00" in name or os.path.isabs(name):
        return False
    normal = os.path.normpath(name)
    return normal != "." and normal != ".." and not normal.startswith(".." + os.sep)


def _check_image_files(images: list, sized: dict[int, dict], report: Report, images_dir: Path) -> None:
    """Header of every image whose entry is otherwise fine: it exists, opens, and has the stated size."""
    jobs = [(index, image) for index, image in enumerate(images)
            if index not in report.bad["images"] and sized.get(image["id"]) is image]
    with ThreadPoolExecutor(max_workers=min(_HEADER_THREADS, max(1, len(jobs)))) as pool:
        results = list(pool.map(lambda job: _header_problem(job[1], images_dir, report.source), jobs))
    for (index, _), problem in zip(jobs, results):
        if problem:
            report.add("images", index, problem)


def _header_problem(image: dict, images_dir: Path, source: str) -> str | None:
    path = images_dir / image["file_name"]
    if not path.is_file():
        return f"{path}: image file not found (referenced by image id {image['id']} in {source})"
    try:
        width, height = read_image_size(path)
    except MaskRCNNError as error:
        return f"{error} (image id {image['id']} in {source})"
    if (width, height) != (image["width"], image["height"]):
        return (f"{path}: image is {width}x{height} pixels (after EXIF rotation) but {source} says "
                f"{image['width']}x{image['height']} (image id {image['id']})")
    return None


def _check_annotations(annotations: list, report: Report, image_ids: set[int], sized: dict[int, dict],
                       category_ids: dict[int, int]) -> None:
    seen: set[int] = set()
    for index, annotation in enumerate(annotations):
        problems = _annotation_problems(annotation, index, seen, (image_ids, sized), category_ids)
        for problem in problems:
            report.add("annotations", index, f"{report.source}: {problem}")


def _annotation_problems(annotation, index: int, seen: set, images: tuple[set, dict],
                         category_ids: dict[int, int]) -> list[str]:
    """`category_ids`: the number of keypoints of each usable category (0: none)."""
    if not isinstance(annotation, dict):
        return [f"annotation at index {index}: must be a JSON object"]
    if "id" not in annotation:
        return [f"annotation at index {index}: missing field 'id'"]
    if not is_id(annotation["id"]):
        return [f"annotation at index {index}: 'id' must be an integer, got {_show(annotation['id'])}"]
    if annotation["id"] in seen:
        return [f"annotation id {annotation['id']} appears twice"]
    seen.add(annotation["id"])
    name = f"annotation {annotation['id']}"
    missing = [f"{name}: missing field '{key}'" for key in _ANNOTATION_FIELDS if key not in annotation]
    if missing:
        return missing
    problems = []
    bbox = annotation["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_number(v) for v in bbox)):
        problems.append(f"{name}: 'bbox' must be 4 numbers [x, y, width, height], got {_show(bbox)}")
    if "area" in annotation and not (is_number(annotation["area"]) and annotation["area"] >= 0):
        problems.append(f"{name}: 'area' must be a number >= 0, got {_show(annotation['area'])}")
    if "iscrowd" in annotation and not (is_id(annotation["iscrowd"]) and annotation["iscrowd"] in (0, 1)):
        problems.append(f"{name}: 'iscrowd' must be 0 or 1, got {_show(annotation['iscrowd'])}")
    image_ids, sized = images
    for key, known, what in (("category_id", category_ids, "categories"), ("image_id", image_ids, "images")):
        value = annotation[key]
        if not is_id(value):
            problems.append(f"{name}: '{key}' must be an integer, got {_show(value)}")
        elif value not in known:
            problems.append(f"{name} has {key} {value!r} which is not in '{what}'")
    image = sized.get(annotation["image_id"]) if is_id(annotation["image_id"]) else None
    if image is not None:
        problem = segmentation_problem(annotation["segmentation"], image)
        if problem:
            problems.append(f"{name}: {problem}")
    if is_id(annotation["category_id"]) and annotation["category_id"] in category_ids:
        from maskrcnn.data.validate_keypoints import annotation_keypoints_problem

        problem = annotation_keypoints_problem(annotation, category_ids[annotation["category_id"]], image)
        if problem:
            problems.append(f"{name}: {problem}")
    return problems


def segmentation_problem(segmentation, image: dict) -> str | None:
    """Why pycocotools cannot safely rasterize `segmentation` on `image` (its COCO entry), or None."""
    height, width = image["height"], image["width"]
    if isinstance(segmentation, list):
        for number, polygon in enumerate(segmentation):
            problem = _polygon_problem(polygon, number, height, width)
            if problem:
                return problem
        return None
    if isinstance(segmentation, dict):
        return _rle_problem(segmentation, image)
    return "'segmentation' must be a list of polygons or an RLE object"


def _polygon_problem(polygon, number: int, height: int, width: int) -> str | None:
    if not isinstance(polygon, list) or len(polygon) % 2:
        size = f"has {len(polygon)} numbers" if isinstance(polygon, list) else f"is {_show(polygon, 30)}"
        return f"'segmentation' polygons must be flat lists of x, y pairs; polygon {number} {size}"
    if len(polygon) < 6:
        return f"'segmentation' polygons need at least 3 x, y pairs; polygon {number} has {len(polygon)} numbers"
    try:
        exact = all(type(v) is float or type(v) is int for v in polygon)  # fast path: no bools, strings, None
        points = np.array(polygon, dtype=np.float64).reshape(-1, 2) if exact else None
    except OverflowError:  # an integer beyond float range
        points = None
    if points is None or not np.isfinite(points).all():
        value = next(v for v in polygon if not is_number(v))
        return f"'segmentation' polygon {number} has {_show(value, 30)}, not a finite number"
    x, y = points[:, 0], points[:, 1]
    if x.min() < -width or x.max() > 2 * width or y.min() < -height or y.max() > 2 * height:
        far = points[np.argmax(np.maximum(np.abs(x - width / 2) / width, np.abs(y - height / 2) / height))]
        return (f"'segmentation' polygon {number} has the point ({far[0]:g}, {far[1]:g}), more than an image "
                f"size outside the {width}x{height} image")
    steps = np.abs(np.diff(points, axis=0, append=points[:1]))
    outline = float(np.maximum(steps[:, 0], steps[:, 1]).sum())
    if outline > MAX_POLYGON_OUTLINE:
        return (f"'segmentation' polygon {number} has an outline of {outline:.0f} pixels, over the "
                f"{MAX_POLYGON_OUTLINE} that can be rasterized")
    return None


def _rle_problem(rle: dict, image: dict) -> str | None:
    height, width = image["height"], image["width"]
    if "counts" not in rle or "size" not in rle:
        return "RLE 'segmentation' needs 'counts' and 'size'"
    if not isinstance(rle["size"], list) or rle["size"] != [height, width] or not all(map(is_id, rle["size"])):
        return (f"RLE size {_show(rle['size'])} does not match image {image['id']} height x width "
                f"[{height}, {width}]")
    counts, pixels = rle["counts"], height * width
    if isinstance(counts, list):
        if not all(is_id(count) and count >= 0 for count in counts):
            return "RLE 'counts' must be a string or a list of run lengths (integers >= 0)"
        total = sum(counts)
    elif isinstance(counts, str):
        try:
            total = compressed_rle_total(counts, pixels)
        except ValueError as error:
            return f"RLE 'counts' is not a valid compressed RLE string: {error}"
    else:
        return "RLE 'counts' must be a string or a list of run lengths"
    if total != pixels:
        return f"RLE 'counts' add up to {total} pixels but the image has {height}x{width} = {pixels}"
    return None


def compressed_rle_runs(counts: str, limit: int):
    """The run lengths stored in a COCO compressed RLE string, as pycocotools' rleFrString reads them.

    Each run is 5-bit groups (low first) in characters '0'..'o' (48 + value), bit 0x20 meaning "more
    follows" and bit 0x10 of the last group the sign; from the fourth run on a run is stored as the
    difference to the run two before. Raises ValueError for anything pycocotools would misread: other
    characters, a string ending inside a run, a run over 6 characters, a negative run, or runs adding
    up to more than `limit` (checked as it goes, so no more than the string is ever looked at)."""
    before_last = last = stored = total = value = length = 0
    for position, char in enumerate(counts):
        code = ord(char) - 48
        if not 0 <= code < 64:
            raise ValueError(f"character {char!r} at position {position} is outside '0'..'o'")
        value |= (code & 0x1F) << (5 * length)
        length += 1
        if code & 0x20:
            if length >= _MAX_RUN_CHARS:
                raise ValueError(f"a run longer than {_MAX_RUN_CHARS} characters at position {position}")
            continue
        if code & 0x10:
            value -= 1 << (5 * length)
        if stored > 2:
            value += before_last
        if value < 0:
            raise ValueError(f"run {stored} is negative ({value})")
        total += value
        if total > limit:
            raise ValueError(f"the runs add up to more than {limit} pixels by run {stored}")
        yield value
        before_last, last, stored = last, value, stored + 1
        value = length = 0
    if length:
        raise ValueError("the string ends inside a run")


def compressed_rle_total(counts: str, limit: int) -> int:
    """Sum of the runs of a compressed RLE string (see compressed_rle_runs); no mask is made."""
    return sum(compressed_rle_runs(counts, limit))
