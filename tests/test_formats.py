"""Readers for every supported dataset format: exact Examples for each, Rejects that point at the record
and say what to fix, and property tests that throw random input at every reader."""

import csv
import gzip
import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tailor.data import FORMATS, DataError, Example, Reject, check_example, detect_record_format, read_source
from tailor.data.formats import FIELDS


def U(text):
    return {"role": "user", "content": text}


def A(text, **extra):
    return {"role": "assistant", "content": text, **extra}


def S(text):
    return {"role": "system", "content": text}


def jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def read(path, **kwargs):
    items = list(read_source(path, **kwargs))
    return [i for i in items if isinstance(i, Example)], [i for i in items if isinstance(i, Reject)]


def only(path, **kwargs):
    """The one Example a one-record file holds."""
    examples, rejects = read(path, **kwargs)
    assert not rejects, [str(r) for r in rejects]
    assert len(examples) == 1
    return examples[0]


def only_reject(path, **kwargs) -> Reject:
    examples, rejects = read(path, **kwargs)
    assert not examples and len(rejects) == 1
    return rejects[0]


def meta(path, line, **extra):
    return {"source": str(path), "line": line, **extra}


# --- each format, read exactly ---------------------------------------------------------------------


def test_chat_keeps_system_weights_names_and_the_record_task(tmp_path):
    msgs = [S("be brief"), {"role": "user", "content": "q", "name": "ann"}, A("a", weight=0), U("q2"), A("a2")]
    path = jsonl(tmp_path / "d.jsonl", [{"messages": msgs, "task": "support"}])
    assert only(path) == Example(messages=msgs, task="support", meta=meta(path, 1))


def test_chat_content_parts_are_joined_and_other_parts_rejected(tmp_path):
    parts = [{"type": "text", "text": "look"}, {"type": "text", "text": "here"}]
    image = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "x.png"}}]
    path = jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": parts}, A("ok")]},
                                        {"messages": [{"role": "user", "content": image}, A("a cat")]}])
    examples, rejects = read(path)
    assert examples[0].messages == [U("look\nhere"), A("ok")]
    assert rejects[0].line == 2
    assert rejects[0].reason.startswith("messages[0].content[1] is a 'image_url' part; only text parts")


def test_chat_developer_role_is_the_system_message(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "developer", "content": "rules"}, U("q"), A("a")]}])
    assert only(path).messages == [S("rules"), U("q"), A("a")]


def test_chat_problems_use_check_messages_wording(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"messages": [U("a"), U("b")]}])
    assert only_reject(path).reason == "two user turns in a row; turns must alternate user/assistant"


@pytest.mark.parametrize("record, messages", [
    ({"instruction": "Add", "input": "1 2", "output": "3"}, [U("Add\n\n1 2"), A("3")]),
    ({"instruction": "Say hi", "input": "", "output": "hi"}, [U("Say hi"), A("hi")]),
    ({"instruction": "Say hi", "output": "hi", "system": "kind"}, [S("kind"), U("Say hi"), A("hi")]),
])
def test_alpaca(tmp_path, record, messages):
    path = jsonl(tmp_path / "d.jsonl", [record])
    assert only(path) == Example(messages=messages, meta=meta(path, 1))


@pytest.mark.parametrize("record, reason", [
    ({"instruction": "x", "output": 5}, "'output' must be a string; got int"),
    ({"instruction": "x", "output": "  "}, "'output' is empty; fill it in or remove the record"),
    ({"instruction": "x"}, "'output' is missing or empty; fill it in or remove the record"),
    ({"instruction": "x", "input": ["a"], "output": "y"}, "'input' must be a string; got list"),
])
def test_alpaca_rejects_name_the_field(tmp_path, record, reason):
    assert only_reject(jsonl(tmp_path / "d.jsonl", [record])).reason == reason


def test_sharegpt_both_key_styles_and_speaker_names(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [
        {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                           {"from": "gpt", "value": "a"}, {"from": "User", "value": "q2"},
                           {"from": "chatgpt", "value": "a2"}]},
        {"conversations": [{"role": "user", "content": "q"}, {"role": "model", "content": "a"}], "system": "s"},
    ])
    examples, rejects = read(path)
    assert not rejects
    assert examples[0].messages == [S("s"), U("q"), A("a"), U("q2"), A("a2")]
    assert examples[1].messages == [S("s"), U("q"), A("a")]


