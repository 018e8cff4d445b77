"""Tailor Studio's pages and actions over HTTP, on the tiny model: safety (host, token, CSRF,
paths), upload and prepare, the job editor's inline errors, the queue to a finished run, the
playground and the feedback loop. The browser test (test_studio_browser.py) drives the same flow
in Chromium."""

import json
import os
import re
import time
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from tailor.studio.app import Studio, create_app
from tailor.studio.queue import JobQueue
from tailor.studio.server import StudioSettingsError, build
from tailor.studio.workspace import Workspace, WorkspaceError

from conftest import make_conversations


def make_studio(root: Path, token: str | None = None, host: str = "127.0.0.1", start: bool = False, **kw):
    ws = Workspace(root)
    queue = JobQueue(ws.queue_db, ws.logs_dir, workdir=ws.root, poll_seconds=0.2)
    if start:
        queue.start()
    studio = Studio(ws, queue, token=token, host=host, **kw)
    return studio, TestClient(create_app(studio), base_url="http://127.0.0.1")


@pytest.fixture
def studio(tmp_path):
    studio, client = make_studio(tmp_path / "ws")
    yield studio, client
    studio.queue.stop()


def csrf(studio) -> dict:
    return {"X-Studio-CSRF": studio.csrf}


def until(condition, seconds: float = 120):
    deadline = time.monotonic() + seconds
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)
    return value


def upload(client, studio, name: str, content: bytes):
    return client.post(f"/data/upload?csrf={studio.csrf}", files={"file": (name, content)})


def wait_task(client, studio, response) -> int:
    task_id = int(response.headers["location"].rsplit("/", 1)[1])
    until(lambda: studio.tasks.get(task_id).state != "running")
    return task_id


# --- safety ------------------------------------------------------------------------------------------


def test_a_studio_others_can_reach_needs_a_token(tmp_path):
    with pytest.raises(StudioSettingsError, match="--token"):
        build(tmp_path / "ws", host="0.0.0.0")


def test_host_csrf_and_token_are_checked(studio, tmp_path):
    s, client = studio
    assert client.get("/", headers={"Host": "evil.example"}).status_code == 400  # DNS rebinding
    assert client.get("/").status_code == 200
    # a form posted from another site (no CSRF value, or another origin) changes nothing
    assert client.post("/jobs/x/launch").status_code == 403
    assert client.post("/jobs/x/launch", headers={**csrf(s), "Origin": "http://evil.example"}).status_code == 403
    assert s.queue.list() == []
    guarded, other = make_studio(tmp_path / "ws2", token="s3cret", host="0.0.0.0")
    assert other.get("/", headers={"Host": "10.0.0.5:7860"}).status_code == 401
    entered = other.get("/?token=s3cret", headers={"Host": "10.0.0.5:7860"}, follow_redirects=False)
    assert entered.status_code == 303 and other.cookies.get("tailor_studio") == "s3cret"
    assert other.get("/", headers={"Host": "10.0.0.5:7860"}).status_code == 200
    stranger = TestClient(other.app, base_url="http://10.0.0.5:7860")
    assert stranger.get("/?token=wrong").status_code == 401 and stranger.get("/").status_code == 401


def test_uploads_stay_inside_the_workspace_and_within_the_limit(studio, tmp_path):
    s, client = studio
    s.max_upload_bytes = 1000
    line = (json.dumps(make_conversations(1)[0]) + "\n").encode()
    assert upload(client, s, "../../outside.jsonl", line).status_code == 200
    assert (s.workspace.data_dir / "outside.jsonl").is_file() and not (tmp_path / "outside.jsonl").exists()
    refused = upload(client, s, "big.jsonl", line * 100)
    assert "upload limit" in refused.text and not (s.workspace.data_dir / "big.jsonl").exists()
    assert not list(s.workspace.data_dir.glob(".*partial"))
    assert "tailor prepare reads" in upload(client, s, "notes.exe", b"x").text
    # a symlink in the workspace that leads out is never followed
    secret = tmp_path / "secret.jsonl"
    secret.write_bytes(line)
    os.symlink(secret, s.workspace.data_dir / "link.jsonl")
    with pytest.raises(WorkspaceError, match="outside the workspace"):
        s.workspace.data_file("link.jsonl")
    page = client.post(f"/data/prepare?csrf={s.csrf}", data={"files": ["link.jsonl"], "name": "p"})
    assert "outside the workspace" in page.text and not (s.workspace.prepared_dir / "p").exists()
    assert "not a path inside data/" in client.post(f"/data/prepare?csrf={s.csrf}",
                                         data={"files": ["../../secret.jsonl"], "name": "p"}).text


# --- data ---------------------------------------------------------------------------------------------


