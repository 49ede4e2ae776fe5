"""What a request may send, and how an upload becomes an image: size limits while reading, then `read_image`.

The body is never held whole in memory: a declared Content-Length over the limit is refused before reading,
and an undeclared (chunked) one is counted as it streams and refused at the first byte over. The image goes
to a temporary file and through `data.images.read_image`, the reader `maskrcnn predict` uses, so a server
answer is made from the very pixels `predict` would see (EXIF rotation, 16-bit, grayscale, the pixel limit).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.images import read_image, read_image_size
from ..errors import MaskRCNNError


class HTTPProblem(Exception):
    """A request the server refuses: the status code and the one line that goes in `{"error": ...}`."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int
    max_pixels: int | None

    def describe(self) -> dict:
        return {"max_upload_mb": self.max_upload_bytes / 1e6,
                "max_pixels": self.max_pixels, "accepted": ["multipart field 'image'", "raw image/* body"]}

    def too_large(self) -> HTTPProblem:
        return HTTPProblem(413, f"upload is larger than the limit of {self.max_upload_bytes / 1e6:g} MB "
                                "(--max-upload-mb)")

    def check_declared_length(self, headers) -> None:
        """Refuse at once a body whose Content-Length is over the limit, before reading any of it."""
        declared = headers.get("content-length")
        if declared is None:
            return
        try:
            length = int(declared)
        except ValueError:
            raise HTTPProblem(400, f"bad Content-Length header {declared!r}") from None
        if length > self.max_upload_bytes:
            raise self.too_large()

    def limit_receive(self, receive):
        """An ASGI `receive` that raises `too_large()` at the first body byte over the limit, so multipart
        parsing (which spools files to disk itself) stops there too."""
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_upload_bytes:
                    raise self.too_large()
            return message

        return limited


class UploadFolder:
    """The server's own temporary folder: one file per upload while it is decoded, removed right after."""

    def __init__(self):
        self.path = Path(tempfile.mkdtemp(prefix="maskrcnn-serve-"))

    def new_file(self) -> Path:
        handle, name = tempfile.mkstemp(dir=self.path, suffix=".upload")
        os.close(handle)
        return Path(name)

    def remove(self) -> None:
        """Removes the files this server made (uploads still being read, if any) and the folder."""
        for path in self.path.glob("*.upload"):
            path.unlink(missing_ok=True)
        self.path.rmdir()


def decode_upload(path: Path, shown_name: str, limits: Limits) -> np.ndarray:
    """The uploaded file -> HxWx3 image, as `maskrcnn predict` reads it; one-line HTTPProblems otherwise."""
    if path.stat().st_size == 0:
        raise HTTPProblem(400, "empty body: no image was sent")
    try:
        read_image_size(path)  # the header and, for JPEG/PNG, the end marker: a truncated file stops here
        return read_image(path, limits.max_pixels)
    except MaskRCNNError as error:
        message = str(error).replace(str(path), shown_name).replace(f"'{shown_name}'", "it")
        if "million pixels, over the limit" in message:
            message = message.replace("--max-pixels or Predictor(max_pixels=...)", "serve --max-pixels")
            raise HTTPProblem(413, message) from None
        raise HTTPProblem(422, message) from None
