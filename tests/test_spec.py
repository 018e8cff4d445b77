from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tailor.cli import app
from tailor.runs import Run
from tailor.spec import Job, SpecError, describe_fields, load_job, parse_job

ROOT = Path(__file__).resolve().parents[1]
JOB_FILES = sorted(ROOT.glob("examples/*.yaml")) + [ROOT / "tailor/quickstart/job.yaml"]


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_every_shipped_job_parses_and_its_data_exists(path):
    job = load_job(path)
    assert isinstance(job, Job)
    sources = job.data.train + job.data.validation + job.transfer.domain_text
    sources += [src for stage in job.stages if stage.data for src in stage.data.train + stage.data.validation]
    for src in sources:
        assert Path(getattr(src, "path", src)).is_file(), src


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_every_shipped_job_runs_a_step(path, tmp_path, tiny_model_dir):
    # its own data and settings, on the tiny model: NER, the base perplexity and the evaluation are
    # switched off only to keep the test fast (the quickstart test runs them on the real model)
    from tailor.techniques import run

    job = load_job(path, [f"model.base={tiny_model_dir}", "model.dtype=float32", "training.max_steps=1",
                          "training.val_generate=0", "training.threads=1", "eval.enabled=false",
                          "adapter.train_top_blocks=1", "adapter.lora_top_blocks=1",  # the tiny model has 2 blocks
                          "data.privacy.ner=false", "data.card.perplexity_sample=0", f"output.dir={tmp_path}"])
    for stage in job.stages:  # the same switches in each stage's own data section
        if stage.data is not None:
            stage.data.privacy.ner, stage.data.card.perplexity_sample = False, 0
    run_dir = run(job, show_progress=False)
    assert Run(run_dir).done and ((Run(run_dir).adapter_dir).is_dir() or (Run(run_dir).model_dir).is_dir())


def test_there_are_example_jobs_for_each_adapter_kind():
    kinds = {load_job(p).adapter.kind for p in JOB_FILES}
    assert kinds == {"lora", "qlora", "full", "freeze"}
    assert {load_job(p).distributed.strategy for p in JOB_FILES} >= {"ddp", "fsdp"}


def test_misspelt_key_names_the_closest_valid_one():
    with pytest.raises(SpecError) as exc:
        parse_job({"data": {"train": ["x.jsonl"]}, "training": {"learnig_rate": 1e-4}})
    assert "training.learnig_rate: unknown key; did you mean 'learning_rate'?" in str(exc.value)


def test_all_problems_are_reported_together():
    with pytest.raises(SpecError) as exc:
        parse_job({"data": {"train": "x.jsonl"}, "modle": {}, "training": {"epochs": -1, "batch_size": "big"},
                   "adapter": {"kind": "dora"}})
    problems = exc.value.problems
    assert len(problems) == 4, problems
    text = "\n".join(problems)
    assert "modle: unknown key; did you mean 'model'?" in text
    assert "training.epochs" in text and "training.batch_size" in text
    assert "adapter.kind" in text and "'lora', 'qlora', 'full' or 'freeze'" in text


def test_missing_training_data_is_a_spec_error():
    with pytest.raises(SpecError, match="data.train is empty"):
        parse_job({})


def test_set_overrides_go_through_the_schema(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": "t.jsonl"}}))
    job = load_job(path, ["training.learning_rate=1e-4", "adapter.target_modules=[q_proj, v_proj]"])
    assert job.training.learning_rate == 1e-4
    assert job.adapter.target_modules == ["q_proj", "v_proj"]
    assert job.data.train == [str(tmp_path / "t.jsonl")]  # relative to the job file
    assert (load_job(path, ["data.privacy.spacy_model=./models/de"]).data.privacy.spacy_model
            == str(tmp_path / "models/de"))
    assert load_job(path, ["data.privacy.spacy_model=de_core_news_sm"]).data.privacy.spacy_model == "de_core_news_sm"
    with pytest.raises(SpecError, match="training.learning_rte: unknown key; did you mean 'learning_rate'"):
        load_job(path, ["training.learning_rte=1e-4"])
    with pytest.raises(SpecError, match="training.learning_rate: must be a number above 0, or auto .*got -1"):
        load_job(path, ["training.learning_rate=-1"])


def test_every_field_is_documented():
    rows = describe_fields()
    assert len(rows) > 30
    for key, _type, _default, doc in rows:
        assert doc, f"{key} has no description"


def test_cli_train_with_misspelt_key_exits_nonzero_naming_it(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": "t.jsonl"}, "training": {"epohcs": 2}}))
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 2
    assert "training.epohcs: unknown key; did you mean 'epochs'?" in result.output


def test_cli_spec_lists_keys():
    result = CliRunner().invoke(app, ["spec", "training"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "training.layer_lr_decay" in result.output and "model.base" not in result.output


def test_docs_job_spec_table_is_generated_from_the_schema():
    from tailor.spec import spec_markdown

    doc = (ROOT / "docs" / "job-spec.md").read_text(encoding="utf-8")
    assert doc.endswith(spec_markdown()), "regenerate the table: tailor spec --markdown"