def test_sharegpt_unknown_speaker_is_rejected(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"conversations": [{"from": "human", "value": "q"},
                                                           {"from": "function_call", "value": "{}"}]}])
    reason = only_reject(path).reason
    assert reason.startswith("conversations[1].from must be one of human, user, gpt, assistant")
    assert reason.endswith("got 'function_call'")


def test_prompt_completion_strings_and_message_lists(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"},
                                        {"prompt": [S("s"), U("p")], "completion": [A("c")]},
                                        {"prompt": "p", "completion": [A("c")]},
                                        {"prompt": "p", "completion": "c", "label": False}])
    examples, rejects = read(path)
    assert [e.messages for e in examples] == [[U("p"), A("c")], [S("s"), U("p"), A("c")]]
    assert rejects[0].reason.startswith("'prompt' and 'completion' must both be strings or both lists")
    assert "unpaired preference record" in rejects[1].reason


def test_preference_strings_lists_and_implicit_prompt(tmp_path):
    conv = lambda answer: [S("s"), U("q"), A("a1"), U("q2"), A(answer)]  # noqa: E731
    path = jsonl(tmp_path / "d.jsonl", [
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"prompt": [U("q")], "chosen": [A("good")], "rejected": [A("bad")]},
        {"chosen": conv("good"), "rejected": conv("bad")},
        # UltraFeedback: a string prompt next to whole conversations (and a `messages` copy)
        {"prompt": "q", "chosen": [U("q"), A("good")], "rejected": [U("q"), A("bad")],
         "messages": [U("q"), A("good")]},
    ])
    examples, rejects = read(path)
    assert not rejects
    short = dict(messages=[U("q")], chosen=[A("good")], rejected=[A("bad")])
    assert examples[0] == Example(**short, meta=meta(path, 1))
    assert examples[1] == Example(**short, meta=meta(path, 2))
    assert examples[2] == Example(messages=[S("s"), U("q"), A("a1"), U("q2")], chosen=[A("good")],
                                  rejected=[A("bad")], meta=meta(path, 3))
    assert examples[3] == Example(**short, meta=meta(path, 4))
    assert all(e.kind == "preference" for e in examples)


@pytest.mark.parametrize("record, reason", [
    ({"chosen": "good", "rejected": "bad"}, "'prompt' is missing; give it, or make 'chosen' and 'rejected' whole"),
    ({"chosen": [U("q"), A("a")], "rejected": [U("q"), A("a")]}, "'chosen' and 'rejected' are the same conversation"),
    ({"chosen": [U("q"), A("a")], "rejected": [U("other"), A("b")]}, "'chosen' and 'rejected' must share"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "'chosen' and 'rejected' are the same answer"),
    ({"prompt": "q", "chosen": "good"}, "'rejected' is missing or empty"),
])
def test_preference_rejects(tmp_path, record, reason):
    assert only_reject(jsonl(tmp_path / "d.jsonl", [record])).reason.startswith(reason)


def test_openai_preference(tmp_path):
    record = {"input": {"messages": [S("s"), U("q")], "tools": []},
              "preferred_output": [A("good")], "non_preferred_output": [A("bad")]}
    path = jsonl(tmp_path / "d.jsonl", [record, {**record, "input": "q"}])
    examples, rejects = read(path)
    assert examples == [Example(messages=[S("s"), U("q")], chosen=[A("good")], rejected=[A("bad")], meta=meta(path, 1))]
    assert rejects[0].reason == "'input' must be an object {\"messages\": [...]}; got str"


def test_text_records_and_plain_text_files(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"text": "a document"}, {"text": 3}])
    examples, rejects = read(path)
    assert examples == [Example(messages=[], text="a document", meta=meta(path, 1))]
    assert rejects[0].reason == "'text' must be a string; got int"
    txt = tmp_path / "notes.md"
    txt.write_text("# Title\nfirst para\r\n  \n\n\nsecond\n  indented\n\n", encoding="utf-8")
    examples, _ = read(txt, task="docs")
    assert examples == [Example(messages=[], text="# Title\nfirst para", task="docs", meta=meta(txt, 1)),
                        Example(messages=[], text="second\n  indented", task="docs", meta=meta(txt, 6))]


# --- detection, forcing, tasks ---------------------------------------------------------------------


