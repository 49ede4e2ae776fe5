"""Tracking benchmark: our Tracker against supervision's ByteTrack on the same detections, scored by TrackEval.

Synthetic shape videos (maskrcnn.data.synthetic_video: moving, occluding, entering and leaving objects with
ground-truth ids). Detections come from the ground truth with injected noise (box/mask jitter, 5-15% dropped,
low-score true detections, false positives and wrong-class duplicates), several noise seeds, and, with
--weights, from a trained shapes model run on the rendered frames. Both trackers see the same detections;
TrackEval (HOTA, CLEAR, Identity) scores their outputs against the ground truth with box IoU.
Also times tracking per frame against model inference per frame (--weights, or a small random model).

    python benchmarks/tracking.py --sequences 5 --frames 100 --noise-seeds 0 1 2 [--weights model.safetensors]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from maskrcnn.data.synthetic import CLASS_NAMES  # noqa: E402
from maskrcnn.data.synthetic_video import render_sequence, truth_boxes  # noqa: E402
from maskrcnn.masks import MaskCrops  # noqa: E402
from maskrcnn.results import Detections  # noqa: E402
from maskrcnn.tracking import Tracker  # noqa: E402
from maskrcnn.tracking.association import box_iou  # noqa: E402

NAMES = ["__background__", *CLASS_NAMES]


def noisy_detections(truth, rng: np.random.Generator, drop: float, size: tuple[int, int]) -> Detections:
    """The ground truth of one frame as a detector might see it."""
    boxes, labels, scores, crops, offsets = [], [], [], [], []
    height, width = size
    for (_, label, mask), box in zip(truth, truth_boxes(truth)):
        if rng.random() < drop:
            continue
        side = float(max(box[2] - box[0], box[3] - box[1]))
        shift = np.round(rng.normal(0, 0.04 * side, size=2)).astype(int)   # the mask moves with the box centre
        box = box + np.array([shift[0], shift[1]] * 2) + rng.normal(0, 0.03 * side, size=4)
        crop = MaskCrops.from_full(mask[None])
        top, left = crop.offsets[0] + shift[::-1]
        score = rng.uniform(0.15, 0.5) if rng.random() < 0.2 else rng.uniform(0.5, 1.0)
        _add(boxes, labels, scores, crops, offsets, box, label, score, crop.crops[0], (top, left))
        if rng.random() < 0.05:  # the same object once more with another class, lower score
            other = int(rng.choice([c for c in range(1, len(NAMES)) if c != label]))
            _add(boxes, labels, scores, crops, offsets, box, other, rng.uniform(0.1, 0.5), crop.crops[0], (top, left))
    for _ in range(rng.poisson(0.5)):  # false positives anywhere
        w, h = rng.uniform(15, 60, size=2)
        x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
        crop = np.ones((int(h), int(w)), dtype=bool)
        _add(boxes, labels, scores, crops, offsets, np.array([x, y, x + int(w), y + int(h)]),
             int(rng.integers(1, len(NAMES))), rng.uniform(0.1, 0.7), crop, (int(y), int(x)))
    return _detections(boxes, labels, scores, crops, offsets, size)


def _add(boxes, labels, scores, crops, offsets, box, label, score, crop, offset) -> None:
    for values, value in ((boxes, box), (labels, label), (scores, score), (crops, crop),
                          (offsets, (int(offset[0]), int(offset[1])))):
        values.append(value)


def _detections(boxes, labels, scores, crops, offsets, size) -> Detections:
    height, width = size
    clipped_crops, clipped_offsets = [], []
    for crop, (top, left) in zip(crops, offsets):  # a jittered mask may stick out of the image: cut it
        t0, l0 = max(top, 0), max(left, 0)
        t1, l1 = min(top + crop.shape[0], height), min(left + crop.shape[1], width)
        clipped_crops.append(crop[t0 - top:max(t1 - top, t0 - top), l0 - left:max(l1 - left, l0 - left)])
        clipped_offsets.append((t0 if t1 > t0 else 0, l0 if l1 > l0 else 0))
    boxes = np.clip(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), 0, [width, height, width, height])
    return Detections(boxes, labels, scores, MaskCrops(clipped_crops, np.asarray(clipped_offsets).reshape(-1, 2),
                                                       size), NAMES, image_size=size)


# ---------------------------------------------------------------------------------------------- trackers

def run_ours(frames: list[Detections], **options) -> tuple[list[tuple[np.ndarray, np.ndarray]], float]:
    """Per frame (ids, boxes) of the tracked detections, and the seconds spent in `update`. Detections of a
    tentative track are labelled once it is confirmed (as `maskrcnn track` does)."""
    tracker = Tracker(**options)
    all_ids, seconds = [], 0.0
    for detections in frames:
        start = time.perf_counter()
        ids = tracker.update(detections)
        seconds += time.perf_counter() - start
        all_ids.append(ids)
        for track_id, pending in tracker.confirmed_now:
            for frame, index in pending:
                all_ids[frame][index] = track_id
    return [(ids[ids >= 0], d.boxes[ids >= 0]) for ids, d in zip(all_ids, frames)], seconds


def run_bytetrack(frames: list[Detections], fps: int = 25) -> tuple[list[tuple[np.ndarray, np.ndarray]], float]:
    import supervision as sv

    tracker = sv.ByteTrack(frame_rate=fps)
    out, seconds = [], 0.0
    for detections in frames:
        start = time.perf_counter()
        tracked = tracker.update_with_detections(sv.Detections(xyxy=detections.boxes.copy(),
                                                               confidence=detections.scores.copy(),
                                                               class_id=detections.labels.copy()))
        seconds += time.perf_counter() - start
        out.append((np.asarray(tracked.tracker_id, dtype=np.int64), tracked.xyxy.astype(np.float32)))
    return out, seconds


# ---------------------------------------------------------------------------------------------- scoring

def trackeval_data(truth_frames, tracked_frames) -> dict:
    """One sequence in TrackEval's per-sequence form (ids renumbered from 0, box IoU as the similarity)."""
    gt_map, tr_map = {}, {}
    data = {"gt_ids": [], "tracker_ids": [], "similarity_scores": []}
    for (gt_ids, gt_boxes), (tr_ids, tr_boxes) in zip(truth_frames, tracked_frames):
        data["gt_ids"].append(np.array([gt_map.setdefault(int(i), len(gt_map)) for i in gt_ids], dtype=int))
        data["tracker_ids"].append(np.array([tr_map.setdefault(int(i), len(tr_map)) for i in tr_ids], dtype=int))
        data["similarity_scores"].append(box_iou(gt_boxes, tr_boxes))
    data.update(num_timesteps=len(truth_frames), num_gt_ids=len(gt_map), num_tracker_ids=len(tr_map),
                num_gt_dets=sum(len(i) for i in data["gt_ids"]),
                num_tracker_dets=sum(len(i) for i in data["tracker_ids"]))
    return data


