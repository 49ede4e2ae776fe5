"""Reading images of every common kind into one predictable form.

Everything downstream expects HxWx3 RGB, so this module is the one place that knows about EXIF
rotation, grayscale, palettes, alpha and 16-bit files.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from maskrcnn.errors import MaskRCNNError

# PIL modes whose pixels are 16-bit integers; np.asarray gives their true values as uint16/int32.
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_EXIF_ORIENTATION_TAG = 0x0112


# The limit `maskrcnn predict` and `Predictor` apply by default (see DEFAULT_MAX_PIXELS_HELP).
DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MAX_PIXELS_HELP = (
    "64 MP: photos from every current full-frame camera (up to 61 MP) and 8K video frames (33 MP) pass. "
    "The model sees a downscaled copy (its max_size, 1333 px by default) anyway, so more pixels add no "
    "detail, only memory: 3 bytes a pixel decoded, 12 as the model's float input, and full-size masks and "
    "overlays after it, which made a 144 MP PNG fail with an allocation error")


def read_image(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as HxWx3 RGB: uint8 for 8-bit files, uint16 (true values) for 16-bit files.

    EXIF orientation is applied so the pixels match what photo viewers (and annotation tools) show.
    `max_pixels`: refuse (MaskRCNNError) an image with more pixels, from its header, before decoding it.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # Pillow's warning above 89 million pixels would be a second, traceback-like line; the limit that
            # applies is ours (and Pillow's error at twice that, which becomes our one-line error).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as pil_image:
                _check_size(path, pil_image.size, max_pixels)
                if _is_16bit_colour(pil_image):
                    # PIL silently truncates 16-bit colour to 8 bits; OpenCV keeps the full range.
                    orientation = pil_image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
                    return _read_16bit_colour(path, orientation)
                pil_image.load()
                pil_image = ImageOps.exif_transpose(pil_image)
                return pil_to_rgb_array(pil_image)
    except MaskRCNNError:
        raise
    except FileNotFoundError:
        raise MaskRCNNError(f"{path}: cannot read image: file not found") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise MaskRCNNError(f"{path}: cannot read image: {error}") from None
    except MemoryError:
        raise MaskRCNNError(f"{path}: cannot read image: not enough memory to decode it") from None


def _check_size(path: Path, size: tuple[int, int], max_pixels: int | None) -> None:
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise MaskRCNNError(f"{path}: image has {width}x{height} = {width * height / 1e6:.1f} million pixels, "
                            f"over the limit of {max_pixels / 1e6:g} million (raise it with --max-pixels or "
                            "Predictor(max_pixels=...))")


# Formats whose files end with a fixed marker: a file without it was cut short (caught without decoding).
_END_MARKERS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND"}
_TAIL_BYTES = 4096  # room for data some cameras and tools append after the end marker


def read_image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file as read_image returns it (after EXIF rotation), from the header.

    No pixels are decoded. JPEG and PNG files must also end with their end marker, so a file cut short
    is caught here rather than when it is first read; other damage to the pixel data is not. A PNG whose
    EXIF block comes after its pixels (rare) is not rotated here (Pillow finds it only by decoding)."""
    path = Path(path)
    try:
        with Image.open(path) as pil_image:
            width, height = pil_image.size
            orientation = _header_orientation(pil_image)
            marker = _END_MARKERS.get(pil_image.format)
    except FileNotFoundError:
        raise MaskRCNNError(f"{path}: image file not found") from None
    except MemoryError:
        raise
    except Exception as error:  # Pillow's parsers raise many kinds on damaged headers; all mean "unreadable"
        raise MaskRCNNError(f"{path}: cannot read image header: {type(error).__name__}: {error}") from None
    if marker is not None:
        with open(path, "rb") as file:
            file.seek(0, 2)
            file.seek(max(0, file.tell() - _TAIL_BYTES))
            if marker not in file.read():
                raise MaskRCNNError(f"{path}: image file is truncated (it does not end with the "
                                    f"{pil_image.format} end marker)")
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _header_orientation(pil_image: Image.Image) -> int:
    if pil_image.format == "PNG":  # Pillow's PNG getexif() decodes the whole file when the header has no EXIF
        raw = pil_image.info.get("exif")
        if not raw:
            return 1
        exif = Image.Exif()
        exif.load(raw)
        return exif.get(_EXIF_ORIENTATION_TAG, 1)
    return pil_image.getexif().get(_EXIF_ORIENTATION_TAG, 1)