@pytest.mark.parametrize("record, expected", [
    ({"messages": []}, "chat"),
    ({"instruction": "i", "output": "o"}, "alpaca"),
    ({"output": "o"}, "alpaca"),
    ({"conversations": []}, "sharegpt"),
    ({"prompt": "p", "completion": "c"}, "prompt_completion"),
    ({"prompt": "p", "chosen": "c", "rejected": "r"}, "preference"),
    ({"chosen": [], "rejected": [], "messages": []}, "preference"),
    ({"input": {}, "preferred_output": [], "non_preferred_output": []}, "openai_preference"),
    ({"text": "t"}, "text"),
    ({"text": "t", "prompt": "p", "completion": "c"}, "prompt_completion"),
    ({"messages": None, "text": "t"}, "text"),  # null does not count (tables fill absent columns with null)
    ({"question": "q"}, None),
    ([1, 2], None),
])
def test_detect_record_format(record, expected):
    assert detect_record_format(record) == expected


def test_a_record_in_no_format_names_its_fields_and_the_formats(tmp_path):
    reason = only_reject(jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])).reason
    assert reason.startswith("no known format: the record's fields are [answer, question]; expected messages (chat)")
    assert "map them with `columns`" in reason


def test_forced_format(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c", "text": "the text"},
                                        {"conversations": [{"from": "human", "value": "q"}]}])
    examples, rejects = read(path, format="text")
    assert examples[0].text == "the text"
    assert rejects[0].reason == ("'text' is missing or empty; fill it in or remove the record "
                                 "(the record looks like sharegpt; check the format setting)")
    examples, _ = read(path, format="prompt_completion")
    assert examples[0].messages == [U("p"), A("c")]


def test_task_from_argument_record_and_column(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"},
                                        {"prompt": "p", "completion": "c", "task": "own"},
                                        {"prompt": "p", "completion": "c", "kind": "col"},
                                        {"prompt": "p", "completion": "c", "task": 7}])
    examples, rejects = read(path, task="default")
    assert [e.task for e in examples] == ["default", "own", "default"]
    assert rejects[0].reason == "'task' must be a non-empty string; got 7"
    examples, _ = read(path, task="default", task_column="kind")
    assert [e.task for e in examples] == ["default", "own", "col"]


# --- tables: CSV, TSV, Parquet, saved Hugging Face datasets -----------------------------------------


def write_csv(path: Path, rows, delimiter=",") -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter=delimiter).writerows(rows)
    return path


def test_csv_column_mapping_task_column_and_json_cells(tmp_path):
    path = write_csv(tmp_path / "d.csv", [
        ["", "question", "answer", "topic", "notes"],
        ["0", "What, exactly?", "This.\nOn two lines", "billing", "[1, 2]"],
        [],
        ["2", "Why?", "", "", ""],
    ])
    columns = {"prompt": "question", "completion": "answer"}
    examples, rejects = read(path, columns=columns, task_column="topic", task="general")
    assert examples == [Example(messages=[U("What, exactly?"), A("This.\nOn two lines")], task="billing",
                                meta=meta(path, 1))]
    assert rejects == [Reject(str(path), 3, "'completion' is missing or empty; fill it in or remove the record",
                              json.dumps({"": "2", "question": "Why?", "answer": "", "topic": "", "notes": ""}))]


def test_csv_messages_cell_holds_json(tmp_path):
    msgs = [U("q"), A("a")]
    path = write_csv(tmp_path / "d.csv", [["messages", "task"], [json.dumps(msgs), "t"]])
    assert only(path) == Example(messages=msgs, task="t", meta=meta(path, 1))


def test_csv_bad_rows_are_rejects_with_their_data_row(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"prompt,completion\np,c\ntoo,many,cells\ncaf\xe9,x\np2,c2\n")
    examples, rejects = read(path)
    assert [e.meta["line"] for e in examples] == [1, 4]
    assert [(r.line, r.reason) for r in rejects] == [
        (2, "the row has 3 cells but the header has 2 columns; quote cells that contain commas"),
        (3, "not UTF-8 (invalid continuation byte at byte 40 of the file); re-save the file as UTF-8")]
    assert path.read_bytes()[40:41] == b"\xe9"


