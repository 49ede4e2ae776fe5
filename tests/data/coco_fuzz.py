"""Malformed COCO datasets for the property test of data/validate.py, run in a child process.

A child, because the property is about crashes and memory: pycocotools segfaults or allocates without
bound on some inputs, which would take pytest (or the machine) down with it. The child caps its address
space at what it has after its imports + 2 GiB (RLIMIT_AS: a runaway allocation fails there instead of
eating the machine) and prints its peak resident memory (/proc VmHWM; getrusage ru_maxrss would report the parent pytest
process's peak, which it keeps across exec) as its last line, which
the test checks is under 2 GiB.

    python tests/data/coco_fuzz.py fuzz N        N examples of test_coco_validation's property
    python tests/data/coco_fuzz.py fuzz-keypoints N   the same on base_json(keypoints=True), keypoints mutated too
    python tests/data/coco_fuzz.py open DIR...   open DIR/instances.json with images in DIR; one line each
"""

from __future__ import annotations

import io
import json
import math
import resource
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

MEMORY_CAP = 2 << 30
# Images: a PNG and a JPEG of different sizes (what the json states).
IMAGES = {"a.png": (8, 6), "b.jpg": (10, 7)}


def _peak_rss() -> int:
    """This process's own peak resident memory in bytes (VmHWM: the high-water mark of this program's
    memory, which, unlike ru_maxrss, does not carry over the parent's from before exec)."""
    with open("/proc/self/status") as status:
        return int(status.read().split("VmHWM:")[1].split()[0]) * 1024


def base_json(keypoints: bool = False) -> dict:
    """A valid dataset that uses every kind of segmentation: polygon, list RLE, string RLE, crowd.

    With `keypoints`, category 1 ("cat") defines 3 keypoints and a skeleton, and its annotations carry
    keypoints (annotation 1 with num_keypoints, annotation 3 without); category 5 has none."""
    data = _base_json()
    if keypoints:
        data["categories"][0].update(keypoints=["nose", "left_ear", "right_ear"], skeleton=[[1, 2], [1, 3]])
        data["annotations"][0].update(keypoints=[3, 2, 2, 2, 1, 1, 0, 0, 0], num_keypoints=2)
        data["annotations"][2]["keypoints"] = [5, 3, 2, 4, 2, 2, 6.5, 2.5, 2]
    return data


def _base_json() -> dict:
    b_mask = np.zeros((7, 10), dtype=np.uint8)
    b_mask[2:5, 3:8] = 1
    return {
        "info": {"description": "fuzz base"},
        "images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 6},
                   {"id": 2, "file_name": "b.jpg", "width": 10, "height": 7}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 5, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 3], "area": 9.0, "iscrowd": 0,
             "segmentation": [[1, 1, 5, 1, 5, 4, 1, 4]]},
            {"id": 2, "image_id": 1, "category_id": 5, "bbox": [0, 0, 2, 6], "iscrowd": 0,
             "segmentation": {"size": [6, 8], "counts": [0, 12, 36]}},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [3, 2, 5, 3], "iscrowd": 0,
             "segmentation": {"size": [7, 10], "counts": _compressed(b_mask)}},
            {"id": 4, "image_id": 2, "category_id": 5, "bbox": [0, 0, 10, 7], "iscrowd": 1,
             "segmentation": [[0, 0, 10, 0, 10, 7]]},
        ],
    }


def _compressed(mask: np.ndarray) -> str:
    from pycocotools import mask as mask_utils

    return mask_utils.encode(np.asfortranarray(mask))["counts"].decode("ascii")


def image_bytes(name: str, size: tuple[int, int]) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG" if name.endswith(".png") else "JPEG")
    return buffer.getvalue()


def write_images(folder: Path) -> None:
    for name, size in IMAGES.items():
        (folder / name).write_bytes(image_bytes(name, size))


# ---- mutations ---------------------------------------------------------------------------------------