def score(sequences: list[dict]) -> dict:
    """HOTA, IDF1, MOTA, id switches over all sequences (TrackEval's combination)."""
    from trackeval.metrics import CLEAR, HOTA, Identity

    metrics = [HOTA({"PRINT_CONFIG": False}), CLEAR({"PRINT_CONFIG": False}), Identity({"PRINT_CONFIG": False})]
    combined = {}
    for metric in metrics:
        per_sequence = {str(i): metric.eval_sequence(data) for i, data in enumerate(sequences)}
        combined.update(metric.combine_sequences(per_sequence))
    return {"HOTA": float(np.mean(combined["HOTA"])), "IDF1": float(combined["IDF1"]),
            "MOTA": float(combined["MOTA"]), "IDSW": int(combined["IDSW"]), "Frag": int(combined["Frag"])}


# ---------------------------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=5)
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="first video seed")
    parser.add_argument("--noise-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--weights", help="a trained shapes model: also track its detections, and time it")
    parser.add_argument("--score-thresh", type=float, default=0.1, help="the model's score threshold")
    args = parser.parse_args()

    videos = []
    for index in range(args.sequences):
        rendered = list(render_sequence(args.seed + index, args.frames, args.size, images=args.weights is not None))
        videos.append(rendered)
    size = (args.size, 2 * round(args.size * 2 / 3))
    truth = [[(np.array([i for i, _, _ in gt], dtype=int), truth_boxes(gt)) for _, _, gt in video] for video in videos]
    print(f"{args.sequences} sequences x {args.frames} frames, {size[1]}x{size[0]}, "
          f"{sum(len(ids) for video in truth for ids, _ in video)} ground-truth boxes, "
          f"{sum(len({int(i) for ids, _ in video for i in ids}) for video in truth)} objects")

    sources = {}
    for noise in args.noise_seeds:
        rng = np.random.default_rng([noise, 99])
        drop = rng.uniform(0.05, 0.15)
        sources[f"ground truth + noise (seed {noise}, {drop:.0%} dropped)"] = [
            [noisy_detections(gt, rng, drop, size) for _, _, gt in video] for video in videos]
    predictor = None
    if args.weights:
        from maskrcnn import Predictor

        predictor = Predictor(args.weights, device="cpu", score_thresh=args.score_thresh)
        model_frames, inference = [], []
        for video in videos:
            detections = []
            for _, image, _ in video:
                start = time.perf_counter()
                detections.extend(predictor([image]))
                inference.append(time.perf_counter() - start)
            model_frames.append(detections)
        sources[f"trained shapes model (score >= {args.score_thresh})"] = model_frames
    compare(sources, truth)
    timing(sources, predictor, inference if args.weights else None, size)


