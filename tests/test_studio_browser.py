"""Tailor Studio in a real browser (Debian's Chromium, driven headless by Playwright), on the tiny
model, as a new user would go: upload → prepare → data card → the advisor → create the job → edit
it → launch → the curve grows → the studio process is stopped mid-run and started again → the run
is still followed and finishes → results and report → playground answer → thumbs-up → feedback
count → continue from the feedback → the new job queued (and cancelled). Screenshots go to the
test's temporary folder (and to STUDIO_SCREENSHOTS, when set, for the docs)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tailor.studio.queue import process_start

from conftest import make_conversations

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StudioProcess:
    """`tailor studio` as its own process, as a user starts it."""

    def __init__(self, workspace: Path, port: int, log: Path):
        self.args = [sys.executable, "-m", "tailor", "studio", "--workspace", str(workspace), "--port", str(port)]
        # each checkpoint save of the tiny run pauses, so that the run lasts long enough to be watched
        # and to outlive a studio restart
        self.env = {**os.environ, "TAILOR_TEST_SAVE_STALL": "0.4"}
        self.url, self.log, self.process = f"http://127.0.0.1:{port}", log, None

    def start(self) -> "StudioProcess":
        self.process = subprocess.Popen(self.args, env=self.env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", int(self.url.rsplit(":", 1)[1])), timeout=1).close()
                return self
            except OSError:
                assert self.process.poll() is None, self.log.read_text()[-3000:]
                assert time.monotonic() < deadline, "the studio did not start"
                time.sleep(0.2)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)


@pytest.fixture
def browser():
    if BROWSER is None:
        if os.environ.get("CI") == "true":
            pytest.fail("no Chromium: .ci/run installs Debian's chromium package; the browser test must run in CI")
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=BROWSER, headless=True, args=["--no-sandbox"])
        yield launched
        launched.close()


def points(page) -> int:
    return page.evaluate("() => (document.getElementById('chart-loss').data || [{x: []}])[0].x.length")


def test_the_whole_flow_in_a_browser_survives_a_studio_restart(browser, tmp_path, tiny_model_dir):
    shots = Path(os.environ.get("STUDIO_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    workspace = tmp_path / "workspace"
    studio = StudioProcess(workspace, free_port(), tmp_path / "studio.log").start()
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    trainings = []
    try:
        # 1 · upload and prepare
        records = make_conversations(80)
        records[7]["messages"][0]["content"] = "I'm Priya Nair (priya.nair@example.com): my lamp flickers?"
        raw = tmp_path / "support.jsonl"
        raw.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"messages": [{"role": "bot"}]}\n')
        page.goto(studio.url + "/data")
        page.set_input_files("input[name=file]", str(raw))
        page.click("#upload")
        page.check("input[name=files][value='support.jsonl']")
        page.fill("input[name=name]", "support")
        page.fill("input[name=model]", str(tiny_model_dir))
        page.click("#prepare")
        page.click("#open-card", timeout=120_000)
        assert "kept 80" in page.inner_text("#counts") and "rejected 1" in page.inner_text("#counts")
        assert "EMAIL_ADDRESS" in page.inner_text("#privacy") and "Priya" not in page.content()
        page.screenshot(path=str(shots / "studio-data-card.png"), full_page=True)

        # 2-3 · the advisor, and the job it writes
        page.click("text=ask the advisor first")
        page.click("#advise")
        page.wait_for_selector("#verdict", timeout=120_000)
        page.fill("input[name=name]", "support-bot")
        page.click("#create-job")
        page.wait_for_selector("#saved")
        page.click("summary:text-is('eval')")  # a closed section of the editor
        for key, value in {"model.base": str(tiny_model_dir), "model.dtype": "float32", "training.max_steps": "60",
                           "training.save_every": "2", "training.log_every": "1", "training.eval_every": "15",
                           "training.val_generate": "2", "training.val_generate_tokens": "6",
                           "training.replay.enabled": "false", "eval.max_new_tokens": "8",
                           "eval.retention": "false"}.items():
            field = page.locator(f"[name='k:{key}']")
            if field.evaluate("e => e.tagName") == "SELECT":
                field.select_option(value)
            else:
                field.fill(value)
        page.click("#save")
        page.wait_for_selector("#saved")

        # 5 · launch; the run page follows the training live
        page.click("#launch")
        page.wait_for_url("**/runs/support-bot/*", timeout=120_000)
        page.wait_for_function("() => document.getElementById('chart-loss').data && "
                               "document.getElementById('chart-loss').data[0].x.length >= 2", timeout=120_000)
        seen = points(page)
        page.wait_for_function(f"() => document.getElementById('chart-loss').data[0].x.length > {seen}")
        page.screenshot(path=str(shots / "studio-live-run.png"), full_page=True)
        run_url = page.url

        # the studio stops mid-run and starts again: the training went on, the page finds it again
        job = json.loads(subprocess.run([sys.executable, "-c", (
            "import json,sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.row_factory=sqlite3.Row; "
            "print(json.dumps([dict(r) for r in c.execute('select * from jobs')]))"),
            str(workspace / ".studio" / "queue.db")], capture_output=True, text=True).stdout)[0]
        trainings.append(job["pid"])
        assert job["state"] == "running" and process_start(job["pid"]) == job["proc_start"]
        studio.stop()
        assert process_start(job["pid"]) == job["proc_start"], "stopping the studio stopped the training"
        studio.start()
        page.goto(run_url)
        assert page.inner_text("#run-state") in ("running", "done")
        page.wait_for_selector("#results", timeout=180_000)  # the page reloads itself when the run ends
        assert page.inner_text("#gate") in ("PASSED", "FAILED") and "rouge_l" in page.inner_text("#eval-table")
        page.screenshot(path=str(shots / "studio-run-done.png"), full_page=True)
        with page.expect_popup() as popup:
            page.click("text=The full report")
        report = popup.value
        report.wait_for_selector(".main-svg")  # its charts drawn, offline
        assert report.title().startswith("Tailor run")
        report.close()

        # 7 · the playground: tuned and base side by side, streamed; a thumbs-up is stored
        page.click("text=Try it in the playground")
        page.fill("#question", "lamp glow?")
        page.fill("#max-tokens", "12")
        page.click("#send")
        page.wait_for_selector("[data-side=tuned] .rate:not([hidden])")
        assert page.inner_text("#answer-tuned").strip() and page.inner_text("#answer-base").strip()
        page.click("[data-side=tuned] .up")
        page.wait_for_function("() => document.querySelector('[data-side=tuned] .rated').textContent"
                               ".includes('stored')")
        page.screenshot(path=str(shots / "studio-playground.png"), full_page=True)

        # the feedback loop: the count rose; continuing queues a job that starts from this run
        page.goto(studio.url + "/feedback")
        tuned = "support-bot-" + run_url.rstrip("/").rsplit("/", 1)[1]
        assert page.inner_text(f"tr[data-model='{tuned}'] .rated-count") == "1"
        page.screenshot(path=str(shots / "studio-feedback.png"), full_page=True)
        page.click(f"tr[data-model='{tuned}'] .continue")
        page.click("#task-result", timeout=180_000)
        assert "support-bot-feedback" in page.content()
        assert page.inner_text("#job-state") in ("queued", "running")
        page.click("text=Cancel")
        page.wait_for_selector("#job-state.state-cancelled")
    finally:
        page.close()
        if studio.process.poll() is None:
            studio.stop()
        for pid in trainings:  # nothing of the test left running
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