def _strategies():
    from hypothesis import strategies as st

    odd_numbers = st.sampled_from([math.nan, math.inf, -math.inf, 1e8, -1e8, 1e308, 10 ** 400, -1, 0, 0.5, 3])
    values = st.one_of(st.none(), st.booleans(), odd_numbers, st.integers(-2 ** 70, 2 ** 70), st.floats(),
                       st.text(max_size=8), st.lists(st.integers(-3, 20), max_size=8),
                       st.dictionaries(st.sampled_from(["size", "counts", "x"]), st.integers(-1, 9), max_size=2))
    keys = {"images": ["id", "file_name", "width", "height", "extra"],
            "annotations": ["id", "image_id", "category_id", "bbox", "segmentation", "area", "iscrowd",
                            "keypoints", "num_keypoints"],
            "categories": ["id", "name", "keypoints", "skeleton"]}
    file_names = st.sampled_from(["../a.png", "/etc/hostname", "", ".", "..", "sub/../a.png", "./b.jpg", "missing.png",
                                  "a.png\x00", "b.jpg", "a.png/..", "//a.png", "sub/../../a.png"])
    rle_text = st.text(alphabet=st.characters(min_codepoint=40, max_codepoint=120), max_size=12)
    polygons = st.lists(st.lists(st.one_of(odd_numbers, st.floats(-20, 30), st.integers(-20, 30)), max_size=10),
                        max_size=3)
    return st, values, keys, file_names, rle_text, polygons


def mutate(draw, data: dict, folder: Path, keypoints: bool = False) -> str:
    """Apply one random change to `data` or an image file; returns what it did (for failure reports).
    With `keypoints`, the keypoint fields are changed too (and more often than the others)."""
    st, values, keys, file_names, rle_text, polygons = _strategies()
    kinds = ["set", "delete", "number", "polygon", "rle", "file_name", "image", "top", "duplicate"]
    kind = draw(st.sampled_from(kinds + ["keypoints"] * len(kinds) if keypoints else kinds))
    if kind == "keypoints":
        return _mutate_keypoints(draw, st, values, data)
    section = draw(st.sampled_from(["images", "annotations", "categories"]))
    entries = data.get(section)
    if kind == "top":
        key = draw(st.sampled_from(["images", "annotations", "categories"]))
        data[key] = draw(st.sampled_from([None, [], {}, "x", [1, 2]]))
        return f"top {key}={data[key]!r}"
    if not isinstance(entries, list) or not entries:
        return "nothing"
    index = draw(st.integers(0, len(entries) - 1))
    entry = entries[index]
    if not isinstance(entry, dict):
        return "nothing"
    if kind == "set":
        key = draw(st.sampled_from(keys[section]))
        entry[key] = draw(values)
        return f"{section}[{index}].{key}={entry[key]!r}"
    if kind == "delete":
        key = draw(st.sampled_from(keys[section]))
        entry.pop(key, None)
        return f"del {section}[{index}].{key}"
    if kind == "duplicate":
        entries.append(dict(entry))
        return f"duplicate {section}[{index}]"
    annotation = data["annotations"][draw(st.integers(0, len(data["annotations"]) - 1))] \
        if isinstance(data.get("annotations"), list) and data["annotations"] else None
    if kind in ("number", "polygon", "rle") and not isinstance(annotation, dict):
        return "nothing"
    if kind == "number":
        target = annotation.get("bbox") if draw(st.booleans()) else annotation.get("segmentation")
        if isinstance(target, list) and target and isinstance(target[0], list):
            target = target[0]
        if isinstance(target, list) and target:
            target[draw(st.integers(0, len(target) - 1))] = draw(values)
        return f"number in annotation {annotation.get('id')!r}"
    if kind == "polygon":
        annotation["segmentation"] = draw(polygons)
        return f"polygons {annotation['segmentation']!r}"
    if kind == "rle":
        size = _image_size(data, annotation)
        annotation["segmentation"] = {"size": draw(st.one_of(st.just(size), values)),
                                      "counts": draw(st.one_of(_rle_counts(st, size), rle_text, values))}
        return f"rle {annotation['segmentation']!r}"
    if kind == "file_name":
        image = data["images"][draw(st.integers(0, len(data["images"]) - 1))] if isinstance(data.get("images"), list) \
            and data["images"] else None
        if isinstance(image, dict):
            image["file_name"] = draw(file_names)
            return f"file_name {image['file_name']!r}"
        return "nothing"
    return _damage_image(draw, st, folder)


