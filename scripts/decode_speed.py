"""Upload decoding in process: 64 CIFAR-10 test JPEGs through Pillow (core.preprocess) vs the direct
libjpeg-turbo path app/images.py takes for 32×32 JPEGs; best of --repeats, and whether the pixels agree.

    python scripts/decode_speed.py ../shared/data/cifar10-jpeg.tar.gz
    python scripts/decode_speed.py ../shared/data/cifar10-jpeg.tar.gz --compare-all   # every image's pixels
"""

from __future__ import annotations

import argparse
import sys
import tarfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from app.images import decode_pixels, open_image, open_upload  # noqa: E402
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

    print(f"{machine()}; {len(files)} test JPEGs, best of {args.repeats}")
    print(f"  Pillow (core.preprocess): {best_ms(pillow, args.repeats):.2f} ms")
    print(f"  app.images (direct path): {best_ms(direct, args.repeats):.2f} ms")
    print(f"  identical pixels: {torch.equal(pillow(), direct())}")
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


if __name__ == "__main__":
    main()
