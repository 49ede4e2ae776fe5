"""What COCO keypoint evaluation needs besides pycocotools' COCOeval(iouType="keypoints"): which categories
it can score (those that define keypoints: OKS needs the ground truth's keypoints), their results, and the
per-keypoint OKS sigmas (pycocotools only has COCO's 17 person keypoints)."""

from __future__ import annotations

import numpy as np
from pycocotools.coco import COCO

from ..errors import MaskRCNNError
from ..modeling.keypoints import COCO_PERSON_KEYPOINT_NAMES


def keypoint_categories(coco_gt: COCO) -> list[int]:
    """The category ids whose categories define keypoints (the only ones OKS can score)."""
    return sorted(category_id for category_id, category in coco_gt.cats.items() if category.get("keypoints"))


def keypoint_results(coco_gt: COCO, results: list[dict]) -> list[dict]:
    """The results of categories with keypoints (the keypoint evaluation scores only those)."""
    categories = set(keypoint_categories(coco_gt))
    return [r for r in results if r.get("category_id") in categories]


def check_keypoint_lengths(coco_gt: COCO, results: list[dict]) -> None:
    """pycocotools' OKS broadcasts a wrong-length list into an error deep inside; say which results."""
    for r in results:
        count = len(coco_gt.cats[r["category_id"]]["keypoints"])
        if not isinstance(r["keypoints"], list) or len(r["keypoints"]) != 3 * count:
            got = len(r["keypoints"]) if isinstance(r["keypoints"], list) else type(r["keypoints"]).__name__
            raise MaskRCNNError(f"keypoints evaluation needs {3 * count} numbers (x, y, v for {count} keypoints) "
                                f"in 'keypoints' of every result of category {r['category_id']}; got {got}")


def keypoint_sigmas(coco_gt: COCO) -> np.ndarray:
    """Per-keypoint OKS sigmas: pycocotools' own for COCO's 17 person keypoints; for any other keypoints
    (which have no published sigmas) the mean of COCO's, 0.0719, for each."""
    from pycocotools.cocoeval import Params

    coco_sigmas = Params(iouType="keypoints").kpt_oks_sigmas
    names = coco_gt.cats[keypoint_categories(coco_gt)[0]]["keypoints"]
    return coco_sigmas if tuple(names) == COCO_PERSON_KEYPOINT_NAMES else np.full(len(names), coco_sigmas.mean())