def test_upload_prepare_and_the_card_with_anonymized_rejects(studio, tiny_model_dir):
    s, client = studio
    records = make_conversations(30)
    records[3]["messages"][0]["content"] = "Hi, I'm Priya Nair, write to priya.nair@example.com about my lamp?"
    lines = [json.dumps(r) for r in records]
    lines.insert(5, '{"messages": [{"role": "bot", "content": "call Priya Nair at priya.nair@example.com '
                    'about the Beacon"}]}')
    assert upload(client, s, "support.jsonl", ("\n".join(lines) + "\n").encode()).status_code == 200
    started = client.post(f"/data/prepare?csrf={s.csrf}", data={"files": ["support.jsonl"], "name": "support",
                                                                 "model": str(tiny_model_dir), "allow": "Beacon"},
                          follow_redirects=False)
    task_id = wait_task(client, s, started)
    task = s.tasks.get(task_id)
    assert task.state == "done", task.error
    events = client.get(f"/tasks/{task_id}/events").text  # the whole log, then the end
    assert "event: line" in events and '"state": "done"' in events and "event: end" in events
    card = client.get("/data/support")
    assert card.status_code == 200
    assert re.search(r"read 31 · kept 30 · rejected 1", card.text)
    assert "EMAIL_ADDRESS" in card.text and "PERSON" in card.text  # the audit counts
    assert "must be one of" in card.text  # the reject's reason
    assert "Priya" not in card.text and "priya.nair@example.com" not in card.text  # previews are anonymized
    # the reject, as the dataset would have it: the business's own name (allowed) kept
    assert "call &lt;PERSON&gt; at &lt;EMAIL&gt; about the Beacon" in card.text
    assert client.get("/data/support/card.html").status_code == 200
    assert client.get("/data/nothing").status_code == 400


# --- the job editor -----------------------------------------------------------------------------------


def test_the_editor_shows_every_key_and_errors_next_to_them(studio):
    from tailor.spec import describe_fields

    s, client = studio
    page = client.get("/jobs/new").text
    assert all(f'name="k:{key}"' in page for key, *_ in describe_fields())
    # a misspelt key in the YAML: named, with the closest valid one; nothing written
    bad = client.post(f"/jobs/save?csrf={s.csrf}", data={"source": "yaml", "file_name": "j",
                                                          "yaml": "name: j\ntrainig: {epochs: 1}\n"})
    assert "trainig" in bad.text and "training" in bad.text and not s.workspace.job_file("j").exists()
    # a wrong value in the form: shown next to its key
    bad = client.post(f"/jobs/save?csrf={s.csrf}", data={"source": "form", "file_name": "j", "k:name": "j",
                                                          "k:training.learning_rate": "fast"})
    problem = re.search(r'<p class="error problem" data-key="([^"]+)">([^<]+)', bad.text)
    assert problem and problem.group(1) == "training.learning_rate" and not s.workspace.job_file("j").exists()
    assert "use letters, digits" in client.post(f"/jobs/save?csrf={s.csrf}", data={
        "source": "form", "file_name": "../j", "k:name": "j"}).text
    assert not (s.workspace.root / "j.yaml").exists()
    saved = client.post(f"/jobs/save?csrf={s.csrf}", data={"source": "form", "file_name": "j", "k:name": "j",
                                                            "k:data.train": "[../prepared/support]",
                                                            "k:training.learning_rate": "2e-4",
                                                            "k:adapter.kind": "lora"}, follow_redirects=False)
    assert saved.status_code == 303 and saved.headers["location"] == "/jobs/j?saved=1"
    job = yaml.safe_load(s.workspace.job_file("j").read_text())
    assert job["training"]["learning_rate"] == 2e-4 and job["output"]["dir"] == str(s.workspace.runs_dir)
    assert 'value="0.0002"' in client.get("/jobs/j").text


# --- the queue, a run, the playground, the feedback loop ------------------------------------------------


