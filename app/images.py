"""Upload decoding with the limits enforced before any expensive work.

Pillow's ``Image.open`` only reads the header, so width × height is checked against MAX_PIXELS before
a single pixel is decoded: a decompression bomb costs a header read, not gigabytes of memory.
The pixels then go through ``core.preprocess.preprocess``, the same function training evaluates with.

One shortcut: a 32×32 JPEG (what CIFAR-sized clients send) is decoded by libjpeg-turbo directly
(simplejpeg), which gives the same pixels as Pillow (its decoder is the same library) in a quarter of
the time, most of Pillow's being per-image Python: 64 images per request take ~1.0 ms of the event loop
instead of ~4.0 (`python scripts/decode_speed.py DATA`). Anything it is not certain to decode
identically — another size, an EXIF block (it may carry an orientation), CMYK or RGB-coded JPEG, any
libjpeg warning — goes through Pillow.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import simplejpeg
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from core.preprocess import IMAGE_SIZE, preprocess

# JPEG colour spaces libjpeg-turbo converts to RGB exactly as Pillow does (CMYK/YCCK/RGB-coded: Pillow)
_DIRECT_COLORSPACES = ("YCbCr", "Gray")


@dataclass
class ImageError(Exception):
    """One upload is unusable: ``status`` is the HTTP status to answer with."""

    status: int
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass
class Upload:
    """One upload whose header passed the limits; ``decode()`` → uint8 [3, 32, 32]."""

    name: str
    data: bytes
    pixels: int  # width × height, for choosing where to decode
    image: Image.Image | None  # None: a 32×32 JPEG for the direct decoder

    def decode(self) -> Tensor:
        if self.image is None:
            try:  # strict: a warning (corrupt data) raises, and Pillow decides as it always has
                array = simplejpeg.decode_jpeg(self.data, colorspace="RGB", strict=True)
                return torch.from_numpy(array).permute(2, 0, 1).contiguous()
            except ValueError:
                self.image = open_image(self.data, self.name, self.pixels)
        return decode_pixels(self.image, self.name)


def open_upload(data: bytes, name: str, max_pixels: int) -> Upload:
    """Read one upload's header and check it (no pixel is decoded); ImageError naming the file."""
    if IMAGE_SIZE * IMAGE_SIZE <= max_pixels and is_direct_jpeg(data):
        return Upload(name, data, IMAGE_SIZE * IMAGE_SIZE, None)
    image = open_image(data, name, max_pixels)
    return Upload(name, data, image.size[0] * image.size[1], image)


def is_direct_jpeg(data: bytes) -> bool:
    """A 32×32 JPEG without EXIF in a colour space libjpeg-turbo turns into Pillow's RGB (header only)."""
    if not data.startswith(b"\xff\xd8") or b"Exif\x00\x00" in data:
        return False
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data, strict=True)
    except ValueError:
        return False
    return (width, height) == (IMAGE_SIZE, IMAGE_SIZE) and colorspace in _DIRECT_COLORSPACES


def open_image(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Read one upload's header and check it (cheap: no pixel is decoded); ImageError naming the file."""
    if not data:
        raise ImageError(422, f"file {name!r} is empty")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as exc:
            raise ImageError(415, f"file {name!r} is not an image Pillow can read") from exc
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(413, f"file {name!r} is too large to decode safely") from exc
        except Exception as exc:  # noqa: BLE001 - corrupt headers raise many different types
            raise ImageError(415, f"file {name!r} has a corrupt image header ({type(exc).__name__})") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(413, f"file {name!r} is {width}×{height} = {width * height:,} pixels; "
                              f"the limit is MAX_PIXELS={max_pixels:,}")
    if width == 0 or height == 0:
        raise ImageError(422, f"file {name!r} has no pixels")
    return image


def decode_pixels(image: Image.Image, name: str) -> Tensor:
    """Decode an opened image (first frame of animations) → uint8 [3, 32, 32]."""
    try:
        image.seek(0)
        image.load()
        return preprocess(image)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # 415 like any other bytes no image decoder reads: the request's form was fine, its content is not
        raise ImageError(415, f"file {name!r} is truncated or corrupt ({exc})") from exc
    finally:
        image.close()
