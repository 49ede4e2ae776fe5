"""maskrcnn track: follow objects over video frames: detect and track, or track detections `predict` wrote.

For each video, DIR gets <name>_mot.csv (MOTChallenge rows) and <name>_tracks.mp4 (the overlay); for all
videos together tracks.json (every detection in a track, with `track_id`) and summary.json (unique objects
per class, each track's first/last frame and length, crossings of --count-line). Every input is checked
(videos opened, the detections file read) before any work; files are written atomically.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..checks import COUNT, NON_NEGATIVE_INT, PROBABILITY
from ._options import add_detection_options, add_device_option, add_trust_option

NAME = "track"
HELP = "track objects over video frames (masks, classes, scores and motion): ids, MOT CSV, counts, overlay"
ORDER = 15


def _count_line(text: str):
    from ..tracking.counting import parse_line

    try:
        return parse_line(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_arguments(p) -> None:
    p.add_argument("videos", nargs="*", metavar="VIDEO", help="video files to detect and track (with --weights)")
    p.add_argument("--weights", metavar="SRC", help="model to detect with, as for `maskrcnn predict`")
    p.add_argument("--detections", metavar="FILE",
                   help="track these detections instead (predictions.json of `maskrcnn predict` on videos: entries "
                        "with file_name, frame, category_id, bbox, score, segmentation); the overlay is drawn when "
                        "the video named by file_name can be opened")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    add_detection_options(p, 0.1, "low-score detections feed the tracker's second stage")
    p.add_argument("--high-score", type=PROBABILITY.flag, default=0.5, metavar="S",
                   help="detections scoring at least this are matched first (default 0.5)")
    p.add_argument("--low-score", type=PROBABILITY.flag, default=0.1, metavar="S",
                   help="detections below this are ignored; between it and --high-score they only continue "
                        "tracks (default 0.1)")
    p.add_argument("--new-track-score", type=PROBABILITY.flag, default=0.6, metavar="S",
                   help="an unmatched detection scoring at least this starts a tentative track (default 0.6)")
    p.add_argument("--min-hits", type=COUNT.flag, default=2, metavar="N",
                   help="frames in a row a tentative track must be matched to become a track (default 2)")
    p.add_argument("--max-missed", type=NON_NEGATIVE_INT.flag, default=10, metavar="N",
                   help="frames a track survives without a detection (occlusion) before it ends (default 10)")
    p.add_argument("--count-line", type=_count_line, metavar="X1,Y1,X2,Y2",
                   help="count the tracks crossing this segment (pixels), per class and direction")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="as for predict")
    add_device_option(p)
    add_trust_option(p)
    p.add_argument("--no-overlay", action="store_true", help="skip the overlay videos")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _tracker(args):
    from ..errors import MaskRCNNError
    from ..tracking import Tracker

    try:
        return Tracker(high_score=args.high_score, low_score=args.low_score, new_track_score=args.new_track_score,
                       min_hits=args.min_hits, max_missed=args.max_missed)
    except ValueError as error:
        raise MaskRCNNError(f"--low-score, --high-score, --new-track-score: {error}") from None


def _check_inputs(args) -> None:
    from ..devices import resolve_device
    from ..errors import MaskRCNNError
    from ..video import VideoReader

    resolve_device(args.device)  # a bad --device is one line before anything is opened
    if bool(args.videos) == bool(args.detections):
        raise MaskRCNNError("give either VIDEO files (with --weights) or --detections FILE")
    if args.videos and not args.weights:
        raise MaskRCNNError("--weights is needed to detect objects in the videos (or give --detections FILE)")
    for video in args.videos:
        VideoReader(video).close()  # opens it: a bad video is one line before any work
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise MaskRCNNError(f"--out {out}: exists and is not a folder")


def run(args) -> int:
    from ..errors import MaskRCNNError

    try:
        import filterpy  # noqa: F401
        import scipy  # noqa: F401
    except ImportError as error:
        raise MaskRCNNError(f"tracking needs the `track` extra (pip install 'maskrcnn[track]'): {error}") from None
    from ..tracking.detections_file import read_detections

    _check_inputs(args)
    _tracker(args)  # the settings' order checked before any work
    out = Path(args.out)
    if args.detections:
        videos = read_detections(args.detections)
        results = _track_detections(videos, out, args)
    else:
        results = _track_videos(out, args)
    _write_all(results, out)
    return 0


def _output_names(file_names: list[str]) -> list[str]:
    from ._predict_inputs import InputItem, assign_output_names

    items = [InputItem(i, Path(name), True) for i, name in enumerate(file_names)]
    assign_output_names(items)
    return [item.output_name for item in items]


def _track_videos(out: Path, args) -> list:
    from ..predictor import Predictor
    from ..video import predict_video

    predictor = Predictor(args.weights, device=args.device, score_thresh=args.score_thresh,
                          mask_threshold=args.mask_threshold, max_detections=args.max_detections,
                          precision=args.precision, trust_torchscript=args.trust_torchscript)
    results = []
    for video, name in zip(args.videos, _output_names(list(args.videos))):
        frames = ((t, detections.to_coco(frame=t), detections, image)
                  for t, image, detections in predict_video(predictor, video, progress=not args.no_progress))
        results.append(_track_one(str(video), name, frames, _fps(video), out, args))
    return results


def _track_detections(videos: dict, out: Path, args) -> list:
    from ..errors import MaskRCNNError
    from ..tracking.detections_file import class_names_of, frame_detections, image_size_of
    from ..video import VideoReader

    class_names = class_names_of(videos)
    results = []
    for (file_name, entries), name in zip(videos.items(), _output_names(list(videos))):
        size, reader = image_size_of(entries), None
        if not args.no_overlay:
            try:
                reader = VideoReader(file_name)
            except MaskRCNNError as error:
                print(f"no overlay for {file_name}: {error}")
        if reader is not None and (reader.info.height, reader.info.width) != size:
            reader.close()
            raise MaskRCNNError(f"{args.detections}: the masks of {file_name} are {size[1]}x{size[0]} but the video "
                                f"is {reader.info.width}x{reader.info.height}")
        images = iter(reader) if reader is not None else None
        count = reader.info.frame_count if reader is not None else None
        frames = ((t, chunk, detections, next(images, None) if images is not None else None)
                  for t, chunk, detections in frame_detections(entries, class_names, size, count))
        try:
            results.append(_track_one(file_name, name, frames, reader.info.fps if reader else 25.0, out, args))
        finally:
            if reader is not None:
                reader.close()
    return results


def _fps(video) -> float:
    from ..video import VideoReader

    with VideoReader(video) as reader:
        return reader.info.fps


def _track_one(file_name: str, output_name: str, frames, fps: float, out: Path, args):
    """Track one video's frames ((frame, entries, Detections, image or None) each), writing its overlay."""
    import contextlib

    from ..tracking.counting import LineCounter
    from ..tracking.outputs import VideoTracks, draw_tracks
    from ..video import VideoWriter

    tracker = _tracker(args)
    result = VideoTracks(file_name, output_name, counter=LineCounter(*args.count_line) if args.count_line else None)
    writer = None if args.no_overlay else VideoWriter(out / f"{output_name}_tracks.mp4", fps)
    with writer if writer is not None else contextlib.nullcontext():
        for t, entries, detections, image in frames:
            ids = tracker.update(detections)
            result.frames.append((t, entries, detections, ids))
            for track_id, pending in tracker.confirmed_now:  # their earlier detections, now known to be a track
                for frame, index in pending:
                    _, _, earlier, earlier_ids = result.frames[frame]
                    earlier_ids[index] = track_id
                    _count(result.counter, frame, track_id, earlier, index)
            for index in map(int, (ids >= 0).nonzero()[0]):
                _count(result.counter, t, int(ids[index]), detections, index)
            if writer is not None and image is not None:
                writer.write(draw_tracks(image, detections, ids, tracker.active, result.counter))
    return result


def _count(counter, frame: int, track_id: int, detections, index: int) -> None:
    if counter is not None:
        counter.update(frame, track_id, detections.names[index], detections.boxes[index])


def _write_all(results: list, out: Path) -> None:
    from ..files import write_text_atomic
    from ..tracking.outputs import mot_csv, summary_table

    out.mkdir(parents=True, exist_ok=True)
    entries = [entry for result in results for entry in result.tracked_entries()]
    summaries = [result.summary() for result in results]
    for result in results:
        write_text_atomic(out / f"{result.output_name}_mot.csv", mot_csv(result.mot_rows()))
    write_text_atomic(out / "tracks.json", json.dumps(entries))
    write_text_atomic(out / "summary.json", json.dumps({"videos": summaries}, indent=1))
    for summary in summaries:
        print(summary_table(summary))
    print(f"{len(entries)} tracked detections in {sum(s['tracks'] for s in summaries)} tracks -> {out / 'tracks.json'}")
