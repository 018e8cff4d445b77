"""Hardening of `tailor serve`: POST /v1/adapters takes the admin key, and only finished LoRA runs
under --runs-dir on a base the server already serves, with safetensors weights; the feedback store
writes completions in the background, so a database failure costs the record, never the answer,
and never puts a prompt in the log."""

import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import httpx
import openai
import pytest

from tailor.feedback.store import Completion, FeedbackStore
from tailor.models.decode import Engine, Request, Sampling
from tailor.models.generate import load_run
from tailor.runs import Manifest, ModelInfo, Run
from tailor.serve.server import InThread, ServeError, ServeSettings, build, check_settings

ADMIN, KEY = "sk-admin-test", "sk-client-test"
RUN_ID = "20260101-000000"
SECRET = "my passport number is X1234567"


def write_run(root: Path, name: str, base: Path, source: str | None = None, done: bool = True,
              pickle_too: bool = False) -> Path:
    """A LoRA run folder as `tailor train` leaves one (job.yaml, manifest.json, adapter/ with the
    tokenizer, DONE), with random LoRA weights: no training needed."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = Run(root / name / RUN_ID)
    run.path.mkdir(parents=True)
    run.job_file.write_text(f"name: {name}\n", encoding="utf-8")
    run.write_manifest(Manifest(name=name, technique="task", run_dir=str(run.path), model=ModelInfo(
        source=source or str(base), kind="local", path=str(base), dtype="float32")))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                                      init_lora_weights=False))  # random, and strong enough to change answers
    model.save_pretrained(run.adapter_dir)
    AutoTokenizer.from_pretrained(base).save_pretrained(run.adapter_dir)
    if pickle_too:  # PEFT would read the safetensors file, but a pickle has no business in a run a client names
        (run.adapter_dir / "adapter_model.bin").write_bytes(b"not loaded")
    if done:
        run.mark_done()
    return run.path


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory, tiny_model_dir) -> Path:
    top = tmp_path_factory.mktemp("admin")
    root = top / "runs"
    write_run(root, "good", tiny_model_dir)
    write_run(root, "unfinished", tiny_model_dir, done=False)
    write_run(root, "elsewhere", tiny_model_dir, source="org/not-served")
    write_run(root, "pickled", tiny_model_dir, pickle_too=True)
    write_run(top / "outside", "stray", tiny_model_dir)
    (root / "linked").symlink_to(top / "outside" / "stray")  # inside by name, outside once resolved
    borrowed = Run(write_run(root, "borrowed", tiny_model_dir))  # its adapter/ is a link to one outside
    borrowed.adapter_dir.rename(top / "outside" / "adapter")
    borrowed.adapter_dir.symlink_to(top / "outside" / "adapter")
    return root


class LiveServer(InThread):
    def __init__(self, settings: ServeSettings):
        self.app, self.models, batcher = build(settings, say=lambda m: None)
        super().__init__(self.app, batcher)

    def post(self, path: str, key: str | None, **body) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(self.url + path, json=body, headers=headers, timeout=60)


def served_settings(tiny_model_dir, tmp_path, **extra) -> ServeSettings:
    return ServeSettings(base=str(tiny_model_dir), dtype="float32", db=f"sqlite:///{tmp_path / 'feedback.db'}",
                         **extra)


# --- POST /v1/adapters ---------------------------------------------------------------------------


def test_adapters_need_the_admin_key(tiny_model_dir, runs_root, tmp_path):
    with pytest.raises(ServeError, match="--admin-key"):
        check_settings(ServeSettings(api_keys=(KEY,), admin_key=KEY))
    run = f"good/{RUN_ID}"
    with LiveServer(served_settings(tiny_model_dir, tmp_path, runs_dir=str(runs_root))) as live:
        closed = live.post("/v1/adapters", None, run=run)
        assert closed.status_code == 403
        assert "adapters can be added only with --admin-key" in closed.json()["error"]["message"]
    with LiveServer(served_settings(tiny_model_dir, tmp_path, api_keys=(KEY,), admin_key=ADMIN,
                                    runs_dir=str(runs_root))) as live:
        for key in (KEY, None, "sk-wrong", ADMIN + "x"):
            refused = live.post("/v1/adapters", key, run=run)
            assert refused.status_code == 403, (key, refused.text)
        assert live.post("/v1/adapters", ADMIN, run=run).status_code == 200
        # the admin key is not a client key
        assert httpx.get(live.url + "/v1/models", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 401


def test_admin_key_and_runs_dir_from_the_command_line(monkeypatch):
    from typer.testing import CliRunner

    import tailor.serve.server as server
    from tailor.cli import app

    started = []
    monkeypatch.setattr(server, "serve", lambda settings, say: started.append(settings))
    result = CliRunner().invoke(app, ["serve", "--admin-key", ADMIN, "--runs-dir", "elsewhere"])
    assert result.exit_code == 0, result.output
    assert (started[0].admin_key, started[0].runs_dir) == (ADMIN, "elsewhere")
    result = CliRunner().invoke(app, ["serve"], env={"TAILOR_ADMIN_KEY": ADMIN})
    assert result.exit_code == 0, result.output
    assert (started[1].admin_key, started[1].runs_dir) == (ADMIN, "runs")
    CliRunner().invoke(app, ["serve"], env={"TAILOR_ADMIN_KEY": ""})
    assert started[2].admin_key in (None, "")  # closed: build() treats an empty key as none


def test_adapters_come_only_from_finished_lora_runs_under_the_runs_dir(tiny_model_dir, runs_root, tmp_path,
                                                                       monkeypatch):
    outside = runs_root.parent / "outside" / "stray" / RUN_ID
    with LiveServer(served_settings(tiny_model_dir, tmp_path, admin_key=ADMIN, runs_dir=str(runs_root))) as live:
        engines = dict(live.models._engines)
        names = live.models.names()

        def no_new_base(source):
            raise AssertionError(f"POST /v1/adapters tried to resolve {source}")

        monkeypatch.setattr("tailor.serve.models.resolve_model", no_new_base)
        cases = {
            str(outside): "absolute path",
            f"../outside/stray/{RUN_ID}": "not inside",
            f"linked/{RUN_ID}": "not inside",
            f"borrowed/{RUN_ID}": "leads out",
            f"unfinished/{RUN_ID}": "not a finished run",
            f"elsewhere/{RUN_ID}": "does not serve",
            f"pickled/{RUN_ID}": "safetensors",
            "nothing/here": "not a finished run",
        }
        bodies = []
        for run, expected in cases.items():
            refused = live.post("/v1/adapters", ADMIN, run=run)
            bodies.append(refused.text)
            assert refused.status_code == 400, (run, refused.text)
            assert expected in refused.json()["error"]["message"], (run, refused.text)
        bad_name = live.post("/v1/adapters", ADMIN, run=f"good/{RUN_ID}", name="a/b c")
        assert bad_name.status_code == 400
        bodies.append(bad_name.text)
        assert live.models._engines == engines and live.models.names() == names  # nothing loaded
        for body in bodies:  # the server's folders are not told to clients
            assert str(runs_root.parent) not in body and "/tmp" not in body, body


def test_an_admin_adds_a_finished_run_and_it_answers(tiny_model_dir, runs_root, tmp_path):
    question = [{"role": "user", "content": "question 1?"}]
    engine = Engine(*load_run(runs_root / "good" / RUN_ID, "float32"))
    alone = Request(engine.chat_prompt(question), Sampling(max_tokens=12, temperature=0.0))
    engine.run([alone])
    with LiveServer(served_settings(tiny_model_dir, tmp_path, admin_key=ADMIN, runs_dir=str(runs_root))) as live:
        added = live.post("/v1/adapters", ADMIN, run=f"good/{RUN_ID}", name="good-1")
        assert added.status_code == 200, added.text
        assert added.json()["id"] == "good-1" and added.json()["run"] == f"good/{RUN_ID}"
        assert str(runs_root) not in added.text
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="good-1", messages=question, temperature=0, max_tokens=12)
        assert reply.choices[0].message.content == alone.text
        base = client.chat.completions.create(model="base", messages=question, temperature=0, max_tokens=12)
        assert base.choices[0].message.content != alone.text  # the adapter is in use
        again = live.post("/v1/adapters", ADMIN, run=f"good/{RUN_ID}", name="good-1")
        assert again.status_code == 400 and "already served" in again.json()["error"]["message"]
        assert len(live.models._engines) == 1  # the adapter hangs on the served base


# --- the feedback store --------------------------------------------------------------------------


def test_a_failing_store_costs_the_record_not_the_answer_and_logs_no_prompt(tiny_model_dir, tmp_path, caplog):
    caplog.set_level("INFO")
    settings = served_settings(tiny_model_dir, tmp_path)
    with LiveServer(settings) as live:
        with sqlite3.connect(tmp_path / "feedback.db") as db:  # from now on every completion write fails
            db.execute("CREATE TRIGGER broken BEFORE INSERT ON completions BEGIN SELECT RAISE(ABORT, 'disk full'); END")
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": SECRET}]
        reply = client.chat.completions.create(model="base", messages=messages, max_tokens=4)
        assert reply.choices[0].message.role == "assistant"
        streamed = list(client.chat.completions.create(model="base", messages=messages, max_tokens=4, stream=True))
        assert streamed[-1].choices[0].finish_reason in ("stop", "length")
        feedback = live.post("/v1/feedback", None, completion_id=reply.id, rating="up")
        assert feedback.status_code == 404  # waited for the write, which failed: nothing to rate
        metrics = httpx.get(live.url + "/metrics").text
        assert 'tailor_feedback_store_errors_total{operation="completion"} 2.0' in metrics
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert "not stored" in logged and "disk full" in logged  # the operator learns why …
    assert "passport" not in logged  # … and nothing of what was asked

    # and a database error raised to a caller carries no parameters either
    store = FeedbackStore(settings.db)
    with pytest.raises(Exception) as failed:
        store.add_completion(Completion("cmpl-x", "base", "text", SECRET, "answer", "stop", 1, 1))
    assert "disk full" in str(failed.value) and "passport" not in str(failed.value)


def test_every_completion_and_feedback_is_stored_even_when_the_store_is_slow(tiny_model_dir, tmp_path,
                                                                             monkeypatch):
    slow = FeedbackStore.add_completion

    def add_slowly(store, completion):
        time.sleep(0.3)  # the answer goes out before the write; feedback must wait for it
        slow(store, completion)

    monkeypatch.setattr(FeedbackStore, "add_completion", add_slowly)
    with LiveServer(served_settings(tiny_model_dir, tmp_path)) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=60)
        ids = []
        for i in range(4):
            messages = [{"role": "user", "content": f"question {i}?"}]
            if i == 3:
                stream = client.chat.completions.create(model="base", messages=messages, max_tokens=3, stream=True)
                ids.append(list(stream)[0].id)
            else:
                ids.append(client.chat.completions.create(model="base", messages=messages, max_tokens=3).id)
            if i < 2:
                rated = live.post("/v1/feedback", None, completion_id=ids[-1], rating=i + 4)
                assert rated.status_code == 200, rated.text
    store = FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}")
    assert store.counts()[str(tiny_model_dir)] == {"completions": 4, "feedback": 2, "mean_score": 0.875,
                                                   "corrections": 0}
    assert all(store.has_completion(i) for i in ids)


def test_a_write_waiting_for_the_database_does_not_hold_up_readers(tmp_path):
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    store = FeedbackStore(url)
    store.add_completion(Completion("cmpl-1", "m", "text", "p", "a", "stop", 1, 1))
    other = sqlite3.connect(tmp_path / "feedback.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process writing: SQLite makes our writer wait
    with ThreadPoolExecutor(2) as pool:
        writing = pool.submit(store.add_feedback, "cmpl-1", "up", None, None)
        time.sleep(0.3)
        reading = pool.submit(store.has_completion, "cmpl-1")
        try:
            assert reading.result(timeout=3) is True  # WAL: a reader never waits for a writer
        except FutureTimeout:
            pytest.fail("a read waited behind a write that waits for SQLite's lock")
        finally:
            other.execute("COMMIT")
        assert writing.result(timeout=30) >= 1
    other.close()
