"""Up-front checks of COCO datasets (maskrcnn/data/validate.py): one test per case of the reliability
issue (test_case1_... to test_case5_...), all problems in one error, --skip-invalid, and property tests
(hypothesis): malformed datasets never crash or use over 2 GiB, and the compressed-RLE reader agrees with
pycocotools."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from coco_fuzz import base_json, image_bytes, write_images
from conftest import tiny_model
from maskrcnn.cli import main
from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.validate import MAX_LISTED, compressed_rle_runs, compressed_rle_total
from maskrcnn.engine.evaluate import coco_evaluate
from maskrcnn.errors import MaskRCNNError

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

FUZZ = Path(__file__).with_name("coco_fuzz.py")
FUZZ_EXAMPLES = 150  # ~30-60 s on a busy 2-core machine
GIB = 1 << 30


def _folder(tmp_path: Path, change=None, name: str = "set") -> Path:
    """tmp_path/name with the images and instances.json of coco_fuzz.base_json, after change(data, folder)."""
    folder = tmp_path / name
    folder.mkdir()
    write_images(folder)
    data = base_json()
    if change is not None:
        change(data, folder)
    (folder / "instances.json").write_text(json.dumps(data))
    return folder


def _open(folder: Path, **options) -> CocoDataset:
    return CocoDataset(folder / "instances.json", folder, **options)


def _error(folder: Path) -> str:
    with pytest.raises(MaskRCNNError) as raised:
        _open(folder)
    return str(raised.value)


def _run_child(*args: str) -> tuple[list[str], int]:
    """Run coco_fuzz.py (memory-capped child); its output lines and its peak resident memory in bytes."""
    result = subprocess.run([sys.executable, str(FUZZ), *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    lines = result.stdout.splitlines()
    assert lines[-1].startswith("peak_rss_bytes ")
    return lines[:-1], int(lines[-1].split()[1])


def _set_polygon_value(value):
    def change(data, folder):
        data["annotations"][0]["segmentation"][0][2] = value
    return change


# ---- case 1: NaN, inf or huge polygon coordinates --------------------------------------------------------

def test_case1_nan_inf_huge_polygon_coordinates_are_refused_in_bounded_memory(tmp_path):
    """pycocotools allocated without bound (22 GB) or segfaulted on these; run in a memory-capped child."""
    values = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "1e8": 1e8, "-1e8": -1e8,
              "10**400": 10 ** 400}
    folders = [_folder(tmp_path, _set_polygon_value(value), name) for name, value in values.items()]
    lines, peak = _run_child("open", *map(str, folders))
    assert peak < 2 * GIB
    for (name, _), folder, line in zip(values.items(), folders, lines):
        prefix = f"error: {folder / 'instances.json'}: annotation 1: 'segmentation' polygon 0 has "
        assert line.startswith(prefix), (name, line)
        if name.endswith("1e8"):
            assert "more than an image size outside the 8x6 image" in line
        else:
            assert line.endswith(", not a finite number"), line
    assert len(lines) == len(values)


def test_case1_points_slightly_outside_the_image_are_accepted(tmp_path):
    """COCO has polygon points just past the border; only points beyond an image size outside are refused."""
    def change(data, folder):
        data["annotations"][0]["segmentation"] = [[-0.5, -2, 8.7, 0, 15.9, 11.5, -7.9, 6]]
    dataset = _open(_folder(tmp_path, change))
    _, target = dataset[0]
    assert target["masks"].shape == (2, 6, 8)

    def far(data, folder):
        data["annotations"][0]["segmentation"] = [[-0.5, -2, 8.7, 0, 16.5, 11.5]]
    assert "point (16.5, 11.5), more than an image size outside" in _error(_folder(tmp_path, far, "far"))


def test_case1_nan_in_bbox_and_area_are_refused(tmp_path):
    def change(data, folder):
        data["annotations"][0]["bbox"][1] = float("nan")
        data["annotations"][1]["area"] = float("inf")
    message = _error(_folder(tmp_path, change))
    assert "annotation 1: 'bbox' must be 4 numbers [x, y, width, height], got [1, nan, 4, 3]" in message
    assert "annotation 2: 'area' must be a number >= 0, got inf" in message


# ---- case 2: RLE counts, image size, corrupt files -----------------------------------------------------

RLE_CASES = {
    "list over h*w": ([0, 12, 37], "RLE 'counts' add up to 49 pixels but the image has 6x8 = 48"),
    "list under h*w": ([0, 12, 35], "RLE 'counts' add up to 47 pixels but the image has 6x8 = 48"),
    "negative run": ([-1, 49], "RLE 'counts' must be a string or a list of run lengths (integers >= 0)"),
    "float run": ([0.5, 47.5], "RLE 'counts' must be a string or a list of run lengths (integers >= 0)"),
    "string of another size": (mask_utils.encode(np.ones((6, 9), np.uint8, order="F"))["counts"].decode(),
                               "RLE 'counts' is not a valid compressed RLE string: the runs add up to more than 48"),
    "string under h*w": (mask_utils.encode(np.ones((6, 7), np.uint8, order="F"))["counts"].decode(),
                         "RLE 'counts' add up to 42 pixels but the image has 6x8 = 48"),
    "string cut inside a run": ("0`", "RLE 'counts' is not a valid compressed RLE string: the string ends inside"),
    "character out of range": ("0~0", "RLE 'counts' is not a valid compressed RLE string: character '~' at "
                                      "position 1 is outside '0'..'o'"),
}


@pytest.mark.parametrize("case", RLE_CASES)
def test_case2_rle_counts_must_add_up_to_the_image_at_opening(tmp_path, case):
    counts, expected = RLE_CASES[case]

    def change(data, folder):
        data["annotations"][1]["segmentation"]["counts"] = counts
    message = _error(_folder(tmp_path, change))
    assert message == f"{tmp_path / 'set' / 'instances.json'}: annotation 2: {expected}" or \
        message.startswith(f"{tmp_path / 'set' / 'instances.json'}: annotation 2: {expected}")


def test_case2_image_size_differing_from_the_json_is_refused_at_opening(tmp_path):
    def change(data, folder):
        (folder / "a.png").write_bytes(image_bytes("a.png", (9, 6)))
    message = _error(_folder(tmp_path, change))
    assert message == (f"{tmp_path / 'set' / 'a.png'}: image is 9x6 pixels (after EXIF rotation) but "
                       f"{tmp_path / 'set' / 'instances.json'} says 8x6 (image id 1)")


def _rotated_jpeg(folder: Path) -> None:
    """b.jpg stored 10 wide x 7 high with EXIF orientation 6: viewers (and read_image) show it 7 x 10."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((7, 10, 3), np.uint8)).save(folder / "b.jpg", exif=exif.tobytes())


