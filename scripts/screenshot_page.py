"""Take docs/page.png: the page at / after classifying the example images (a running server needed).

    prune-serve --models-dir models &
    python scripts/screenshot_page.py --url http://127.0.0.1:8000 --out docs/page.png
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--out", default=str(ROOT / "docs" / "page.png"))
    args = p.parse_args()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=["--headless=new", "--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        page.goto(args.url + "/")
        page.wait_for_selector("#variants tbody tr")
        page.set_input_files("#files", [str(ROOT / "examples" / f"{n}.jpg") for n in ("cat", "ship", "frog")])
        page.check("input[value=auto]")
        page.fill("#max-drop", "1")
        page.click("#classify")
        page.wait_for_selector(".card")
        page.wait_for_function("document.querySelector('#plot').naturalWidth > 0", timeout=30_000)
        page.screenshot(path=args.out, full_page=True)
        browser.close()


if __name__ == "__main__":
    main()
