"""`tailor serve` under bad input and bad luck, on the tiny base model: a request the decoder
cannot take fails alone, the queue is bounded, requests have a deadline and stop when their client
leaves, a keyless server answers only requests addressed to this machine, and a dead decoding
thread is reported rather than waited on forever."""

import hmac
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
from typer.testing import CliRunner

from tailor.serve.app import Limits, _key_ok, _model_card
from tailor.serve.models import ModelError, Served, check_name
from tailor.serve.server import InThread, ServeSettings, build


class Live(InThread):
    """The tiny base model served on 127.0.0.1 (as `base`), no training needed."""

    def __init__(self, tmp_path, model_dir, limits: Limits | None = None, **settings):
        s = ServeSettings(base=str(model_dir), dtype="float32", db=f"sqlite:///{tmp_path / 'feedback.db'}",
                          limits=limits or Limits(max_tokens=64), **settings)
        self.app, self.models, batcher = build(s, say=lambda m: None)
        super().__init__(self.app, batcher)
        self.engine = self.models.get("base").engine

    def post(self, body: dict, path: str = "/v1/completions", timeout: float = 30, **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, json={"model": "base", **body}, timeout=timeout, **kwargs)


@pytest.fixture
def live(tmp_path, tiny_model_dir):
    with Live(tmp_path, tiny_model_dir) as server:
        yield server


@contextmanager
def held(batcher):
    """The decoding thread busy with a call until the block ends: requests sent meanwhile wait."""
    started, gate = threading.Event(), threading.Event()
    thread = threading.Thread(target=batcher.call, args=(lambda: (started.set(), gate.wait(30)),))
    thread.start()
    assert started.wait(10)
    try:
        yield
    finally:
        gate.set()
        thread.join(10)