def _mutate_keypoints(draw, st, values, data: dict) -> str:
    """A number, the length, num_keypoints or v of an annotation's keypoints, or a category's names/skeleton."""
    if draw(st.integers(0, 4)) == 0:
        category = data["categories"][draw(st.integers(0, len(data["categories"]) - 1))]
        key = draw(st.sampled_from(["keypoints", "skeleton"]))
        category[key] = draw(st.one_of(values, st.lists(st.sampled_from(["nose", "left_ear", "right_ear", "tail"]),
                                                        max_size=4),
                                       st.lists(st.lists(st.integers(-1, 5), max_size=3), max_size=3)))
        return f"category {category.get('id')!r} {key}={category[key]!r}"
    annotations = data["annotations"]
    with_keypoints = [a for a in annotations if isinstance(a, dict) and isinstance(a.get("keypoints"), list)]
    annotation = draw(st.sampled_from(with_keypoints if with_keypoints and draw(st.booleans()) else annotations))
    if not isinstance(annotation, dict):
        return "nothing"
    points = list(annotation.get("keypoints") or [0, 0, 0] * 3) if isinstance(annotation.get("keypoints"), list) \
        else [0, 0, 0] * 3
    how = draw(st.sampled_from(["value", "value", "visibility", "length", "num_keypoints", "add"]))
    if how == "value" and points:
        odd = st.sampled_from([1e308, -1e308, 1e8, math.nan, math.inf, 10 ** 400, 0.5, None, "1", True])
        points[draw(st.integers(0, len(points) - 1))] = draw(st.one_of(odd, odd, odd, values))
    elif how == "visibility":
        points[draw(st.integers(0, len(points) // 3 - 1)) * 3 + 2] = draw(st.sampled_from([0, 1, 2, 3, -1, 1.5, True]))
    elif how == "length":
        points = points[:draw(st.integers(0, len(points)))] + draw(st.lists(st.integers(0, 9), max_size=4))
    elif how == "num_keypoints":
        annotation["num_keypoints"] = draw(st.one_of(st.integers(-1, 4), values))
    annotation["keypoints"] = points
    return f"annotation {annotation.get('id')!r} {how}: keypoints={points!r} num={annotation.get('num_keypoints')!r}"


def _image_size(data: dict, annotation: dict) -> list:
    """[height, width] of the annotation's image as the json states it (mostly the right RLE size)."""
    image = next((image for image in data.get("images") or [] if isinstance(image, dict)
                  and image.get("id") == annotation.get("image_id")), {})
    return [image.get("height"), image.get("width")]


def _rle_counts(st, size: list):
    """Run lengths adding up to the image's pixels or a few off: lists, and strings pycocotools wrote."""
    height, width = (size if all(isinstance(v, int) and 0 < v < 100 for v in size) else [6, 8])
    pixels = height * width
    near = st.builds(lambda first, off: [first, pixels - first + off], st.integers(0, pixels), st.integers(-2, 2))
    strings = st.builds(lambda h, w, seed: _compressed(np.random.default_rng(seed).integers(0, 2, (h, w))
                                                      .astype(np.uint8)),
                        st.integers(height - 1, height + 1), st.integers(width - 1, width + 1), st.integers(0, 9))
    return st.one_of(near, strings, st.lists(st.integers(-3, 70), max_size=4))


def _damage_image(draw, st, folder: Path) -> str:
    name = draw(st.sampled_from(sorted(IMAGES)))
    path = folder / name
    content = path.read_bytes()
    how = draw(st.sampled_from(["truncate", "garbage", "empty", "wrong size", "other format"]))
    if how == "truncate":
        content = content[:draw(st.integers(0, max(0, len(content) - 1)))]
    elif how == "garbage":
        content = draw(st.binary(max_size=200))
    elif how == "empty":
        content = b""
    elif how == "wrong size":
        width, height = IMAGES[name]
        content = image_bytes(name, (height, width + 1))
    else:
        content = image_bytes("x.jpg" if name.endswith(".png") else "x.png", IMAGES[name])
    path.write_bytes(content)
    return f"{how} {name}"


# ---- the property ------------------------------------------------------------------------------------

def _open(path: Path, folder: Path, skip: bool):
    """(dataset or None, first line of the MaskRCNNError or None, warning messages)."""
    from maskrcnn.data.coco import CocoDataset
    from maskrcnn.errors import MaskRCNNError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            dataset = CocoDataset(path, folder, skip_invalid=skip)
        except MaskRCNNError as error:
            return None, str(error).splitlines()[0], []
    return dataset, None, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def _use(dataset) -> None:
    """What training and evaluation do with an opened dataset: read every item (flipped), evaluate the json;
    with keypoints, also the ground truth's keypoints as results."""
    from maskrcnn.data.augment import RandomHorizontalFlip
    from maskrcnn.engine.evaluate import coco_evaluate

    try:
        flip = RandomHorizontalFlip(1.0, keypoint_names=dataset.keypoint_names)
    except ValueError:  # a "left_" name without its "right_": no flip can label it (training says so)
        flip = None
    for index in range(len(dataset)):
        image, target = dataset[index]
        if "keypoints" in target and flip is not None:
            assert target["keypoints"].shape == (len(target["boxes"]), len(dataset.keypoint_names), 3)
            assert bool(flip(image, target)[1]["keypoints"].isfinite().all())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools vs numpy 2
        coco_evaluate(dataset.coco, [], verbose=False)
        if dataset.keypoint_names:
            results = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
                        "keypoints": a["keypoints"]} for a in dataset.coco.dataset["annotations"] if a.get("keypoints")]
            coco_evaluate(dataset.coco, results, iou_types=("keypoints",), verbose=False)


def check_example(draw, keypoints: bool = False) -> None:
    """The property: opening a mutated dataset gives a MaskRCNNError whose first line names the json,
    or (with skip_invalid) a dataset without the bad entries plus one summary warning; whatever opens
    can be read and evaluated. Any other exception (or a crash of the process) fails."""
    from hypothesis import note, strategies as st

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_images(folder)
        data = base_json(keypoints)
        for _ in range(draw(st.integers(1, 3))):
            note(mutate(draw, data, folder, keypoints))
        path = folder / "instances.json"
        path.write_text(json.dumps(data))
        strict, strict_error, _ = _open(path, folder, skip=False)
        lenient, lenient_error, messages = _open(path, folder, skip=True)
        for error in (strict_error, lenient_error):
            assert error is None or error.startswith(str(path)) or str(path) in error, error
        skipped = [m for m in messages if ": skipped " in m]
        if strict is not None:
            assert lenient is not None and not skipped and lenient.image_ids == strict.image_ids
            _use(strict)
        elif lenient is not None:
            assert len(skipped) == 1 and skipped[0].startswith(f"{path}: skipped "), messages
            assert len(lenient) <= len(data["images"])
            _use(lenient)


def run_property(examples: int, keypoints: bool = False) -> None:
    from hypothesis import HealthCheck, given, settings, strategies as st

    @settings(max_examples=examples, deadline=None, database=None, print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def property_test(data):
        check_example(data.draw, keypoints)

    property_test()


def _cap_memory() -> None:
    with open("/proc/self/status") as status:
        virtual = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = virtual + MEMORY_CAP if hard == resource.RLIM_INFINITY else min(virtual + MEMORY_CAP, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def main(argv: list[str]) -> int:
    import maskrcnn.data.coco  # noqa: F401  (the imports' memory is not the code under test)
    import maskrcnn.engine.evaluate  # noqa: F401
    from maskrcnn.errors import MaskRCNNError

    _cap_memory()
    if argv[0] in ("fuzz", "fuzz-keypoints"):
        run_property(int(argv[1]), keypoints=argv[0] == "fuzz-keypoints")
    else:
        for folder in map(Path, argv[1:]):
            try:
                dataset, error, _ = _open(folder / "instances.json", folder, skip=False)
                if dataset is not None:
                    _use(dataset)
                print(f"error: {error}" if error else "ok", flush=True)
            except MaskRCNNError as error:
                print(f"error when used: {error}", flush=True)
    print(f"peak_rss_bytes {_peak_rss()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