def test_tsv_with_mapping(tmp_path):
    path = write_csv(tmp_path / "d.tsv", [["q", "a", "system"], ["Say hi", "hi", "kind"]], delimiter="\t")
    ex = only(path, columns={"instruction": "q", "output": "a"})
    assert ex.messages == [S("kind"), U("Say hi"), A("hi")]


def test_table_without_a_mapped_column_is_a_data_error(tmp_path):
    path = write_csv(tmp_path / "d.csv", [["question", "answer"], ["q", "a"]])
    with pytest.raises(DataError) as exc:
        read_source(path, columns={"prompt": "q", "completion": "answer"}, task_column="topic")
    assert f"{path}: columns maps 'prompt' to column 'q', which it does not have; its columns are: question, " \
           f"answer" in str(exc.value)
    assert "task_column is column 'topic'" in str(exc.value)
    with pytest.raises(DataError, match="'question' is not a field Tailor reads"):
        read_source(path, columns={"question": "prompt"})


def test_parquet_with_mapping_and_message_structs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"q": "What?", "a": "That.", "messages": None},
            {"q": None, "a": None, "messages": [{"role": "user", "content": "hi", "weight": None},
                                                {"role": "assistant", "content": "yo", "weight": 1}]},
            {"q": "Why?", "a": None, "messages": None}]
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("q", pa.string()), ("a", pa.string()),
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string()), ("weight", pa.int64())])))]))
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=2)
    path = tmp_path / "d.parquet"
    examples, rejects = read(path, columns={"prompt": "q", "completion": "a"})
    assert examples == [Example(messages=[U("What?"), A("That.")], meta=meta(path, 1)),
                        Example(messages=[U("hi"), A("yo", weight=1)], meta=meta(path, 2))]
    assert [(r.line, r.reason) for r in rejects] == [(3, "'completion' is missing or empty; fill it in or remove "
                                                         "the record")]
    assert json.loads(rejects[0].record) == {"q": "Why?", "a": None, "messages": None}


