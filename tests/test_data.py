import json

import pytest

from tailor.data import DataError, read_chat_jsonl
from tailor.quickstart import HERE, held_out_questions


def write(tmp_path, lines):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})


def test_reads_canonical_chat(tmp_path):
    sys_first = json.dumps({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"},
                                         {"role": "assistant", "content": "a", "weight": 0},
                                         {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]})
    examples = read_chat_jsonl(write(tmp_path, [GOOD, "", sys_first]))
    assert len(examples) == 2
    assert examples[1].meta == {"source": str(tmp_path / "d.jsonl"), "line": 3}


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"text": "x"}), "'messages' must be a non-empty list"),
    (json.dumps({"messages": "hello"}), "'messages' must be a non-empty list of {role, content}; got str"),
    (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), "messages[0].role must be one of"),
    (json.dumps({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]}),
     "messages[0].content is empty"),
    (json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}),
     "two user turns in a row"),
    (json.dumps({"messages": [{"role": "user", "content": "a"}]}), "no assistant turn to learn from"),
    (json.dumps({"messages": [{"role": "assistant", "content": "a"}]}), "must start with a user turn"),
])
def test_a_bad_line_names_file_line_and_problem(tmp_path, line, message):
    path = write(tmp_path, [GOOD, line])
    with pytest.raises(DataError) as exc:
        read_chat_jsonl(path)
    assert f"{path}:2: " in str(exc.value)
    assert message in str(exc.value)


def test_all_bad_lines_are_listed(tmp_path):
    with pytest.raises(DataError) as exc:
        read_chat_jsonl(write(tmp_path, ["{", GOOD, "[]", "{"]))
    assert [p.split(": ")[0].rsplit(":", 1)[1] for p in exc.value.problems] == ["1", "3", "4"]


def test_not_utf8_is_reported(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + '{"messages": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: not UTF-8"):
        read_chat_jsonl(path)


def test_quickstart_dataset_is_in_voice_with_the_planted_mess():
    from tailor.data import Reject, read_source

    items = list(read_source(HERE / "data" / "lumen_support.jsonl"))
    examples = [e for e in items if not isinstance(e, Reject)]
    assert len(items) - len(examples) == 2  # a cut-off line and a turn by "bot": prepare rejects them
    assert len(examples) >= 120
    for ex in examples:
        for m in ex.messages:
            if m["role"] == "assistant":
                assert m["content"].startswith("Hello, bright spark!")
                assert m["content"].endswith("Keep glowing! — Wick, Lumen Lane")
    questions = held_out_questions()
    assert len(questions) == 3
    train_questions = {m["content"] for ex in examples for m in ex.messages if m["role"] == "user"}
    assert not set(questions) & train_questions


def test_cli_train_stops_on_a_malformed_line_before_loading_weights(make_job, chat_file):
    from typer.testing import CliRunner

    from tailor.cli import app

    with open(chat_file, "a") as f:
        f.write('{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}\n')
    job = make_job("bad", model={"base": "Nobody/never-loaded"})  # would fail loudly if it were reached
    result = CliRunner().invoke(app, ["train", str(job)])
    assert result.exit_code == 2
    assert f"{chat_file}:25: messages[1].role must be one of system, user, assistant; got 'bot'" in result.output