def test_a_job_runs_from_the_queue_and_its_run_is_played_with_and_rated(tmp_path, tiny_model_dir, make_job):
    s, client = make_studio(tmp_path / "ws", start=True)
    try:
        path = make_job("studio", training={"max_steps": 2, "save_every": 1, "log_every": 1},
                        eval={"enabled": False})
        job = yaml.safe_load(path.read_text())
        job["output"]["dir"] = str(s.workspace.runs_dir)
        s.workspace.job_file("studio").write_text(yaml.safe_dump(job))
        launched = client.post(f"/jobs/studio/launch?csrf={s.csrf}", follow_redirects=False)
        job_id = int(launched.headers["location"].rsplit("/", 1)[1])
        finished = until(lambda: (q := s.queue.get(job_id))["state"] not in ("queued", "running") and q, 180)
        assert finished["state"] == "done", s.queue.log_tail(job_id)
        run = s.workspace.runs()[0]
        assert run.done and Path(finished["run_dir"]).resolve() == run.path.resolve()
        assert client.get(f"/queue/{job_id}", follow_redirects=False).headers["location"] == \
            f"/runs/{run.name}/{run.id}"
        page = client.get(f"/runs/{run.name}/{run.id}")
        assert page.status_code == 200 and "chart-loss" in page.text
        events = client.get(f"/runs/{run.name}/{run.id}/events").text
        assert events.count("event: metric") >= 2 and '"done": true' in events and "event: end" in events
        home = client.get("/").text
        assert f"{run.name}/{run.id}" in home and "done" in home

        # the playground: the run and its base, through tailor serve's API, rated into the workspace
        assert client.get(f"/playground?run={run.name}/{run.id}").status_code == 200
        model = f"{run.name}-{run.id}"
        answer = client.post("/playground/api/v1/chat/completions", headers=csrf(s), json={
            "model": model, "messages": [{"role": "user", "content": "lamp?"}], "max_tokens": 4})
        assert answer.status_code == 200, answer.text
        base = client.post("/playground/api/v1/chat/completions", headers=csrf(s), json={
            "model": s.playground.models.get(model).base, "messages": [{"role": "user", "content": "lamp?"}],
            "max_tokens": 4})
        assert base.status_code == 200
        assert client.post("/playground/api/v1/feedback", json={"completion_id": answer.json()["id"],
                                                                "rating": "up"}).status_code == 403  # no CSRF
        rated = client.post("/playground/api/v1/feedback", headers=csrf(s), json={
            "completion_id": answer.json()["id"], "correction": "Hello! The lamp glows warm."})
        assert rated.status_code == 200
        assert re.search(rf"{model}</td><td>1</td><td class=\"rated-count\">1</td>", client.get("/feedback").text)

        # "continue training from this feedback": exported, prepared, and a --from-run job queued
        s.queue.stop()  # it would start the job; here only that it is queued right is checked
        started = client.post(f"/feedback/{model}/continue?csrf={s.csrf}", follow_redirects=False)
        task = s.tasks.get(wait_task(client, s, started))
        assert task.state == "done", task.error
        queued = s.queue.list()[0]
        assert queued["state"] == "queued" and queued["name"] == "studio-feedback"
        continued = yaml.safe_load(Path(queued["job_path"]).read_text())
        assert continued["model"]["from_run"] == str(run.path)
        assert continued["data"]["train"][0].startswith("../prepared/feedback-")
        assert (s.workspace.jobs_dir / continued["data"]["train"][0]).resolve().joinpath("card.json").is_file()
    finally:
        s.queue.stop()
        if s.playground.batcher is not None:
            s.playground.close()


def test_compare_shows_the_keys_that_differ_and_export_checks_parity(studio, make_job, tiny_model_dir):
    from tailor.spec import load_job
    from tailor.techniques import task

    s, client = studio
    runs = []
    for rate in ("1e-2", "1e-3"):
        path = make_job("cmp", training={"max_steps": 2, "learning_rate": float(rate)}, eval={"enabled": False},
                        output={"dir": str(s.workspace.runs_dir)})
        runs.append(task.run(load_job(path), show_progress=False))
    refs = [f"cmp/{p.name}" for p in runs]
    page = client.get("/compare", params={"runs": refs})
    assert page.status_code == 200
    keys = re.search(r'id="compare-keys">(.*?)</table>', page.text, re.S).group(1)
    assert "training.learning_rate" in keys and "0.01" in keys and "0.001" in keys
    assert "training.max_steps" not in keys  # the same in both
    assert "final train loss" in page.text
    assert client.get("/compare", params={"runs": refs[:1]}).status_code == 400
    exported = client.post(f"/runs/{refs[0]}/export?csrf={s.csrf}", follow_redirects=False)
    task_ = s.tasks.get(wait_task(client, s, exported))
    assert task_.state == "done", task_.error
    assert any(line.startswith("parity: ") for line in task_.lines)
    assert (Path(task_.result) / "parity.json").is_file()


def test_every_page_of_the_menu_opens_on_an_empty_workspace(studio):
    s, client = studio
    for path in ("/", "/data", "/advise", "/jobs/new", "/queue", "/playground", "/feedback"):
        page = client.get(path)
        assert page.status_code == 200 and "Tailor Studio" in page.text, path
    assert "Prepare a dataset first" in client.get("/advise").text
    assert "No finished run yet" in client.get("/playground").text
    refused = client.post(f"/advise?csrf={s.csrf}", data={"prepared": "nothing", "use_case": "voice"})
    assert "no prepared dataset &#39;nothing&#39;" in refused.text  # escaped, as every value on a page
