"""Screenshots of app.py in a real browser: headless Chromium loads the page, uploads a demo test
image, types two captions, and keeps one PNG of each result (results/app/).

    apt-get install -y chromium chromium-driver && pip install selenium
    python -m lab.app_screenshots --ckpt runs/demo-tiny-s0-.../best.pt --out results/app

The page is started as `python app.py` on a free local port and stopped at the end. The browser runs
with no network features (no sync, component updates or background requests) and an empty profile.
Also prints, per caption, the seconds from pressing Enter to the new mask on the page.
"""
from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CAPTIONS = ("Unilateral pulmonary infection, one infected area, lower right lung.",
            "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung.")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,1250")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, server: subprocess.Popen, seconds: float = 120) -> None:
    end = time.time() + seconds
    while time.time() < end:
        if server.poll() is not None:
            sys.exit(f"app.py stopped (exit {server.returncode}) before serving")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    sys.exit(f"{url}: no answer within {seconds:.0f} s")


def browser(profile: Path):
    # deferred: selenium is an optional install (not in the requirements files)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = {name: shutil.which(name) for name in ("chromium", "chromedriver")}
    if not all(found.values()):
        sys.exit("chromium and chromedriver not on PATH; fix: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = found["chromium"]
    for flag in FLAGS + (f"--user-data-dir={profile}",):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(found["chromedriver"]))


def segment_with(driver, caption: str, timeout: float = 120) -> float:
    """Replace the caption, press Enter, wait until the page shows its result; seconds taken."""
    # deferred: selenium is an optional install (not in the requirements files)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    box = driver.find_element(By.CSS_SELECTOR, "#caption textarea")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(caption)
    start = time.perf_counter()
    box.send_keys(Keys.ENTER)
    WebDriverWait(driver, timeout).until(
        lambda d: repr(caption) in d.find_element(By.ID, "info").text.replace("\u2019", "'")
        and d.find_elements(By.CSS_SELECTOR, "#overlay img"))
    return time.perf_counter() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a trained demo best.pt (the captions must matter)")
    p.add_argument("--out", default="results/app", help="folder for the screenshots")
    p.add_argument("--index", type=int, default=0, help="which of the page's demo examples to upload")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        examples = Path(tmp) / "examples"
        server = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--ckpt", args.ckpt, "--port",
                                   str(port), "--examples-dir", str(examples)], cwd=REPO)
        driver = None
        try:
            wait_for(f"http://127.0.0.1:{port}/", server)
            image = sorted(examples.glob("demo_*.png"))[args.index]
            driver = browser(Path(tmp) / "profile")
            driver.get(f"http://127.0.0.1:{port}/")
            # deferred: selenium is an optional install (not in the requirements files)
            from selenium.webdriver.common.by import By
            from selenium.webdriver.support.ui import WebDriverWait

            WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))
            driver.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(image))
            for k, caption in enumerate(CAPTIONS, start=1):
                seconds = segment_with(driver, caption)
                time.sleep(1.0)  # let the gallery's heatmaps finish drawing
                shot = out / f"{image.stem}_caption{k}.png"
                driver.save_screenshot(str(shot))
                print(f"{shot}: {caption!r}, new mask on the page {seconds:.2f} s after Enter")
        finally:
            if driver is not None:
                driver.quit()
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
