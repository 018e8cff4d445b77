"""tailor runs: list, show and compare read everything from the run folders."""

import json

import pytest
from typer.testing import CliRunner

from tailor.cli import app
from tailor.runs import Run, RunNotFound
from tailor.track.runs import config_differences, flatten, load_run_record


@pytest.fixture
def two_runs(make_job, tmp_path):
    from tailor.spec import load_job
    from tailor.techniques import task

    first = task.run(load_job(make_job("alpha", training={"max_steps": 1})), show_progress=False)
    second = task.run(load_job(make_job("beta", training={"max_steps": 2, "learning_rate": 5e-3})), show_progress=False)
    return tmp_path / "runs", first, second


def test_flatten_and_differences():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": []}) == {"a.b": 1, "a.c.d": 2, "e": []}
    records = [{"job": {"t": {"lr": 1, "seed": 7}}}, {"job": {"t": {"lr": 2, "seed": 7}, "new": True}}]
    assert config_differences(records) == [("new", [None, True]), ("t.lr", [1, 2])]


def test_compare_shows_the_differing_keys_and_the_measures(two_runs):
    runs_dir, first, second = two_runs
    result = CliRunner().invoke(app, ["runs", "compare", str(first), "beta", "--dir", str(runs_dir)],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert any("training.learning_rate" in l and "0.01" in l and "0.005" in l for l in lines)
    assert any("training.max_steps" in l and "1" in l and "2" in l for l in lines)
    assert any(l.strip().startswith("│ name") for l in lines)  # alpha vs beta
    assert not any("training.seed" in l for l in lines)  # the same in both: not a difference
    assert any("steps" in l and "1" in l and "2" in l for l in lines)


def test_list_and_show(two_runs):
    runs_dir, first, second = two_runs
    listed = CliRunner().invoke(app, ["runs", "list", "--dir", str(runs_dir)], env={"COLUMNS": "200"})
    assert listed.exit_code == 0 and f"alpha/{first.name}" in listed.stdout and f"beta/{second.name}" in listed.stdout
    shown = CliRunner().invoke(app, ["runs", "show", f"beta/{second.name}", "--dir", str(runs_dir)],
                               env={"COLUMNS": "200"})
    assert shown.exit_code == 0 and str(second) in shown.stdout and "0.005" in shown.stdout
    assert Run.resolve("alpha", runs_dir).path == first and load_run_record(Run(first))["status"] == "done"
    with pytest.raises(RunNotFound, match="recent runs"):
        Run.resolve("gamma", runs_dir)
    empty = CliRunner().invoke(app, ["runs", "list", "--dir", str(runs_dir / "none")])
    assert empty.exit_code == 1 and "no runs under" in empty.stderr


def test_a_key_an_older_run_lacks_is_its_default(two_runs):
    import yaml

    runs_dir, first, second = two_runs
    job = yaml.safe_load((Run(first).job_file).read_text())
    del job["tracking"], job["eval"]  # as a run from before these keys existed wrote it
    (Run(first).job_file).write_text(yaml.safe_dump(job))
    differing = [k for k, _ in config_differences([load_run_record(Run(first)), load_run_record(Run(second))])]
    assert not any(k.startswith(("tracking", "eval.")) for k in differing)
    assert "training.learning_rate" in differing


def test_the_docs_table_is_the_layout():
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "runs.md").read_text(encoding="utf-8")
    assert doc.endswith(Run.layout_markdown()), "regenerate the table: tailor runs layout"
    result = CliRunner().invoke(app, ["runs", "layout"])
    assert result.exit_code == 0 and result.stdout == Run.layout_markdown()


def test_a_manifest_reads_back_typed_and_writes_back_as_it_was(two_runs):
    from tailor.runs import RunError

    _, first, _ = two_runs
    run = Run(first)
    text = run.manifest_file.read_text()
    manifest = run.manifest()
    assert manifest.model.kind == "local" and manifest.start.from_ is None and manifest.adapter.kind == "lora"
    assert manifest.to_json() == text  # nothing added, dropped or reordered
    # a key another version of Tailor wrote is kept
    run.manifest_file.write_text(text.replace('"name":', '"written_by": "tailor 9.9",\n "name":', 1))
    assert json.loads(run.manifest().to_json())["written_by"] == "tailor 9.9"
    run.manifest_file.write_text(text.replace('"source"', '"sauce"'))
    with pytest.raises(RunError, match=r"manifest.json: model.source: Field required"):
        run.manifest()


def test_a_folder_that_is_not_a_run_is_named_as_such(tmp_path):
    from tailor.runs import RunError

    with pytest.raises(RunError, match="no job.yaml; is this a run folder"):
        Run(tmp_path).job()
    with pytest.raises(RunError, match="no adapter/ or model/ folder"):
        Run(tmp_path).require_result()
    result = CliRunner().invoke(app, ["eval", str(tmp_path)])
    assert result.exit_code == 2 and "no job.yaml" in result.stderr and "Traceback" not in result.output


def test_a_folder_built_in_place_is_all_or_nothing(tmp_path):
    from tailor.files import building

    final = tmp_path / "adapter"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), building(final) as tmp:
        tmp.mkdir()
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("killed while saving")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"] and (final / "old.txt").exists()
    with building(final) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in final.iterdir()] == ["new.txt"] and [p.name for p in tmp_path.iterdir()] == ["adapter"]
