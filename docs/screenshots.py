"""The studio screenshots in the README and docs/studio.md, taken from real use: `tailor studio` on
the embedded SmolLM2-135M-Instruct and the quickstart's raw Lumen Lane support logs, driven in
Chromium as a user would (Playwright with Debian's chromium).

    python docs/screenshots.py            # writes docs/studio-*.png (about 5 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_studio_browser import BROWSER, StudioProcess, free_port  # noqa: E402

from tailor.quickstart import HERE  # noqa: E402

DOCS = Path(__file__).resolve().parent
DATA = HERE / "data" / "lumen_support.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DOCS)
    parser.add_argument("--steps", type=int, default=40, help="training steps of the job (the quickstart's: 64)")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="tailor-studio-shots-"))
    studio = StudioProcess(work / "workspace", free_port(), work / "studio.log")
    studio.env.pop("TAILOR_TEST_SAVE_STALL")  # real speed
    studio.start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=BROWSER, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(600_000)
            page.goto(studio.url + "/data")
            page.set_input_files("input[name=file]", str(DATA))
            page.click("#upload")
            page.check(f"input[name=files][value='{DATA.name}']")
            page.fill("input[name=name]", "lumen")
            allow = yaml.safe_load((HERE / "job.yaml").read_text())["data"]["privacy"]["allow"]
            page.fill("input[name=allow]", ", ".join(allow))  # the shop's own names, as the quickstart's job lists them
            page.click("#prepare")
            page.click("#open-card")
            page.screenshot(path=str(args.out / "studio-data-card.png"), full_page=False)
            page.click("text=ask the advisor first")
            page.click("#advise")
            page.wait_for_selector("#verdict")
            page.screenshot(path=str(args.out / "studio-advice.png"), full_page=False)
            page.fill("input[name=name]", "lumen-support")
            page.click("#create-job")
            page.wait_for_selector("#saved")
            page.fill("[name='k:training.max_steps']", str(args.steps))
            page.fill("[name='k:training.eval_every']", "10")
            page.fill("[name='k:training.val_generate']", "4")
            page.click("#save")
            page.wait_for_selector("#saved")
            page.click("#launch")
            page.wait_for_url("**/runs/lumen-support/*")
            page.wait_for_function("() => document.getElementById('chart-rouge').data && "
                                   "document.getElementById('chart-rouge').data[0].x.length >= 2")
            page.screenshot(path=str(args.out / "studio-live-run.png"), full_page=False)
            page.wait_for_selector("#results")
            page.click("text=Try it in the playground")
            page.fill("#question", "I've saved up 350 Glowpoints. Can I use them on my next order?")
            page.fill("#max-tokens", "80")
            page.click("#send")
            page.wait_for_selector("[data-side=base] .rate:not([hidden])")
            page.wait_for_selector("[data-side=tuned] .rate:not([hidden])")
            page.click("[data-side=tuned] .up")
            page.wait_for_function("() => document.querySelector('[data-side=tuned] .rated').textContent"
                                   ".includes('stored')")
            page.screenshot(path=str(args.out / "studio-playground.png"), full_page=False)
            browser.close()
    finally:
        studio.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"→ {', '.join(str(p) for p in sorted(args.out.glob('studio-*.png')))}")


if __name__ == "__main__":
    main()