def until(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def send_together(live: Live, bodies: list[dict], path: str = "/v1/completions") -> list[httpx.Response]:
    """The requests sent at once while the decoder is held, so that the ones that pass
    validation are decoded in one batch."""
    with ThreadPoolExecutor(len(bodies)) as pool:
        with held(live.batcher):
            futures = [pool.submit(live.post, body, path) for body in bodies]
            until(lambda: len(live.batcher._waiting) + sum(f.done() for f in futures) == len(bodies))
        return [f.result() for f in futures]


def test_a_request_the_decoder_cannot_take_is_refused_and_the_others_are_answered(live):
    threads = []
    encode = live.engine.text_prompt
    live.engine.text_prompt = lambda text: (threads.append(threading.current_thread().name), encode(text))[1]
    good = [{"prompt": f"lamp {i}", "max_tokens": 6, "temperature": 0.8, "seed": i} for i in range(7)]
    replies = send_together(live, good[:3] + [{**good[0], "seed": 2**70}] + good[3:])
    assert [r.status_code for r in replies] == [200] * 3 + [400] + [200] * 4
    assert replies[3].json()["error"]["param"] == "seed"
    assert "tailor-uvicorn" not in threads  # tokenized off the event loop

    bad = {"prompt": "", "seed": -1, "user": "u" * 300, "stop": ["a"] * 5}
    for field, value in bad.items():
        reply = live.post({"prompt": "hi", field: value})
        assert reply.status_code == 400 and field in reply.json()["error"]["message"], (field, reply.text)
    for prompt in ([""], []):
        assert live.post({"prompt": prompt}).status_code == 400
    assert live.post({"prompt": "hi", "stop": "x" * 257}).json()["error"]["param"] == "stop"
    chat = "/v1/chat/completions"
    for messages in ([], [{"role": "user", "content": []}], [{"role": "user", "content": "hi", "name": "n" * 65}]):
        reply = live.post({"messages": messages}, chat)
        assert reply.status_code == 400 and reply.json()["error"]["param"].startswith("messages"), reply.text
    nan = httpx.post(live.url + chat, content=b'{"model": "base", "messages": [{"role": "user", "content": "hi"}], '
                                              b'"temperature": NaN}', headers={"content-type": "application/json"})
    assert nan.status_code == 400 and nan.json()["error"]["param"] == "temperature"


def test_a_request_that_breaks_decoding_fails_alone_and_the_batch_goes_on(live):
    pick = live.engine._pick

    def breaking(logits, r):  # a failure no validation foresaw, at the 4th token of one request
        if r.sampling.seed == 13 and len(r.token_ids) == 3:
            raise RuntimeError("this request cannot be decoded")
        return pick(logits, r)

    live.engine.eos_ids = set()  # every answer runs to max_tokens: the others are mid-answer at the failure
    bodies = [{"prompt": f"question {i}?", "max_tokens": 8, "temperature": 0} for i in range(4)]
    alone = [live.post(body).json()["choices"][0]["text"] for body in bodies]
    live.engine._pick = breaking
    replies = send_together(live, bodies[:2] + [{**bodies[0], "seed": 13}] + bodies[2:])
    assert [r.status_code for r in replies] == [200, 200, 500, 200, 200]
    assert [r.json()["choices"][0]["text"] for r in replies[:2] + replies[3:]] == alone  # as if decoded alone
    assert all(r.json()["usage"]["completion_tokens"] == 8 for r in replies[:2] + replies[3:])
    assert replies[2].json()["error"]["type"] == "server_error"


def test_a_client_that_goes_away_stops_its_decoding(tmp_path, tiny_model_dir):
    with Live(tmp_path, tiny_model_dir, Limits(max_tokens=500)) as live:
        rows, forward = [], live.engine._forward
        live.engine.eos_ids = set()  # only max_tokens would end it

        def slow(requests, **inputs):  # 500 tokens take 10 s
            rows.append(len(requests))
            time.sleep(0.02)
            return forward(requests, **inputs)

        live.engine._forward = slow
        with pytest.raises(httpx.ReadTimeout):
            live.post({"prompt": "a long story", "max_tokens": 500, "temperature": 0}, timeout=0.5)
        until(lambda: len(rows) > 0)
        time.sleep(1.0)  # the server polls its client every 0.25 s
        produced = len(rows)
        time.sleep(0.5)
        assert len(rows) == produced < 100  # stopped, long before its 500 tokens
        assert live.batcher.waiting == 0


def test_a_full_queue_answers_503_with_retry_after(tmp_path, tiny_model_dir):
    with Live(tmp_path, tiny_model_dir, Limits(max_tokens=64, max_waiting=2)) as live:
        with ThreadPoolExecutor(2) as pool:
            with held(live.batcher):
                waiting = [pool.submit(live.post, {"prompt": f"hi {i}", "max_tokens": 4}) for i in range(2)]
                until(lambda: live.batcher.waiting == 2)
                refused = live.post({"prompt": "one too many", "max_tokens": 4})
            assert [f.result().status_code for f in waiting] == [200, 200]
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) > 0
    error = refused.json()["error"]
    assert error["code"] == "server_busy" and "--max-waiting" in error["message"]


def test_a_request_past_its_deadline_is_answered_504_and_never_decoded(tmp_path, tiny_model_dir):
    with Live(tmp_path, tiny_model_dir, Limits(max_tokens=64, request_timeout=1.0)) as live:
        assert live.post({"prompt": "warm up", "max_tokens": 4}).status_code == 200  # the first pass is slow
        prefilled, prefill = [], live.engine._prefill
        live.engine._prefill = lambda requests: (prefilled.extend(r.prompt_ids for r in requests), prefill(requests))[1]
        with held(live.batcher):
            late = live.post({"prompt": "too late", "max_tokens": 4})
            with httpx.stream("POST", live.url + "/v1/chat/completions", timeout=30,
                              json={"model": "base", "messages": [{"role": "user", "content": "late too"}],
                                    "stream": True}) as stream:
                events = [line for line in stream.iter_lines() if line.startswith("data: ")]
        on_time = live.post({"prompt": "on time", "max_tokens": 4})
        assert on_time.status_code == 200
        assert prefilled == [live.engine.text_prompt("on time")]  # the cancelled ones were dropped unread
    assert late.status_code == 504 and late.json()["error"]["code"] == "timeout"
    assert json.loads(events[-1].removeprefix("data: "))["error"]["code"] == "timeout"