def test_case2_image_size_is_compared_after_exif_rotation(tmp_path):
    def stated_as_stored(data, folder):
        _rotated_jpeg(folder)
    message = _error(_folder(tmp_path, stated_as_stored))
    assert message.startswith(f"{tmp_path / 'set' / 'b.jpg'}: image is 7x10 pixels (after EXIF rotation) but ")

    def stated_as_shown(data, folder):
        _rotated_jpeg(folder)
        data["images"][1].update(width=7, height=10)
        data["annotations"] = data["annotations"][:2]
    dataset = _open(_folder(tmp_path, stated_as_shown, "shown"))
    image, _ = dataset[1]
    assert image.shape == (3, 10, 7)


def _cut(name: str, keep):
    def change(data, folder):
        content = (folder / name).read_bytes()
        (folder / name).write_bytes(keep(content))
    return change


CORRUPT_FILES = {
    "garbage": (_cut("a.png", lambda c: b"\x89PNG not really" * 3), "a.png: cannot read image header: "),
    "empty": (_cut("a.png", lambda c: b""), "a.png: cannot read image header: "),
    "png cut in half": (_cut("a.png", lambda c: c[:len(c) // 2]), "a.png: image file is truncated (it does not "
                                                                   "end with the PNG end marker)"),
    "jpeg without its last bytes": (_cut("b.jpg", lambda c: c[:-40]), "b.jpg: image file is truncated (it does "
                                                                       "not end with the JPEG end marker)"),
    "jpeg cut in the header": (_cut("b.jpg", lambda c: c[:30]), "b.jpg: cannot read image header: "),
}


@pytest.mark.parametrize("case", CORRUPT_FILES)
def test_case2_corrupt_image_files_are_refused_at_opening(tmp_path, case):
    change, expected = CORRUPT_FILES[case]
    message = _error(_folder(tmp_path, change))
    assert message.startswith(f"{tmp_path / 'set'}/{expected}")
    assert message.endswith(f"in {tmp_path / 'set' / 'instances.json'})")
    assert "\n" not in message


# ---- case 3: file_name outside the images folder -------------------------------------------------------

@pytest.mark.parametrize("name", ["../outside.png", "sub/../../outside.png", "ABSOLUTE", "", "..", ".",
                                  "a.png\x00.txt"])
def test_case3_file_name_must_stay_inside_the_images_folder(tmp_path, name):
    (tmp_path / "outside.png").write_bytes(image_bytes("a.png", (8, 6)))
    name = str(tmp_path / "outside.png") if name == "ABSOLUTE" else name

    def change(data, folder):
        data["images"][0]["file_name"] = name
    folder = _folder(tmp_path, change)
    assert _error(folder) == (f"{folder / 'instances.json'}: image 1: 'file_name' must be a relative path "
                              f"inside the images folder, got {name!r}")
    with pytest.warns(UserWarning, match=r"skipped 1 images and 2 annotations with problems"):
        dataset = _open(folder, skip_invalid=True)
    assert dataset.image_ids == [2]


def test_case3_relative_paths_that_stay_inside_are_accepted(tmp_path):
    def change(data, folder):
        (folder / "sub").mkdir()
        data["images"][0]["file_name"] = "sub/../a.png"
        data["images"][1]["file_name"] = "./b.jpg"
    dataset = _open(_folder(tmp_path, change))
    assert [dataset[i][0].shape for i in range(2)] == [(3, 6, 8), (3, 7, 10)]


# ---- case 4: polygons of fewer than 6 numbers ------------------------------------------------------------

def test_case4_short_polygon_is_refused_by_the_dataset_and_by_evaluation(tmp_path):
    def change(data, folder):
        data["annotations"][0]["segmentation"] = [[1, 1, 5, 4]]  # pycocotools reads 4 numbers as a box
    folder = _folder(tmp_path, change)
    expected = (f"{folder / 'instances.json'}: annotation 1: 'segmentation' polygons need at least 3 x, y "
                f"pairs; polygon 0 has 4 numbers")
    assert _error(folder) == expected
    with pytest.raises(MaskRCNNError) as from_path:
        coco_evaluate(folder / "instances.json", [], verbose=False)
    assert str(from_path.value) == expected
    with contextlib.redirect_stdout(io.StringIO()):
        reference = COCO(str(folder / "instances.json"))
    with pytest.raises(MaskRCNNError, match=r"the ground-truth COCO object: annotation 1: 'segmentation' "
                                            r"polygons need at least 3"):
        coco_evaluate(reference, [], verbose=False)


def test_case4_empty_polygon_list_evaluates_as_an_empty_mask(tmp_path):
    """`"segmentation": []` is accepted (an empty mask, left out of training) but pycocotools' COCOeval
    raised IndexError on it; it must score as pycocotools scores the same empty mask given as an RLE."""
    def change(data, folder):
        data["annotations"][0]["segmentation"] = []
    with pytest.warns(UserWarning, match="left out 1 annotations .* 1 with an empty mask"):
        dataset = _open(_folder(tmp_path, change))
    detections = [{"image_id": 2, "category_id": 1, "bbox": [3, 2, 5, 3], "score": 0.9,
                   "segmentation": dict(dataset.coco.dataset["annotations"][2]["segmentation"])}]
    metrics = coco_evaluate(dataset.coco, detections, iou_types=("segm",), verbose=False)

    data = base_json()
    data["annotations"][0]["segmentation"] = {"size": [6, 8], "counts": [48]}
    for annotation in data["annotations"]:
        annotation["area"] = dataset.coco.anns[annotation["id"]]["area"]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = data
        gt.createIndex()
        evaluation = COCOeval(gt, gt.loadRes([dict(d) for d in detections]), "segm")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert metrics["segm"]["AP"] == pytest.approx(evaluation.stats[0])
    assert metrics["segm"]["AP50"] == pytest.approx(evaluation.stats[1]) and evaluation.stats[1] > 0


# ---- case 5: wrong types ---------------------------------------------------------------------------------

def _set(section, index, key, value):
    def change(data, folder):
        data[section][index][key] = value
    return change


TYPE_CASES = {
    "area as a string": (_set("annotations", 0, "area", "12"), "annotation 1: 'area' must be a number >= 0, got '12'"),
    "annotation id as a list": (_set("annotations", 1, "id", [2]),
                                "annotation at index 1: 'id' must be an integer, got [2]"),
    "annotation id as a dict": (_set("annotations", 1, "id", {"a": 2}),
                                "annotation at index 1: 'id' must be an integer, got {'a': 2}"),
    "annotation id as a bool": (_set("annotations", 1, "id", True),
                                "annotation at index 1: 'id' must be an integer, got True"),
    "image_id as a float": (_set("annotations", 0, "image_id", 1.0),
                            "annotation 1: 'image_id' must be an integer, got 1.0"),
    "category_id as a bool": (_set("annotations", 0, "category_id", True),
                              "annotation 1: 'category_id' must be an integer, got True"),
    "image id as a list": (_set("images", 1, "id", [2]), "image at index 1: 'id' must be an integer, got [2]"),
    "category id as a string": (_set("categories", 0, "id", "1"),
                                "category at index 0: 'id' must be an integer, got '1'"),
    "iscrowd as a string": (_set("annotations", 0, "iscrowd", "no"),
                            "annotation 1: 'iscrowd' must be 0 or 1, got 'no'"),
    "width as a float": (_set("images", 0, "width", 8.0), "image 1: 'width' must be a positive integer, got 8.0"),
}


@pytest.mark.parametrize("case", TYPE_CASES)
def test_case5_wrong_types_are_one_error_not_a_traceback(tmp_path, case):
    change, expected = TYPE_CASES[case]
    folder = _folder(tmp_path, change)
    message = _error(folder)
    lines = message.splitlines()
    # A bad id also leaves what refers to it dangling; those are listed after it.
    assert f"{folder / 'instances.json'}: {expected}" in [line.strip() for line in lines], message
    with pytest.warns(UserWarning, match=r"instances\.json: skipped "):
        _open(folder, skip_invalid=True)


# ---- all problems together, --skip-invalid -------------------------------------------------------------

def test_all_problems_are_reported_together(tmp_path):
    def change(data, folder):
        template = data["annotations"][0]
        data["annotations"] += [dict(template, id=100 + k, area="big") for k in range(25)]
        (folder / "b.jpg").write_bytes(b"")
    folder = _folder(tmp_path, change)
    lines = _error(folder).splitlines()
    source = str(folder / "instances.json")
    assert lines[0] == (f"{source}: 26 problems in the annotations and images (fix them, or pass --skip-invalid / "
                        f"skip_invalid=True to leave out the entries that have them):")
    assert len(lines) == 1 + MAX_LISTED + 1 and lines[-1] == "  ... and 6 more"
    assert lines[1].startswith(f"  {folder / 'b.jpg'}: cannot read image header: ")
    assert lines[1].endswith(f"(image id 2 in {source})")
    assert lines[2:MAX_LISTED + 1] == [f"  {source}: annotation {100 + k}: 'area' must be a number >= 0, got 'big'"
                                       for k in range(MAX_LISTED - 1)]


def test_skip_invalid_leaves_out_bad_images_and_annotations_with_one_warning(tmp_path):
    def change(data, folder):
        data["annotations"][1]["segmentation"]["counts"] = [0, 12, 37]
        _cut("b.jpg", lambda c: c[:-40])(data, folder)
    folder = _folder(tmp_path, change)
    source = folder / "instances.json"
    assert _error(folder).startswith(f"{source}: 2 problems in the annotations and images")
    with pytest.warns(UserWarning) as caught:
        dataset = _open(folder, skip_invalid=True)
    assert [str(w.message) for w in caught] == [
        f"{source}: skipped 1 images and 3 annotations with problems (2 problems; first: {folder / 'b.jpg'}: "
        f"image file is truncated (it does not end with the JPEG end marker) (image id 2 in {source}))"]
    assert dataset.image_ids == [1] and sorted(dataset.coco.anns) == [1]
    _, target = dataset[0]
    assert target["labels"].tolist() == [1]


def test_skip_invalid_with_nothing_left_is_an_error(tmp_path):
    def change(data, folder):
        for image in data["images"]:
            (folder / image["file_name"]).write_bytes(image_bytes(image["file_name"], (9, 9)))
    with pytest.raises(MaskRCNNError, match=r"instances\.json: no images left after leaving out those with "
                                            r"problems \(2 problems; first: .*a\.png: image is 9x9 pixels"):
        _open(_folder(tmp_path, change), skip_invalid=True)


def _run_cli(argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def _cli_folder(tmp_path: Path) -> Path:
    """Categories the conftest tiny model predicts (17 cat, 18 dog); image b.jpg truncated."""
    def change(data, folder):
        data["categories"] = [{"id": 17, "name": "cat"}, {"id": 18, "name": "dog"}]
        for annotation in data["annotations"]:
            annotation["category_id"] = 17 if annotation["category_id"] == 1 else 18
        data["annotations"][0]["area"] = "nine"
        _cut("b.jpg", lambda c: c[:-40])(data, folder)
    return _folder(tmp_path, change)


def test_cli_eval_skip_invalid(tmp_path, one_thread):
    from maskrcnn.weights import save_checkpoint

    folder = _cli_folder(tmp_path)
    weights = tmp_path / "tiny.safetensors"
    save_checkpoint(tiny_model(), weights)
    argv = ["eval", "--weights", str(weights), "--annotations", str(folder / "instances.json"),
            "--images", str(folder), "--device", "cpu", "--no-progress"]
    code, err = _run_cli(argv)
    assert code == 2 and err.startswith(f"maskrcnn eval: error: {folder / 'instances.json'}: 2 problems ")
    assert "annotation 1: 'area' must be a number >= 0, got 'nine'" in err and "b.jpg: image file is truncated" in err
    with pytest.warns(UserWarning, match=r"skipped 1 images and 3 annotations with problems"):
        code, err = _run_cli(argv + ["--skip-invalid"])
    assert code == 0, err


def test_cli_train_skip_invalid(tmp_path, one_thread):
    folder = _cli_folder(tmp_path)
    argv = ["train", "--train-annotations", str(folder / "instances.json"), "--train-images", str(folder),
            "--out", str(tmp_path / "run"), "--iters", "1", "--batch-size", "1", "--norm", "gn", "--min-size", "128",
            "--max-size", "128", "--warmup-iters", "0", "--device", "cpu", "--workers", "0", "--no-progress",
            "--model-option", "fpn_channels=32", "--model-option", "mask_head_channels=32",
            "--model-option", "box_head_hidden=64"]
    code, err = _run_cli(argv)
    assert code == 2 and err.startswith(f"maskrcnn train: error: {folder / 'instances.json'}: 2 problems ")
    assert not (tmp_path / "run" / "last.pt").exists()
    with pytest.warns(UserWarning, match=r"skipped 1 images and 3 annotations with problems"):
        code, err = _run_cli(argv + ["--skip-invalid"])
    assert code == 0, err
    assert (tmp_path / "run" / "model.safetensors").is_file()


# ---- property tests --------------------------------------------------------------------------------------

def test_malformed_coco_files_and_images_never_crash_or_use_over_2gib():
    """Hypothesis mutates a valid dataset (wrong types, NaN/inf/huge numbers, missing fields, bad RLE,
    bad paths, truncated/garbage/empty/wrong-size images): opening it gives a MaskRCNNError naming the
    json, or with skip_invalid a clean skip; whatever opens is read and evaluated. coco_fuzz.py runs it in
    a child whose address space is capped (so a regression cannot exhaust the machine) and reports its
    peak resident memory."""
    lines, peak = _run_child("fuzz", str(FUZZ_EXAMPLES))
    assert peak < 2 * GIB, f"peak resident memory {peak / GIB:.2f} GiB"


def _runs_of(mask: np.ndarray) -> list[int]:
    """Column-major run lengths starting with zeros, as COCO RLE stores them."""
    flat = mask.flatten(order="F")
    runs, value, length = [], 0, 0
    for pixel in flat:
        if pixel == value:
            length += 1
        else:
            runs.append(length)
            value, length = pixel, 1
    return runs + [length]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.data())
def test_compressed_rle_reader_reads_what_pycocotools_writes(height, width, data):
    bits = data.draw(st.lists(st.booleans(), min_size=height * width, max_size=height * width))
    mask = np.array(bits, dtype=np.uint8).reshape(height, width)
    counts = mask_utils.encode(np.asfortranarray(mask))["counts"].decode("ascii")
    assert list(compressed_rle_runs(counts, height * width)) == _runs_of(mask)
    assert compressed_rle_total(counts, height * width) == height * width
    with pytest.raises(ValueError, match="add up to more than"):
        compressed_rle_total(counts, height * width - 1)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=44, max_codepoint=115), max_size=16))
def test_compressed_rle_reader_on_any_string_agrees_with_pycocotools(counts):
    """Any string: a ValueError, or runs that pycocotools decodes to the same mask (checked on a 1 x total
    image, where the runs are the mask's row)."""
    try:
        runs = list(compressed_rle_runs(counts, 4096))
    except ValueError:
        return
    total = sum(runs)
    if total == 0:
        return
    decoded = mask_utils.decode({"size": [1, total], "counts": counts.encode("ascii")})
    expected = np.repeat(np.arange(len(runs)) % 2, runs).astype(np.uint8)
    np.testing.assert_array_equal(decoded.ravel(order="F"), expected)


def test_image_without_a_size_is_one_problem_not_one_per_annotation(tmp_path):
    """Its annotations cannot be checked against a size, and are not reported as pointing nowhere."""
    def change(data, folder):
        del data["images"][0]["width"]
    folder = _folder(tmp_path, change)
    assert _error(folder) == f"{folder / 'instances.json'}: image 1: missing field 'width'"
