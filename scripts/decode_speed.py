"""Upload decoding in process: 64 CIFAR-10 test JPEGs through Pillow (core.preprocess) vs the direct
libjpeg-turbo path app/images.py takes for 32×32 JPEGs; best of --repeats, and whether the pixels agree.
Also the rest of a request's work outside the forward pass, for the same images: parsing the multipart
body (Starlette, as /predict does) and building, validating and serialising the response.

    python scripts/decode_speed.py ../shared/data/cifar10-jpeg.tar.gz
    python scripts/decode_speed.py ../shared/data/cifar10-jpeg.tar.gz --compare-all   # every image's pixels
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from starlette.requests import Request  # noqa: E402

from app.images import decode_pixels, open_image, open_upload  # noqa: E402
from app.routers.predict import _response  # noqa: E402
from app.schemas import PredictResponse  # noqa: E402
from bench.speed import machine  # noqa: E402


def best_ms(function, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - began)
    return best * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="cifar10-jpeg.tar.gz")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--compare-all", action="store_true", help="also decode every JPEG in the archive both ways "
                                                              "and count the direct path and identical pixels")
    args = p.parse_args()
    files = []
    with tarfile.open(args.data) as tar:
        for member in tar:
            if member.isfile() and member.name.startswith("test/") and len(files) < args.images:
                files.append(tar.extractfile(member).read())

    def pillow() -> torch.Tensor:
        return torch.stack([decode_pixels(open_image(data, "x", 10**8), "x") for data in files])

    def direct() -> torch.Tensor:
        return torch.stack([open_upload(data, "x", 10**8).decode() for data in files])

    body, loop = multipart(files), asyncio.new_event_loop()
    assert parse(body, loop) == files
    print(f"{machine()}; {len(files)} test JPEGs, best of {args.repeats}")
    print(f"  Pillow (core.preprocess): {best_ms(pillow, args.repeats):.2f} ms")
    print(f"  app.images (direct path): {best_ms(direct, args.repeats):.2f} ms")
    print(f"  identical pixels: {torch.equal(pillow(), direct())}")
    parse_ms = best_ms(lambda: parse(body, loop), args.repeats)
    print(f"  multipart parse of the {len(body):,}-byte body: {parse_ms:.2f} ms")
    print(f"  response (top 3, validated, JSON): {best_ms(response_builder(len(files)), args.repeats):.2f} ms")
    if args.compare_all:
        total = direct_path = identical = 0
        with tarfile.open(args.data) as tar:
            for member in tar:
                if not (member.isfile() and member.name.lower().endswith((".jpg", ".jpeg"))):
                    continue
                data = tar.extractfile(member).read()
                upload = open_upload(data, member.name, 10**8)
                total += 1
                direct_path += upload.image is None
                identical += torch.equal(upload.decode(), decode_pixels(open_image(data, "x", 10**8), "x"))
        print(f"  every JPEG in the archive: {total:,}; direct path {direct_path:,}; identical pixels {identical:,}")


BOUNDARY = "decode-speed-boundary"


def multipart(files: list[bytes]) -> bytes:
    """A multipart/form-data body with every file in the field ``files``, as clients send it."""
    parts = [(f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{i}.jpg\"\r\n"
              "Content-Type: image/jpeg\r\n\r\n").encode() + data + b"\r\n" for i, data in enumerate(files)]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def parse(body: bytes, loop: asyncio.AbstractEventLoop) -> list[bytes]:
    """The uploads' bytes, parsed by Starlette from one in-memory body (what /predict's request.form() does)."""
    async def run() -> list[bytes]:
        async def receive() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        headers = [(b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode())]
        form = await Request({"type": "http", "method": "POST", "headers": headers}, receive).form()
        try:
            return [await item.read() for item in form.getlist("files")]
        finally:
            await form.close()

    return loop.run_until_complete(run())


def response_builder(images: int) -> Callable[[], str]:
    """/predict's response for ``images`` predictions, validated against its schema and serialised; the
    inputs are made once, so only that work is timed."""
    classes = [f"class{i}" for i in range(10)]
    service = SimpleNamespace(registry=SimpleNamespace(classes=classes))
    variant = SimpleNamespace(name="dense", keep=1.0, sparsity=0.0, granularity="weight")
    uploads = [(f"{i}.jpg", b"") for i in range(images)]
    probs = torch.softmax(torch.randn(images, len(classes), generator=torch.Generator().manual_seed(0)), dim=1)

    def build() -> str:
        response = _response(service, variant, uploads, probs, 3, 1.0, 2)
        return PredictResponse.model_validate(response).model_dump_json(by_alias=True)

    return build

if __name__ == "__main__":
    main()
