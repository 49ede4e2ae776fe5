"""Video in and out with OpenCV: frames as RGB arrays, overlays written as mp4.

OpenCV speaks BGR; everything else in this library speaks RGB, so the conversion happens here and
nowhere else.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import MaskRCNNError
from .files import temp_path

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")

# Some containers report no frame rate (0 or NaN); an overlay still needs one to be playable.
_FALLBACK_FPS = 30.0


def is_video(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


@dataclass
class VideoInfo:
    fps: float
    width: int
    height: int
    frame_count: int | None  # as the container claims it; None when unknown (it can also be wrong)


class VideoReader:
    """Frames of one video file, in order, as HxWx3 uint8 RGB arrays.

    Opening fails with a MaskRCNNError naming the file, so a bad video costs only that one input.
    """

    def __init__(self, path: str | os.PathLike):
        import cv2

        self.path = Path(path)
        if not self.path.is_file():
            raise MaskRCNNError(f"{self.path}: cannot read video: file not found")
        self._capture = cv2.VideoCapture(str(self.path))
        if not self._capture.isOpened():
            raise MaskRCNNError(f"{self.path}: cannot read video: OpenCV could not open it")
        fps = float(self._capture.get(cv2.CAP_PROP_FPS) or 0.0)
        count = int(self._capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.info = VideoInfo(
            fps=fps if np.isfinite(fps) and fps > 0 else _FALLBACK_FPS,
            width=int(self._capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
            height=int(self._capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            frame_count=count if count > 0 else None,
        )

    def __iter__(self) -> Iterator[np.ndarray]:
        import cv2

        while True:
            ok, frame = self._capture.read()
            if not ok:
                return
            if frame.ndim == 2:
                frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
            else:
                frame = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            yield frame

    def close(self) -> None:
        self._capture.release()

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class VideoWriter:
    """An mp4 (mp4v codec) written under a temporary name and renamed on success.

    The rename means an interrupted run never leaves a half-written file under the final name; the
    temporary name is `files.temp_path`'s, so a killed run's leftover is removed by the next run
    (`files.remove_stale_temps`). Frame size is fixed by the first frame; all frames must be HxWx3 uint8 RGB.
    """

    def __init__(self, path: str | os.PathLike, fps: float):
        self.path = Path(path)
        # The temporary name keeps the .mp4 suffix because OpenCV picks the container from it.
        self._tmp = temp_path(self.path, keep_suffix=True)
        self.fps = fps if np.isfinite(fps) and fps > 0 else _FALLBACK_FPS
        self._writer = None
        self.frames_written = 0

    def write(self, frame_rgb: np.ndarray) -> None:
        import cv2

        height, width = frame_rgb.shape[:2]
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = cv2.VideoWriter(str(self._tmp), cv2.VideoWriter_fourcc(*"mp4v"), self.fps,
                                           (width, height))
            if not self._writer.isOpened():
                raise MaskRCNNError(f"{self.path}: cannot write video (OpenCV has no mp4v encoder here)")
            self._size = (height, width)
        elif (height, width) != self._size:
            raise ValueError(f"frame size {(height, width)} differs from the first frame's {self._size}")
        self._writer.write(cv2.cvtColor(np.ascontiguousarray(frame_rgb), cv2.COLOR_RGB2BGR))
        self.frames_written += 1

    def close(self, keep: bool = True) -> None:
        """Finish the file; `keep=False` (after an error) removes it instead."""
        if self._writer is not None:
            self._writer.release()
            self._writer = None
        try:
            if keep and self.frames_written:
                if not self._tmp.is_file() or self._tmp.stat().st_size == 0:  # OpenCV reports no write errors
                    raise OSError(errno.EIO, "OpenCV wrote no video data (is the disk full?)", str(self.path))
                os.replace(self._tmp, self.path)
        finally:
            if self._tmp.exists():
                self._tmp.unlink()

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(keep=exc_type is None)


def predict_video(predictor, path: str | os.PathLike, overlay_path: str | os.PathLike | None = None,
                  progress: bool = True) -> Iterator[tuple]:
    """Yield `(frame_index, frame, Detections)` for every frame of a video, `predictor.batch_size` frames
    per forward pass, writing an overlay video (same fps and size) when `overlay_path` is given.

    The overlay is only kept if every frame went through; any error removes it and propagates.
    """
    from tqdm import tqdm

    with VideoReader(path) as reader:
        writer = VideoWriter(overlay_path, reader.info.fps) if overlay_path is not None else None
        bar = tqdm(total=reader.info.frame_count, unit="frame", desc=Path(path).name, disable=not progress,
                   dynamic_ncols=True)
        try:
            batch: list[np.ndarray] = []
            next_index = 0
            for frame in _with_end_marker(reader):
                if frame is not None:
                    batch.append(frame)
                if batch and (frame is None or len(batch) >= predictor.batch_size):
                    for frame_rgb, detections in zip(batch, predictor(batch)):
                        detections.file_name = str(path)
                        if writer is not None:
                            # Colour by class: per-instance colours would flicker from frame to frame.
                            writer.write(detections.draw(frame_rgb, color_by="class"))
                        bar.update(1)
                        yield next_index, frame_rgb, detections
                        next_index += 1
                    batch = []
            if next_index == 0:
                raise MaskRCNNError(f"{path}: cannot read video: no frames could be decoded")
        except BaseException:
            if writer is not None:
                writer.close(keep=False)
            raise
        else:
            if writer is not None:
                writer.close()
        finally:
            bar.close()


def _with_end_marker(frames: Iterator[np.ndarray]) -> Iterator[np.ndarray | None]:
    """The frames, then one None, so a batching loop can flush its last partial batch in one place."""
    yield from frames
    yield None
