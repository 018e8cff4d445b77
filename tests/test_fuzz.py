"""Property-based tests: whatever a user writes in a job file, Tailor answers with a SpecError that
names the key and the fix, never a traceback; whatever a client sends, the server answers with an
OpenAI-shaped error, never a 500. The number of examples is bounded so the suite stays fast."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tailor.spec import SpecError, load_data_config, load_job

EXAMPLES = Path(__file__).parent.parent / "examples"
JOBS = sorted(EXAMPLES.glob("*.yaml"))
# FUZZ_EXAMPLES=3000 for a longer hunt than the suite's.
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 150)), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

# Values a careless or hostile job file puts where a setting belongs.
ODD = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["auto", "", "~", "a\0b", "1e400", "-0", "lora", "../../etc/passwd", "0x10", "NaN"]),
    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def _paths(node, prefix=()):
    """Every key path of a parsed YAML tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield prefix + (key,)
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield prefix + (i,)
            yield from _paths(value, prefix + (i,))


@st.composite
def mutated_jobs(draw):
    """A real example job with a few of its values replaced, keys dropped or keys added."""
    raw = yaml.safe_load(draw(st.sampled_from(JOBS)).read_text(encoding="utf-8"))
    raw = copy.deepcopy(raw)
    for _ in range(draw(st.integers(1, 4))):
        paths = list(_paths(raw))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = raw
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "drop", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(ODD)
        elif action == "drop" and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(ODD)
    return raw


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _loads_or_explains(load, path: Path) -> None:
    try:
        load(path)
    except SpecError as exc:
        assert str(path) in str(exc), f"the error does not name the file: {exc}"


@FUZZ
@given(raw=mutated_jobs())
def test_any_job_file_loads_or_gets_a_spec_error(tmp_path, raw):
    path = _write(tmp_path, yaml.safe_dump(raw, allow_unicode=True))
    _loads_or_explains(load_job, path)
    _loads_or_explains(load_data_config, path)


@FUZZ
@given(text=st.text(max_size=200))
def test_any_text_as_a_job_file_gets_a_spec_error_or_loads(tmp_path, text):
    path = _write(tmp_path, text)
    _loads_or_explains(load_job, path)
    _loads_or_explains(load_data_config, path)


@FUZZ
@given(overrides=st.lists(st.text(max_size=30), max_size=3))
def test_any_override_gets_a_spec_error_or_applies(tmp_path, overrides):
    path = JOBS[0]
    try:
        load_job(path, overrides)
    except SpecError as exc:
        assert str(path) in str(exc)


# --- the server's requests ---------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
ODD_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", ""]),
     "content": st.one_of(st.text(max_size=40), JSON,
                          st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                                          "text": st.one_of(st.text(max_size=20), JSON)}),
                                   max_size=2))},
    optional={"name": st.one_of(st.text(max_size=80), JSON), "extra": JSON},
)
GOOD_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                      "content": st.text(max_size=40)})
MESSAGES = st.one_of(st.lists(GOOD_MESSAGE, min_size=1, max_size=3), st.lists(ODD_MESSAGE, max_size=3), JSON)
SAMPLING = {  # every field a request may carry, with good, edge and wrong values
    "model": st.one_of(st.just("base"), st.text(max_size=20), JSON),
    "max_tokens": st.one_of(st.integers(-2, 6), st.integers(-2**70, 2**70), JSON),
    "max_completion_tokens": st.one_of(st.integers(0, 6), JSON),
    "temperature": st.one_of(st.floats(-1, 3), st.just(0), JSON),
    "top_p": st.one_of(st.floats(-1, 2), JSON),
    "stop": st.one_of(st.text(max_size=300), st.lists(st.text(max_size=5), max_size=6), JSON),
    "seed": st.one_of(st.integers(-2**64, 2**64), JSON),
    "stream": st.one_of(st.booleans(), JSON),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), JSON),
    "n": st.one_of(st.integers(0, 3), JSON),
    "user": st.one_of(st.text(max_size=300), JSON),
    "logit_bias": JSON,
}
GOOD = st.fixed_dictionaries({"model": st.just("base"), "max_tokens": st.integers(1, 4)})
# a good request with up to three of its fields set: often all valid, so requests are decoded too
CHANGES = st.lists(st.sampled_from(sorted(SAMPLING)), max_size=3, unique=True).flatmap(
    lambda keys: st.fixed_dictionaries({k: SAMPLING[k] for k in keys}))
CHAT = st.builds(lambda good, messages, changes: {**good, "messages": messages, **changes},
                 GOOD, MESSAGES, CHANGES)
COMPLETION = st.builds(lambda good, prompt, changes: {**good, "prompt": prompt, **changes}, GOOD,
                       st.one_of(st.text(max_size=40), st.lists(st.text(max_size=10), max_size=2), JSON), CHANGES)
FEEDBACK = st.fixed_dictionaries({}, optional={
    "completion_id": st.one_of(st.text(max_size=120), JSON), "rating": st.one_of(
        st.sampled_from(["up", "down", 0, 1, 5, 6, "5"]), JSON),
    "correction": st.one_of(st.text(max_size=20), JSON), "comment": JSON, "other": JSON})
ADAPTER = st.fixed_dictionaries({}, optional={"run": st.one_of(st.text(max_size=30), st.just("../../etc"), JSON),
                                              "name": JSON})


@pytest.fixture(scope="module")
def api(tiny_model_dir, tmp_path_factory):
    from fastapi.testclient import TestClient

    from tailor.serve.app import Limits
    from tailor.serve.server import ServeSettings, build

    db = tmp_path_factory.mktemp("fuzz") / "feedback.db"
    app, _, batcher = build(ServeSettings(base=str(tiny_model_dir), dtype="float32", db=f"sqlite:///{db}",
                                          limits=Limits(max_tokens=4, default_max_tokens=4)), say=lambda m: None)
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        yield client
    batcher.close()


def _openai_shaped(reply) -> None:
    assert reply.status_code < 500, (reply.status_code, reply.text[:500])
    if reply.status_code >= 400:
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    elif reply.headers["content-type"].startswith("text/event-stream"):
        events = [line for line in reply.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]", reply.text[-300:]
    else:
        reply.json()


@FUZZ
@given(body=st.one_of(CHAT, JSON))
def test_any_chat_request_is_answered_or_refused_in_openai_shape(api, body):
    _openai_shaped(api.post("/v1/chat/completions", json=body))


@FUZZ
@given(body=st.one_of(COMPLETION, JSON))
def test_any_completion_request_is_answered_or_refused_in_openai_shape(api, body):
    _openai_shaped(api.post("/v1/completions", json=body))


@FUZZ
@given(path=st.sampled_from(["/v1/feedback", "/v1/adapters"]), body=st.one_of(FEEDBACK, ADAPTER, JSON),
       raw=st.one_of(st.none(), st.binary(max_size=40)))
def test_any_feedback_or_adapter_body_is_refused_in_openai_shape(api, path, body, raw):
    reply = api.post(path, content=raw, headers={"content-type": "application/json"}) if raw is not None \
        else api.post(path, json=body)
    _openai_shaped(reply)
    assert reply.status_code != 200 or path == "/v1/feedback"
