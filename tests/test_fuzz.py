"""Property-based tests: whatever a user writes in a job file, Tailor answers with a SpecError that
names the key and the fix, never a traceback; whatever a client sends, the server answers with an
OpenAI-shaped error, never a 500. The number of examples is bounded so the suite stays fast."""

from __future__ import annotations

import copy
import os
from pathlib import Path

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