def test_saved_hf_dataset_and_dataset_dict(tmp_path):
    from datasets import Dataset, DatasetDict

    one = Dataset.from_list([{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": ""}])
    one.save_to_disk(str(tmp_path / "ds"))
    examples, rejects = read(tmp_path / "ds", columns={"prompt": "question", "completion": "answer"})
    assert examples == [Example(messages=[U("q1"), A("a1")], meta=meta(tmp_path / "ds", 1))]
    assert (rejects[0].source, rejects[0].line) == (str(tmp_path / "ds"), 2)
    assert json.loads(rejects[0].record) == {"question": "q2", "answer": ""}

    DatasetDict({"train": Dataset.from_list([{"text": "t1"}, {"text": "t2"}]),
                 "test": Dataset.from_list([{"text": "t3"}])}).save_to_disk(str(tmp_path / "dd"))
    examples, _ = read(tmp_path / "dd")
    # Each split's rows point at its own folder, so (source, line) identifies a record.
    assert [(e.text, e.meta) for e in examples] == [
        ("t1", meta(tmp_path / "dd" / "train", 1, split="train")),
        ("t2", meta(tmp_path / "dd" / "train", 2, split="train")),
        ("t3", meta(tmp_path / "dd" / "test", 1, split="test"))]


# --- files and folders -----------------------------------------------------------------------------


def test_folder_of_mixed_files(tmp_path):
    from datasets import Dataset

    root = tmp_path / "data"
    (root / "b_sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    jsonl(root / "a.jsonl", [{"prompt": "p", "completion": "c"}])
    jsonl(root / ".skip.jsonl", [{"prompt": "hidden", "completion": "c"}])
    jsonl(root / ".hidden" / "x.jsonl", [{"prompt": "hidden", "completion": "c"}])
    write_csv(root / "b_sub" / "rows.csv", [["instruction", "output"], ["i", "o"]])
    (root / "b_sub" / "notes.txt").write_text("a note\n", encoding="utf-8")
    Dataset.from_list([{"text": "from arrow"}]).save_to_disk(str(root / "c_saved"))
    examples, rejects = read(root, task="mixed")
    assert not rejects
    assert [(Path(e.meta["source"]).relative_to(root).as_posix(), e.kind) for e in examples] == [
        ("a.jsonl", "chat"), ("b_sub/notes.txt", "text"), ("b_sub/rows.csv", "chat"), ("c_saved", "text")]
    assert {e.task for e in examples} == {"mixed"}


def test_folder_problems_are_data_errors_before_reading(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "t"}\n', encoding="utf-8")
    (tmp_path / "b.txt").write_text("t\n", encoding="utf-8")
    (tmp_path / "c.docx").write_bytes(b"PK")
    with pytest.raises(DataError, match=r"c.docx: unknown file type; Tailor reads .jsonl"):
        read_source(tmp_path)
    (tmp_path / "c.docx").unlink()
    with pytest.raises(DataError, match=r"b.txt: a plain-text file is read as format 'text', not 'chat'"):
        read_source(tmp_path, format="chat")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no data files in this folder"):
        read_source(tmp_path / "empty")


def test_unreadable_tables_are_data_errors_at_the_call(tmp_path):
    (tmp_path / "dup.csv").write_text("q,q,a\n1,2,3\n", encoding="utf-8")
    (tmp_path / "latin.tsv").write_bytes(b"caf\xe9\tx\n")
    (tmp_path / "d.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError) as exc:
        read_source(tmp_path)
    assert exc.value.problems[0].startswith(f"{tmp_path / 'd.parquet'}: not a readable Parquet file")
    assert exc.value.problems[1] == f"{tmp_path / 'dup.csv'}: column(s) ['q'] appear more than once in the " \
                                    f"header; rename them"
    assert exc.value.problems[2] == (f"{tmp_path / 'latin.tsv'}: the header is not UTF-8 (invalid continuation "
                                     f"byte at byte 3 of the file); re-save the file as UTF-8")


@pytest.mark.parametrize("kwargs, message", [
    ({"path": "nowhere.jsonl"}, "nowhere.jsonl: not found"),
    ({"path": "EXISTING", "format": "jsonl"}, "unknown format 'jsonl'; use auto or one of chat, alpaca"),
])
def test_data_errors_are_raised_at_the_call(tmp_path, kwargs, message):
    jsonl(tmp_path / "d.jsonl", [{"text": "t"}])
    kwargs["path"] = tmp_path / "d.jsonl" if kwargs["path"] == "EXISTING" else tmp_path / kwargs["path"]
    with pytest.raises(DataError, match=message):
        read_source(**kwargs)  # no iteration needed: the call itself raises


def test_gzipped_jsonl_and_json(tmp_path):
    rec = {"prompt": "p", "completion": "c"}
    for name in ("d.jsonl.gz", "d.json.gz"):
        with gzip.open(tmp_path / name, "wt", encoding="utf-8") as f:
            f.write("\n" + json.dumps(rec) + "\n")
        assert only(tmp_path / name).meta == meta(tmp_path / name, 2)
    (tmp_path / "broken.jsonl.gz").write_bytes(gzip.compress(b'{"text": "t"}\n' * 50)[:40])
    with pytest.raises(DataError, match="broken.jsonl.gz: cannot read the file"):
        list(read_source(tmp_path / "broken.jsonl.gz"))


def test_json_array_pretty_object_and_json_lines(tmp_path):
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps([{"text": "one"}, 5, {"text": "three"}], indent=1), encoding="utf-8")
    examples, rejects = read(arr)
    assert [(e.text, e.meta["line"]) for e in examples] == [("one", 2), ("three", 6)]
    assert (rejects[0].line, rejects[0].record) == (5, "5")
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps({"prompt": "p", "completion": "c"}, indent=2), encoding="utf-8")
    assert only(obj).messages == [U("p"), A("c")]
    lines = jsonl(tmp_path / "lines.json", [{"text": "a"}, {"text": "b"}])
    assert [e.text for e in read(lines)[0]] == ["a", "b"]


def test_json_array_broken_midway_is_an_error_naming_the_place(tmp_path):
    # Past a syntax error no record can be told apart: reading on, or stopping with one reject, would
    # leave records lost without a count.
    path = tmp_path / "d.json"
    path.write_text('[{"text": "one"},\n {"text": "two"\n, {"text": "three"}]', encoding="utf-8")
    with pytest.raises(DataError, match=r"d.json:3: not valid JSON at column 3 \(Expecting property name"):
        list(read_source(path))


def test_json_array_cut_short(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"text": "one"},\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d.json:2: not valid JSON at column 1 \(the array is not closed with "
                                        r"'\]'; check whether the file is complete\)"):
        list(read_source(path))


def test_json_array_with_a_bad_byte_rejects_only_that_record(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b'[{"text": "caf\xe9"}, {"text": "fine"}]')
    examples, rejects = read(path)
    assert [e.text for e in examples] == ["fine"]
    assert rejects[0].reason == "not UTF-8 (invalid byte at byte 14 of the file); re-save the file as UTF-8"


def test_byte_order_mark_is_stripped(tmp_path):
    (tmp_path / "d.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "t"}).encode() + b"\n")
    assert only(tmp_path / "d.jsonl").text == "t"
    (tmp_path / "d.csv").write_bytes(b"\xef\xbb\xbfprompt,completion\r\np,c\r\n")
    assert only(tmp_path / "d.csv").messages == [U("p"), A("c")]
    (tmp_path / "d.txt").write_bytes(b"\xef\xbb\xbfdoc\n")
    assert only(tmp_path / "d.txt").text == "doc"


def test_jsonl_rejects_carry_source_line_reason_and_record(tmp_path):
    path = tmp_path / "d.jsonl"
    long = json.dumps({"text": 1, "pad": "x" * 3000})
    path.write_bytes(b'{"text": "ok"}\n\n{"text": "caf\xe9"}\n{"text": \n[1]\n' + long.encode() + b"\n")
    examples, rejects = read(path)
    assert [e.meta["line"] for e in examples] == [1]
    assert [(r.source, r.line) for r in rejects] == [(str(path), n) for n in (3, 4, 5, 6)]
    assert rejects[0].reason == ("not UTF-8 (invalid continuation byte at byte 29 of the file); "
                                 "re-save the file as UTF-8")
    assert path.read_bytes()[29:30] == b"\xe9"
    assert rejects[0].record == '{"text": "caf\ufffd"}'
    assert rejects[1].reason == "not valid JSON (Expecting value, column 10)"
    assert rejects[2].reason == 'a record must be a JSON object like {"messages": [...]}; got list'
    assert rejects[3].record == long[:2000]
    assert str(rejects[2]) == f"{path}:5: {rejects[2].reason}"


def test_unpaired_surrogates_are_rejected_and_kept_out_of_rejects(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", ['{"prompt": "hi \\ud83d", "completion": "c"}', '{"\\ud800": 1}'])
    examples, rejects = read(path)
    assert not examples
    assert "unpaired surrogate" in rejects[0].reason
    assert rejects[1].reason.startswith("no known format: the record's fields are [\ufffd]")


# --- property tests: nothing escapes, nothing is lost ----------------------------------------------


def check_items(items, path):
    """Every item is a valid Example or a Reject that points into the file."""
    for item in items:
        if isinstance(item, Example):
            assert check_example(item) is None
            assert item.meta["source"] == str(path) and item.meta["line"] >= 1
        else:
            assert isinstance(item, Reject) and item.reason and item.source == str(path)
            assert item.line >= 1 and len(item.record) <= 2000
            (item.reason + item.record).encode("utf-8")  # a rejects file can always be written


def read_bytes_as(suffix: str, data: bytes, **kwargs) -> list:
    # A fresh folder per example: hypothesis runs the test body many times within one tmp_path.
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"d{suffix}"
        path.write_bytes(data)
        items = list(read_source(path, **kwargs))
        check_items(items, path)
    return items


def non_blank_lines(data: bytes) -> int:
    data = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
    return sum(1 for line in data.split(b"\n") if line.strip())


FRAGMENTS = st.sampled_from([b"{", b"}", b"[", b"]", b",", b":", b"\n", b"\n\n", b" ", b'"messages"', b'"text"',
                             b'"prompt"', b'"completion"', b'"role"', b'"user"', b'"x"', b"1", b"null",
                             b"\xff", b"\xe9", b"\xef\xbb\xbf", b"\r", b"\t", b'"', b"\x00"])
JUNK = st.lists(FRAGMENTS | st.binary(max_size=6), max_size=40).map(b"".join)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(JUNK)
def test_random_bytes_as_jsonl(data):
    items = read_bytes_as(".jsonl", data)
    assert len(items) == non_blank_lines(data)


@SETTINGS
@given(JUNK)
def test_random_bytes_as_json(data):
    # A .json document read whole that stops being valid JSON is an error naming the place (no
    # record past it can be found), never a traceback nor records lost without a count.
    try:
        read_bytes_as(".json", data)
    except DataError as exc:
        assert len(exc.problems) == 1 and "d.json:" in exc.problems[0] and "not valid JSON at column" in exc.problems[0]


@SETTINGS
@given(JUNK)
def test_random_bytes_as_text(data):
    items = read_bytes_as(".txt", data)
    body = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
    paragraphs = 0
    for previous, line in zip([b""] + body.split(b"\n"), body.split(b"\n")):
        paragraphs += bool(line.strip()) and not previous.strip()
    assert len(items) == paragraphs


@SETTINGS
@given(JUNK)
def test_random_bytes_as_csv_body(data):
    items = read_bytes_as(".csv", b"prompt,completion,messages\n" + data)
    lines = [i.meta["line"] if isinstance(i, Example) else i.line for i in items]
    assert lines == sorted(set(lines))


@SETTINGS
@given(JUNK)
def test_random_bytes_as_a_whole_csv(data):
    try:
        read_bytes_as(".tsv", data)
    except DataError as exc:  # only the header may fail the file
        assert "header" in str(exc)


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3), max_leaves=10)


@SETTINGS
@given(st.lists(JSON_VALUES, max_size=6))
def test_random_json_values_as_jsonl(values):
    data = "".join(json.dumps(v) + "\n" for v in values).encode("utf-8")
    items = read_bytes_as(".jsonl", data)
    assert len(items) == len(values)


MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "developer", "bot"]),
     "content": st.text(max_size=4) | st.none() | st.lists(st.fixed_dictionaries(
         {"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=3)}), max_size=2)},
    optional={"weight": st.sampled_from([0, 1, 2, None]), "from": st.sampled_from(["human", "gpt", "x"]),
              "value": st.text(max_size=3)})
FIELD_VALUE = (st.none() | st.text(max_size=6) | st.integers() | st.booleans() | st.lists(MESSAGE, max_size=4)
               | st.fixed_dictionaries({"messages": st.lists(MESSAGE, max_size=3)}) | JSON_VALUES)
KNOWN_RECORD = st.dictionaries(st.sampled_from(FIELDS + ("label", "role", "content")), FIELD_VALUE, max_size=5)


@SETTINGS
@given(st.lists(KNOWN_RECORD, max_size=6), st.sampled_from(("auto",) + FORMATS))
def test_random_records_with_known_keys_as_jsonl(records, format):
    data = "".join(json.dumps(r) + "\n" for r in records).encode("utf-8")
    items = read_bytes_as(".jsonl", data, format=format)
    assert len(items) == len(records)


@SETTINGS
@given(st.lists(KNOWN_RECORD, min_size=1, max_size=6))
def test_random_records_with_known_keys_as_csv(records):
    fields = sorted({k for r in records for k in r})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(fields or ["x"])
    for r in records:
        writer.writerow([json.dumps(r[k]) if isinstance(r.get(k), (list, dict)) else r.get(k, "") for k in fields]
                        if fields else [""])
    items = read_bytes_as(".csv", buffer.getvalue().encode("utf-8"))
    assert len(items) == len(records)  # (csv writes a lone empty cell as "", so no row is a blank line)


@st.composite
def parquet_tables(draw):
    string_keys = draw(st.sets(st.sampled_from(["prompt", "completion", "instruction", "output", "input", "text",
                                                "chosen", "rejected", "task", "system"]), max_size=4))
    list_keys = draw(st.sets(st.sampled_from(["messages", "chosen", "rejected", "prompt", "completion"]), max_size=2))
    plain_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "x"]),
                                           "content": st.none() | st.text(max_size=4)})
    n = draw(st.integers(1, 5))
    columns = {k: draw(st.lists(st.none() | st.text(max_size=6), min_size=n, max_size=n)) for k in string_keys}
    columns |= {k: draw(st.lists(st.none() | st.lists(plain_message, max_size=3), min_size=n, max_size=n))
                for k in list_keys}
    return columns, n


@settings(max_examples=25, deadline=None)
@given(parquet_tables())
def test_random_tables_as_parquet(table):
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns, n = table
    arrays = columns or {"unrelated": [None] * n}
    sink = io.BytesIO()
    pq.write_table(pa.table(arrays) if any(v is not None for c in arrays.values() for v in c)
                   else pa.table({k: pa.array(v, pa.string()) for k, v in arrays.items()}), sink)
    assert len(read_bytes_as(".parquet", sink.getvalue())) == n
