"""Which files a `maskrcnn predict` run covers, and the names their output files get."""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm")


@dataclass
class InputItem:
    """One thing to predict: an image or a video, with the output name its files are written under."""

    index: int
    path: Path
    is_video: bool
    output_name: str = ""


def expand_inputs(patterns: list[str]) -> tuple[list[Path], list[str]]:
    """Files, folders and glob patterns -> (files in order, one message per pattern that found nothing).

    Globs are expanded here too, for shells (Windows) and quoting that leave them alone. A file reached
    twice (a folder and a glob over it) is predicted once.
    """
    from ..video import VIDEO_EXTENSIONS

    known = IMAGE_EXTENSIONS + VIDEO_EXTENSIONS
    files: list[Path] = []
    problems: list[str] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in known)
            if not found:
                problems.append(f"{pattern}: folder has no images or videos")
        elif path.exists():
            found = [path]
        elif glob.has_magic(pattern):
            found = sorted(Path(p) for p in glob.glob(pattern)
                           if Path(p).is_file() and Path(p).suffix.lower() in known)
            if not found:
                problems.append(f"{pattern}: pattern matches no images or videos")
        else:
            found = []
            problems.append(f"{pattern}: file not found")
        files.extend(found)
    seen: set[Path] = set()
    unique = []
    for path in files:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique, problems


def _output_files(name: str, is_video: bool) -> list[str]:
    if is_video:
        return [f"{name}_overlay.mp4"]
    return [f"{name}.png", f"{name}_semantic.png", f"{name}_instances.png"]


def assign_output_names(items: list[InputItem], recorded: dict[str, str] | None = None) -> None:
    """Give every input a name whose output files collide with no other input's.

    The first input keeps its plain stem; a later one with the same stem (a/x.jpg then b/x.jpg) gets its
    folder name in front ('b_x'), then its extension, then a number. Every process computes the same
    names from the same input list, which is what keeps torchrun runs consistent. `recorded` (file name ->
    output name, from the journal of the run being resumed) fixes those inputs' names and keeps the others
    off them, so a resumed run with more inputs never overwrites what the first part wrote.
    """
    recorded = recorded or {}
    claimed = {f.lower() for name in recorded.values() for video in (False, True) for f in _output_files(name, video)}
    for item in items:
        if str(item.path) in recorded:
            item.output_name = recorded[str(item.path)]
            continue
        stem = item.path.stem
        parent = item.path.parent.name or item.path.resolve().parent.name or "root"
        extension = item.path.suffix.lstrip(".").lower()
        candidates = [stem, f"{parent}_{stem}", f"{parent}_{stem}_{extension}"]
        number = 2
        while True:
            name = candidates.pop(0) if candidates else f"{parent}_{stem}_{extension}_{number}"
            files = [f.lower() for f in _output_files(name, item.is_video)]  # case-insensitive file systems
            if not claimed.intersection(files):
                break
            if not candidates:
                number += 1
        claimed.update(files)
        item.output_name = name
