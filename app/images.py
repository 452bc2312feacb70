"""Upload decoding with the limits enforced before any expensive work.

Pillow's ``Image.open`` only reads the header, so width × height is checked against MAX_PIXELS before
a single pixel is decoded: a decompression bomb costs a header read, not gigabytes of memory.
The pixels then go through ``core.preprocess.preprocess``, the same function training evaluates with.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError
from torch import Tensor

from core.preprocess import preprocess


@dataclass
class ImageError(Exception):
    """One upload is unusable: ``status`` is the HTTP status to answer with."""

    status: int
    message: str

    def __str__(self) -> str:
        return self.message


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
