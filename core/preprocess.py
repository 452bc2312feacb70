"""Image preprocessing shared by training (data set decoding, evaluation) and the service: the one
place that says how any image becomes the network's input."""

from __future__ import annotations

import torch
from PIL import Image, ImageOps
from torch import Tensor

IMAGE_SIZE = 32


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode (grey, palette, RGBA, CMYK, 16-bit, float) → 8-bit RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / 32-bit grey: rescale the actual range into 0..255 instead of clipping to white.
        image = image.convert("F")
        low, high = image.getextrema()
        scale = 255.0 / (high - low) if high > low else 0.0
        image = image.point(lambda v: (v - low) * scale).convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        # Composite transparency onto white (what a viewer shows) rather than dropping alpha.
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def preprocess(image: Image.Image) -> Tensor:
    """The evaluation transform: upright (EXIF orientation applied), RGB, shorter side resized to 32,
    centre crop 32×32 → uint8 [3, 32, 32].

    CIFAR-10's own images pass through unchanged; larger photos are shrunk the same way every time.
    A phone photo stores its pixels as the sensor saw them plus an orientation tag: without applying
    it, a portrait photo would be classified lying on its side.
    """
    image = upright(image)
    image = to_rgb(image)
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = ImageOps.fit(image, (IMAGE_SIZE, IMAGE_SIZE), method=Image.Resampling.BILINEAR,
                             centering=(0.5, 0.5))
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(IMAGE_SIZE, IMAGE_SIZE, 3).permute(2, 0, 1).contiguous()


def upright(image: Image.Image) -> Image.Image:
    """The image as its EXIF orientation tag says it should be seen (unchanged without a tag, or with
    an unreadable one: a broken tag is no reason to refuse the pixels)."""
    try:
        orientation = image.getexif().get(0x0112, 1)  # Orientation
    except Exception:  # noqa: BLE001 - malformed EXIF blocks raise many types
        return image
    if orientation in (None, 1):
        return image
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001
        return image


def normalize(images: Tensor, mean: list[float] | tuple[float, ...], std: list[float] | tuple[float, ...]) -> Tensor:
    """uint8 [N, 3, H, W] → float32, scaled to 0..1 and standardised with per-channel statistics."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return (images.float().div_(255.0) - mean_t) / std_t
