"""Screenshot of the search page with results, for README (docs/search-page.png).

Serves INDEX on 127.0.0.1 in this process, opens `/?q=QUERY` in headless Debian chromium (Selenium +
chromedriver), waits for the result images, and saves a PNG of the page (palette-quantised to stay small).

    PYTHONPATH=src python scripts/search_page_screenshot.py runs/RN-Tiny-64-seed0/search/index \
        --query "a red circle" --output docs/search-page.png
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from PIL import Image
from search_index import running_server

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars")


def screenshot(index: str, query: str, output: Path, k: int, width: int, height: int) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    from clipforge import Searcher
    from clipforge.search.server import create_app

    searcher = Searcher(index, device="cpu")
    with running_server(create_app(searcher)) as base, tempfile.TemporaryDirectory() as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for flag in (*FLAGS, f"--window-size={width},{height}", f"--user-data-dir={profile}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        try:
            driver.get(f"{base}/?q={quote(query)}&k={k}")
            WebDriverWait(driver, 60).until(lambda d: d.execute_script(
                "const imgs = [...document.querySelectorAll('#results .card img')];"
                f"return imgs.length === {k} && imgs.filter(i => i.getBoundingClientRect().top < innerHeight)"
                ".every(i => i.complete && i.naturalWidth > 0);"))  # lazy images below the fold never load
            png = driver.get_screenshot_as_png()
        finally:
            driver.quit()
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    image.save(output, optimize=True)
    print(f"{output}: {output.stat().st_size / 1024:.0f} KB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("index")
    parser.add_argument("--query", default="a red circle")
    parser.add_argument("--output", type=Path, default=Path("docs/search-page.png"))
    parser.add_argument("-k", type=int, default=12)
    parser.add_argument("--width", type=int, default=1180)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args()
    screenshot(args.index, args.query, args.output, args.k, args.width, args.height)
    return 0


if __name__ == "__main__":
    sys.exit(main())
