"""Upload decoding: the direct libjpeg-turbo path for 32×32 JPEGs gives exactly what the Pillow path
(core.preprocess, what training evaluates with) gives, and refuses exactly what it refuses."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from app.images import ImageError, decode_pixels, is_direct_jpeg, open_image, open_upload


def encode(array: np.ndarray, mode: str = "RGB", **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, format="JPEG", **save)
    return buffer.getvalue()


def noise(seed: int, size: tuple[int, int] = (32, 32)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def through_pillow(data: bytes) -> torch.Tensor:
    return decode_pixels(open_image(data, "x", 10**8), "x")


DIRECT = [
    ({}, "RGB"),
    ({"subsampling": 0, "quality": 95}, "RGB"),  # 4:4:4
    ({"subsampling": 1, "quality": 50}, "RGB"),  # 4:2:2
    ({"subsampling": 2, "quality": 75}, "RGB"),  # 4:2:0, what CIFAR-10's JPEGs are
    ({"progressive": True}, "RGB"),
    ({"optimize": True, "quality": 30}, "RGB"),
    ({}, "L"),  # greyscale: replicated to three channels by both
]


@pytest.mark.parametrize("save, mode", DIRECT)
def test_direct_jpeg_decoding_is_pixel_identical_to_pillow(save: dict, mode: str) -> None:
    for seed in range(5):
        data = encode(noise(seed), mode, **save)
        assert is_direct_jpeg(data)
        upload = open_upload(data, "x.jpg", 10**8)
        assert upload.image is None  # the direct path was taken
        assert torch.equal(upload.decode(), through_pillow(data))


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: only Pillow's path applies it
    buffer = io.BytesIO()
    Image.fromarray(noise(1)).save(buffer, format="JPEG", exif=exif.tobytes())
    return buffer.getvalue()


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(noise(2)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("data", [
    encode(noise(3, (48, 40))),  # another size: resized by Pillow
    encode(np.dstack([noise(4), noise(5)[..., :1]]), "CMYK"),  # Pillow's CMYK → RGB differs from libjpeg's
    _exif_rotated(),
    _png(),
    b"\xff\xd8 not really a jpeg",
], ids=["48x40", "cmyk", "exif", "png", "fake-jpeg"])
def test_other_uploads_go_through_pillow(data: bytes) -> None:
    assert not is_direct_jpeg(data)
    try:
        upload = open_upload(data, "x", 10**8)
    except ImageError as exc:  # the fake one: refused exactly as before
        assert exc.status == 415
        return
    assert upload.image is not None
    assert torch.equal(upload.decode(), through_pillow(data))


def test_corrupt_jpegs_get_the_answer_pillow_gives() -> None:
    """Truncations and bit flips: where libjpeg only warns, Pillow still decides, so a request's
    outcome (these pixels, or 415 naming the file) does not depend on which path read it."""
    original = encode(noise(6), subsampling=2, quality=75)
    rng = random.Random(0)
    cases = [original[:cut] for cut in range(2, len(original), 23)]
    for _ in range(150):
        damaged = bytearray(original)
        damaged[rng.randrange(2, len(original))] ^= 1 << rng.randrange(8)
        cases.append(bytes(damaged))
    outcomes = set()
    for data in cases:
        try:
            expected = through_pillow(data)
        except ImageError as exc:
            expected = exc.status
        try:
            got = open_upload(data, "x", 10**8).decode()
        except ImageError as exc:
            got = exc.status
        outcomes.add((type(expected).__name__, type(got).__name__))
        assert type(got) is type(expected)
        assert got == expected if isinstance(got, int) else torch.equal(got, expected)
    assert ("Tensor", "Tensor") in outcomes and ("int", "int") in outcomes  # both kinds were exercised


def test_pixel_limit_applies_to_direct_jpegs_too() -> None:
    with pytest.raises(ImageError) as caught:
        open_upload(encode(noise(7)), "small.jpg", max_pixels=1000)  # 32×32 = 1,024 pixels
    assert caught.value.status == 413 and "small.jpg" in caught.value.message
