"""Image reading: bit depths, colour modes and EXIF rotation, checked on real files written here."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from maskrcnn.data.images import DEFAULT_MAX_PIXELS, _apply_exif_orientation, read_image, to_float_tensor
from maskrcnn.errors import MaskRCNNError

SIXTEEN_BIT_VALUES = np.array([[0, 1, 255, 256], [1000, 30000, 65534, 65535]], dtype=np.uint16)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_grayscale_keeps_true_values(tmp_path, suffix):
    path = tmp_path / f"gray16{suffix}"
    Image.fromarray(SIXTEEN_BIT_VALUES).save(path)
    pixels = read_image(path)
    assert pixels.dtype == np.uint16
    assert pixels.shape == (2, 4, 3)
    for channel in range(3):
        np.testing.assert_array_equal(pixels[:, :, channel], SIXTEEN_BIT_VALUES)


def test_16bit_colour_png_keeps_true_values_in_rgb_order(tmp_path):
    rgb = np.stack([SIXTEEN_BIT_VALUES, SIXTEEN_BIT_VALUES[::-1], 65535 - SIXTEEN_BIT_VALUES], axis=2)
    path = tmp_path / "rgb16.png"
    assert cv2.imwrite(str(path), rgb[:, :, ::-1])  # OpenCV writes BGR
    pixels = read_image(path)
    assert pixels.dtype == np.uint16
    np.testing.assert_array_equal(pixels, rgb)


def test_8bit_modes_become_rgb_uint8(tmp_path):
    gray = np.array([[0, 10], [200, 255]], dtype=np.uint8)
    Image.fromarray(gray, mode="L").save(tmp_path / "gray.png")
    np.testing.assert_array_equal(read_image(tmp_path / "gray.png"), np.repeat(gray[:, :, None], 3, axis=2))

    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 20, 30, 0
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    rgb = read_image(tmp_path / "rgba.png")
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert (rgb == [10, 20, 30]).all()

    palette_image = Image.new("P", (3, 1))
    palette_image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (768 - 9))
    palette_image.putdata([2, 1, 0])
    palette_image.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(read_image(tmp_path / "palette.png")[0], [[0, 0, 255], [0, 255, 0], [255, 0, 0]])


def test_exif_rotated_jpeg_comes_out_upright(tmp_path):
    # Stored 40 wide x 20 high, left half red, right half blue; orientation 6 means "rotate 90 degrees
    # clockwise to display", which moves the left half to the top.
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = [255, 0, 0]
    stored[:, 20:] = [0, 0, 255]
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    image.save(path, quality=95, exif=exif.tobytes())

    pixels = read_image(path)
    assert pixels.shape == (40, 20, 3)
    top, bottom = pixels[5, 10].astype(int), pixels[35, 10].astype(int)
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize("orientation", range(1, 9))
def test_numpy_exif_orientation_matches_pil(tmp_path, orientation):
    stored = np.arange(3 * 5 * 3, dtype=np.uint8).reshape(3, 5, 3)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = orientation
    path = tmp_path / "oriented.png"
    image.save(path, exif=exif.tobytes())
    np.testing.assert_array_equal(_apply_exif_orientation(stored, orientation), read_image(path))


def test_corrupt_file_raises_error_naming_it(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(MaskRCNNError, match=r"broken\.jpg: cannot read image"):
        read_image(path)


def test_truncated_file_raises_error_naming_it(tmp_path):
    path = tmp_path / "half.png"
    Image.fromarray(np.full((64, 64, 3), 7, dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(MaskRCNNError, match=r"half\.png: cannot read image"):
        read_image(path)


def test_missing_file_raises_error_naming_it(tmp_path):
    with pytest.raises(MaskRCNNError, match=r"nothing\.png: cannot read image: file not found"):
        read_image(tmp_path / "nothing.png")


def test_to_float_tensor_scales_each_dtype_by_its_range():
    uint8 = np.array([[0, 51, 255]], dtype=np.uint8)
    out = to_float_tensor(uint8)
    assert out.shape == (3, 1, 3) and out.dtype == torch.float32
    assert torch.allclose(out[1, 0], torch.tensor([0.0, 0.2, 1.0]))

    uint16 = np.array([[0, 13107, 65535]], dtype=np.uint16)
    assert torch.allclose(to_float_tensor(uint16)[2, 0], torch.tensor([0.0, 0.2, 1.0]))

    boolean = np.array([[True, False]])
    assert to_float_tensor(boolean)[0, 0].tolist() == [1.0, 0.0]

    unit_float = np.array([[0.25, 1.0]], dtype=np.float64)
    assert torch.allclose(to_float_tensor(unit_float)[0, 0], torch.tensor([0.25, 1.0]))
    byte_range_float = np.array([[51.0, 255.0]], dtype=np.float32)
    assert torch.allclose(to_float_tensor(byte_range_float)[0, 0], torch.tensor([0.2, 1.0]))


def test_to_float_tensor_channel_layouts():
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 128
    out = to_float_tensor(rgba)
    assert out.shape == (3, 2, 3)
    assert (out[0] == 1).all() and (out[1:] == 0).all()

    single = np.full((2, 3, 1), 255, dtype=np.uint8)
    assert (to_float_tensor(single) == 1).all() and to_float_tensor(single).shape == (3, 2, 3)

    pil = Image.fromarray(np.array([[[255, 0, 51]]], dtype=np.uint8))
    assert torch.allclose(to_float_tensor(pil)[:, 0, 0], torch.tensor([1.0, 0.0, 0.2]))

    chw_uint8 = torch.tensor([[[255]], [[0]], [[51]]], dtype=torch.uint8)
    assert torch.allclose(to_float_tensor(chw_uint8)[:, 0, 0], torch.tensor([1.0, 0.0, 0.2]))
    chw_float = torch.rand(3, 4, 5)
    assert torch.equal(to_float_tensor(chw_float), chw_float)


@pytest.mark.parametrize("bad", [
    np.zeros((2, 3, 2), dtype=np.uint8),
    np.zeros((1, 2, 3, 3), dtype=np.uint8),
    np.zeros((2, 3, 3), dtype=np.int32),
    torch.zeros(2, 4, 4),
    torch.zeros(4, 4),
    "not an image",
])
def test_to_float_tensor_rejects_unsupported_input(bad):
    with pytest.raises(ValueError):
        to_float_tensor(bad)


def flat_png(path, width: int, height: int):
    """A one-bit PNG of one colour: a huge pixel count in a small file, cheap to make."""
    Image.new("1", (width, height)).save(path)
    return path


def test_too_many_pixels_refused_from_the_header_before_decoding(tmp_path, monkeypatch):
    big = flat_png(tmp_path / "big.png", 12000, 12000)
    assert big.stat().st_size < 1_000_000  # small file, 144 million pixels

    def no_decoding(self):
        raise AssertionError("decoded an image it should have refused")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    with pytest.raises(MaskRCNNError, match=r"big\.png: image has 12000x12000 = 144\.0 million pixels, over the "
                                            r"limit of 64 million"):
        read_image(big, max_pixels=DEFAULT_MAX_PIXELS)


def test_pixel_limit_is_inclusive_and_default_passes_a_24mp_photo(tmp_path):
    small = flat_png(tmp_path / "small.png", 10, 10)
    assert read_image(small, max_pixels=100).shape == (10, 10, 3)
    with pytest.raises(MaskRCNNError, match="small.png"):
        read_image(small, max_pixels=99)
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (6000, 4000), (90, 120, 30)).save(photo, quality=50)
    pixels = read_image(photo, max_pixels=DEFAULT_MAX_PIXELS)
    assert pixels.shape == (4000, 6000, 3) and abs(int(pixels[2000, 3000, 1]) - 120) <= 2


def test_running_out_of_memory_while_decoding_is_an_error_naming_the_file(tmp_path, monkeypatch):
    path = flat_png(tmp_path / "huge.png", 20, 20)

    def out_of_memory(self):
        raise MemoryError

    monkeypatch.setattr(Image.Image, "load", out_of_memory)
    with pytest.raises(MaskRCNNError, match=r"huge\.png: cannot read image: not enough memory"):
        read_image(path)