def test_a_server_without_keys_answers_only_requests_addressed_to_this_machine(live):
    port = live.url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", ""):
        for path in ("/v1/models", "/health"):
            refused = httpx.get(live.url + path, headers={"Host": host})
            assert refused.status_code == 400, (host, path)
            assert refused.json()["error"]["code"] == "invalid_host"
    for host in (f"127.0.0.1:{port}", "localhost", f"LOCALHOST:{port}", f"[::1]:{port}"):
        assert httpx.get(live.url + "/v1/models", headers={"Host": host}).status_code == 200, host


def test_keys_are_compared_in_constant_time_with_every_key(tmp_path, tiny_model_dir, monkeypatch):
    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: (compared.append(b), real(a, b))[1])
    assert _key_ok("Bearer first", ("first", "second")) and compared == [b"first", b"second"]
    assert _key_ok("Bearer  second ", ("first", "second"))
    assert not any(_key_ok(header, ("first", "second")) for header in ("Bearer firs", "first", "Bearer ", ""))
    with Live(tmp_path, tiny_model_dir, api_keys=("k1", "k2")) as live:
        # with a key, the key protects: any Host
        headers = {"Host": "api.example", "Authorization": "Bearer k2"}
        assert httpx.get(live.url + "/v1/models", headers=headers).status_code == 200
        assert httpx.get(live.url + "/v1/models", headers={**headers, "Authorization": "Bearer k"}).status_code == 401


def test_api_keys_and_limits_from_the_command_line(monkeypatch):
    import tailor.serve.server as server
    from tailor.cli import app

    started = []
    monkeypatch.setattr(server, "serve", lambda settings, say: started.append(settings))
    args = ["serve", "--api-key", "a, b", "--api-key", "c,", "--max-waiting", "3", "--request-timeout", "7.5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert started[0].api_keys == ("a", "b", "c")
    assert (started[0].limits.max_waiting, started[0].limits.request_timeout) == (3, 7.5)
    result = CliRunner().invoke(app, ["serve"], env={"TAILOR_API_KEY": "x , y"})
    assert result.exit_code == 0, result.output
    assert started[1].api_keys == ("x", "y")


def test_model_cards_show_names_not_the_servers_folders():
    run = Served("lamps", None, "lamps", "/srv/models/tiny-base", "/home/ana/runs/lamps/20261129-170401", 0)
    card = _model_card(run)
    assert "/srv" not in json.dumps(card) and "/home" not in json.dumps(card)
    assert (card["root"], card["parent"], card["run"]) == ("tiny-base", "tiny-base", "lamps/20261129-170401")
    hub = _model_card(Served("HuggingFaceTB/SmolLM2-135M", None, None, "HuggingFaceTB/SmolLM2-135M", None, 0))
    assert hub["root"] == "HuggingFaceTB/SmolLM2-135M" and "run" not in hub


def test_a_dead_decoding_thread_is_reported_and_requests_are_refused(live):
    def broken(engine, k):
        raise RuntimeError("a bug in the batcher")

    live.batcher._take = broken
    first = live.post({"prompt": "hi", "max_tokens": 2}, timeout=10)
    assert first.status_code == 503 and "decoding thread has stopped" in first.json()["error"]["message"]
    until(lambda: not live.batcher.alive)
    health = httpx.get(live.url + "/health")
    assert health.status_code == 503 and health.json()["status"] == "error"
    later = live.post({"prompt": "hi", "max_tokens": 2}, timeout=10)
    assert later.status_code == 503 and later.json()["error"]["code"] == "unavailable"


def test_names_from_users_are_checked():
    for name in ("support-v2", "a", "x" * 64, "v1.2_b"):
        assert check_name(name) == name
    for name in ("", "x" * 65, "../etc", "a/b", "a b", "..", "naïve", "a\n"):
        with pytest.raises(ModelError, match="letters, digits"):
            check_name(name)


def test_an_invalid_field_is_named_as_the_client_wrote_it(live):
    """pydantic locates an error inside a union by the member's type ("content.str"); the client
    sent `messages.0.content`, and that is the name it gets back."""
    for body, param in (({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
                        ({"prompt": 5}, "prompt"), ({"prompt": "hi", "stop": [1]}, "stop")):
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        answer = live.post(body, path)
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["param"] == param and error["message"].startswith(param + ": "), error
