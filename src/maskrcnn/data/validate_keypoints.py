"""Checks of the COCO keypoint fields (as in person_keypoints_*.json), called by maskrcnn/data/validate.py.

Categories: `keypoints` is a non-empty list of distinct names and `skeleton` a list of [a, b] pairs of
1-based indices into it (COCO's convention). Every category that defines keypoints must define the same
list, since one keypoint head predicts one set of keypoints for every detection.

Annotations of a category with K keypoints: `keypoints` is a list of 3K finite numbers, x, y, v per keypoint
in image pixels, v in {0, 1, 2} as in COCO (0 not labelled, 1 labelled but hidden, 2 visible), no point
more than an image size outside the image (as polygons; float32 targets would turn 1e308 into inf).
`num_keypoints` may be left out (it is then filled in as the count of v > 0, where pycocotools needs it);
when it is given it must equal that count: pycocotools ignores a ground truth whose num_keypoints is 0
whatever its keypoints say, so a wrong count would silently change what is evaluated. Annotations of a
category without keypoints may not carry any (there is nothing they could be the keypoints of).
"""

from __future__ import annotations

from maskrcnn.data.validate import Report, _show, is_id, is_number


def check_category_keypoints(categories: list, ids: set[int], report: Report) -> dict[int, int]:
    """The number of keypoints of every usable category id (0 for categories without keypoints)."""
    counts = {category_id: 0 for category_id in ids}
    reference = None  # (category id, names) of the first category with keypoints
    for index, category in enumerate(categories):
        if index in report.bad["categories"] or not isinstance(category, dict) or category.get("keypoints", []) == []:
            continue  # no keypoints ([] as in some exporters' files)
        name = f"{report.source}: category {category['id']}"
        names, skeleton = category["keypoints"], category.get("skeleton", [])
        problem = _names_problem(names) or _skeleton_problem(skeleton, names)
        if problem is None and reference is not None and names != reference[1]:
            problem = (f"'keypoints' differ from those of category {reference[0]} (one model predicts one set "
                       f"of keypoints for every class)")
        if problem:
            report.add("categories", index, f"{name}: {problem}")
            continue
        reference = reference or (category["id"], names)
        counts[category["id"]] = len(names)
    return counts


def _names_problem(names) -> str | None:
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        return f"'keypoints' must be a non-empty list of keypoint names, got {_show(names)}"
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        return f"'keypoints' names {twice!r} twice"
    return None


def _skeleton_problem(skeleton, names: list) -> str | None:
    if not isinstance(skeleton, list):
        return f"'skeleton' must be a list of [a, b] keypoint numbers (1-based), got {_show(skeleton)}"
    for edge in skeleton:
        if not (isinstance(edge, list) and len(edge) == 2 and all(is_id(k) and 1 <= k <= len(names) for k in edge)):
            return (f"'skeleton' must be a list of [a, b] keypoint numbers from 1 to {len(names)}, "
                    f"has {_show(edge)}")
    return None


def annotation_keypoints_problem(annotation: dict, count: int, image: dict | None) -> str | None:
    """Why the keypoint fields of `annotation` (of a category with `count` keypoints, on `image`: its COCO
    entry, None when it has no usable size) are unusable, or None."""
    if "keypoints" not in annotation:
        if count:
            return f"missing field 'keypoints' (category {annotation['category_id']} has {count} keypoints)"
        return None
    values = annotation["keypoints"]
    if not count:
        if values == []:
            return None
        return f"has 'keypoints' but category {annotation['category_id']} defines none"
    if not isinstance(values, list) or len(values) != 3 * count:
        got = f"{len(values)} numbers" if isinstance(values, list) else _show(values)
        return (f"'keypoints' must be {3 * count} numbers (x, y, v for each of the {count} keypoints of "
                f"category {annotation['category_id']}), got {got}")
    for value in values:
        if not is_number(value):
            return f"'keypoints' has {_show(value, 30)}, not a finite number"
    for number, (x, y, visibility) in enumerate(zip(values[0::3], values[1::3], values[2::3])):
        if visibility not in (0, 1, 2):
            return f"'keypoints' visibility of keypoint {number + 1} must be 0, 1 or 2, got {_show(visibility)}"
        if image is not None and not (-image["width"] <= x <= 2 * image["width"]
                                      and -image["height"] <= y <= 2 * image["height"]):
            return (f"'keypoints' has keypoint {number + 1} at ({x:g}, {y:g}), more than an image size outside "
                    f"the {image['width']}x{image['height']} image")
    labelled = labelled_keypoints(values)
    if "num_keypoints" in annotation and not (is_id(annotation["num_keypoints"])
                                              and annotation["num_keypoints"] == labelled):
        return (f"'num_keypoints' is {_show(annotation['num_keypoints'])} but {labelled} keypoints are labelled "
                f"(v > 0)")
    return None


def labelled_keypoints(values: list) -> int:
    """COCO's num_keypoints of a checked 'keypoints' list: how many have v > 0."""
    return sum(1 for visibility in values[2::3] if visibility > 0)