def pil_to_rgb_array(pil_image: Image.Image) -> np.ndarray:
    """Convert a PIL image of any mode to HxWx3, keeping 16-bit grayscale values as uint16."""
    mode = pil_image.mode
    if mode in _SIXTEEN_BIT_MODES:
        gray = np.asarray(pil_image)
        # Mode "I" is 32-bit signed; 16-bit files land there on some Pillow versions.
        gray = np.clip(gray, 0, 65535).astype(np.uint16)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        gray = np.asarray(pil_image, dtype=np.float32)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode != "RGB":
        # Covers L, LA, P, PA, RGBA, CMYK, YCbCr, 1 ...: alpha is dropped, palettes expanded.
        pil_image = pil_image.convert("RGB")
    return np.array(pil_image, dtype=np.uint8)


def _is_16bit_colour(pil_image: Image.Image) -> bool:
    if pil_image.mode not in ("RGB", "RGBA"):
        return False
    for tile in pil_image.tile:
        rawmode = tile.args if isinstance(tile.args, str) else (tile.args[0] if tile.args else "")
        if isinstance(rawmode, str) and ";16" in rawmode:
            return True
    return False


def _read_16bit_colour(path: Path, orientation: int) -> np.ndarray:
    import cv2

    pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise MaskRCNNError(f"{path}: cannot read image: unsupported 16-bit colour layout")
    rgb = np.ascontiguousarray(pixels[:, :, 2::-1])  # BGR(A) -> RGB
    return np.ascontiguousarray(_apply_exif_orientation(rgb, orientation))


def _apply_exif_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Numpy version of ImageOps.exif_transpose, for arrays that did not come through PIL."""
    if orientation == 2:
        return pixels[:, ::-1]
    if orientation == 3:
        return pixels[::-1, ::-1]
    if orientation == 4:
        return pixels[::-1]
    if orientation == 5:
        return pixels.transpose(1, 0, 2)
    if orientation == 6:
        return np.rot90(pixels, k=-1)
    if orientation == 7:
        return pixels[::-1, ::-1].transpose(1, 0, 2)
    if orientation == 8:
        return np.rot90(pixels, k=1)
    return pixels


def to_float_tensor(image) -> torch.Tensor:
    """Turn any supported image into a (3,H,W) float32 tensor in [0,1], the model's input form.

    Accepts a numpy array (HxW, HxWx1/3/4), a PIL image, or a (C,H,W) torch tensor (C in 1/3/4).
    Integer pixels are divided by their type's full range; float numpy pixels are taken as already in
    [0,1] unless their maximum exceeds 1, in which case they are assumed to be 0..255.
    """
    if isinstance(image, Image.Image):
        image = pil_to_rgb_array(image)
    if isinstance(image, np.ndarray):
        return _numpy_to_float_tensor(image)
    if isinstance(image, torch.Tensor):
        return _tensor_to_float_tensor(image)
    raise ValueError(f"unsupported image type {type(image).__name__}; expected numpy array, PIL image or tensor")


def _numpy_to_float_tensor(pixels: np.ndarray) -> torch.Tensor:
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3, 4):
        raise ValueError(f"unsupported image shape {tuple(pixels.shape)}; expected HxW or HxWx1/3/4")
    if pixels.shape[2] == 4:
        pixels = pixels[:, :, :3]
    elif pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)

    if pixels.dtype == np.uint8:
        scaled = pixels.astype(np.float32) / 255.0
    elif pixels.dtype == np.uint16:
        scaled = pixels.astype(np.float32) / 65535.0
    elif pixels.dtype == np.bool_:
        scaled = pixels.astype(np.float32)
    elif np.issubdtype(pixels.dtype, np.floating):
        scaled = pixels.astype(np.float32)
        if scaled.size and float(scaled.max()) > 1.0:
            scaled = scaled / 255.0
    else:
        raise ValueError(f"unsupported image dtype {pixels.dtype}; expected uint8, uint16, bool or float")
    return torch.from_numpy(np.ascontiguousarray(scaled.transpose(2, 0, 1)))


def _tensor_to_float_tensor(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3, 4):
        raise ValueError(f"unsupported tensor shape {tuple(tensor.shape)}; expected (C,H,W) with C in 1/3/4")
    if tensor.shape[0] == 4:
        tensor = tensor[:3]
    elif tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    if tensor.dtype == torch.uint8:
        return tensor.float() / 255.0
    if tensor.dtype == torch.uint16:
        return tensor.float() / 65535.0
    if tensor.dtype == torch.bool:
        return tensor.float()
    if tensor.is_floating_point():
        return tensor.float()
    raise ValueError(f"unsupported tensor dtype {tensor.dtype}; expected uint8, uint16, bool or float")