TRACKERS = {
    "ours (mask + box IoU, class, two stages, Kalman)": lambda frames: run_ours(frames),
    "ours, box IoU only (mask_weight 0)": lambda frames: run_ours(frames, mask_weight=0.0),
    "supervision 0.26 ByteTrack (defaults)": run_bytetrack,
}


def compare(sources: dict, truth: list) -> None:
    print("\n| detections | tracker | HOTA | IDF1 | MOTA | ID switches | frag. | tracking ms/frame |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for source, videos in sources.items():
        for name, run in TRACKERS.items():
            sequences, seconds, frames = [], 0.0, 0
            for video, gt in zip(videos, truth):
                tracked, spent = run(video)
                seconds += spent
                frames += len(video)
                sequences.append(trackeval_data(gt, tracked))
            s = score(sequences)
            print(f"| {source} | {name} | {s['HOTA']:.3f} | {s['IDF1']:.3f} | {s['MOTA']:.3f} | {s['IDSW']} | "
                  f"{s['Frag']} | {1000 * seconds / frames:.2f} |")


def timing(sources: dict, predictor, inference, size) -> None:
    """Tracking time per frame against model inference time per frame, measured in this process: our tracker
    on the model's own detections of the same frames, and on the benchmark's detections."""
    from maskrcnn import Predictor, build_model

    model_frames = None
    if predictor is None:  # a small random model (resnet18 FPN, its default thresholds) on rendered frames
        import torch

        torch.manual_seed(0)
        model = build_model("resnet18_fpn", num_classes=len(NAMES), min_size=size[0], max_size=size[1])
        model.class_names = NAMES
        predictor = Predictor(model.eval(), device="cpu")
        inference, model_frames = [], []
        for _, image, _ in render_sequence(0, 10, size[0]):
            start = time.perf_counter()
            model_frames.extend(predictor([image]))
            inference.append(time.perf_counter() - start)
    infer = float(np.median(inference))
    print(f"\nmodel inference {1000 * infer:.1f} ms/frame (median of {len(inference)}, CPU, "
          f"{sys.modules['torch'].get_num_threads()} threads)")
    timed = {name: videos for name, videos in sources.items()}
    if model_frames is not None:
        timed[f"that model's own detections ({np.mean([len(d) for d in model_frames]):.0f} per frame, all taken "
              "as high-score)"] = [model_frames]
    for name, videos in timed.items():
        # The random model's scores are low: there every detection is taken as high-score, the costly case.
        options = {"low_score": 0.0, "high_score": 0.0, "new_track_score": 0.0} if "own" in name else {}
        per_frame = [run_ours(video, **options)[1] / len(video) for video in videos]
        track = float(np.mean(per_frame))
        print(f"our tracking on {name}: {1000 * track:.2f} ms/frame = {100 * track / infer:.2f}% of inference")


if __name__ == "__main__":
    main()
