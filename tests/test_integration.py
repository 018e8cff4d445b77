"""The embedded SmolLM2-135M for real: a short LoRA run, and the quickstart end to end."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import train_losses
from tailor.cli import app
from tailor.quickstart import JOB
from tailor.spec import load_job
from tailor.techniques import task

pytestmark = pytest.mark.integration


def test_lora_on_the_embedded_model_learns_and_saves_a_peft_adapter(embedded_path, tmp_path):
    job = load_job(JOB, [f"output.dir={tmp_path}", "training.max_steps=4", "training.log_every=1",
                         "training.learning_rate=2e-3", "training.warmup_ratio=0", "training.threads=2",
                         "training.val_generate=0", "eval.enabled=false"])  # the quickstart test evaluates
    run_dir = task.run(job, show_progress=False)
    losses = train_losses(run_dir)
    assert len(losses) == 4 and losses[-1] < losses[0]
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["base_model_name_or_path"] == str(embedded_path)
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["model"]["kind"] == "embedded" and manifest["encoding"]["truncated"] == 0


def test_quickstart_runs_every_step(embedded_path, tmp_path):
    result = CliRunner().invoke(app, ["quickstart", "--steps", "2", "--out", str(tmp_path)], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    for heading in ("1 · Load the base model", "2 · Prepare the data", "3 · Fine-tune", "4 · Base vs tuned",
                    "5 · Evaluate"):
        assert heading in result.output
    assert "records: 132 read = 121 kept + 2 rejected + 9 duplicates (6 exact, 3 near) + 0 filtered" in result.output
    prepared = tmp_path / "prepared"
    for planted in ("maria.keller@gmail.com", "4111 1111 1111 1111", "DE89 3704", "Priya", "(415) 555-2671"):
        for f in [*prepared.rglob("*.arrow"), *prepared.glob("*.json*"), prepared / "card.md"]:
            assert planted not in f.read_text(encoding="utf-8", errors="replace"), (planted, f)
    run_dir = next((tmp_path / "quickstart").iterdir())
    comparison = (run_dir / "quickstart.md").read_text()
    assert comparison.count("**Base:**") == 3 and comparison.count("**Tuned:**") == 3
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert summary["data"]["examples"] == 12  # the prepared test split
    assert summary["retention"]["questions"] == 120
    assert ("gate: PASSED" if summary["gate"]["passed"] else "gate: FAILED") in result.output
    assert "ROUGE-L" in result.output and "general questions" in result.output


def test_quickstart_sequential_runs_three_gated_stages(embedded_path, tmp_path):
    # the staged path end to end on the real model: each stage's data prepared once, three stages
    # that continue each other, the gate after each, the evaluation of the stage kept
    result = CliRunner().invoke(app, ["quickstart", "--technique", "sequential", "--steps", "2", "--out", str(tmp_path)],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "after stage routing: validation loss handbook" in result.output
    assert {p.name for p in tmp_path.iterdir()} >= {"prepared-support", "prepared-routing", "quickstart-sequential"}
    run_dir = next((tmp_path / "quickstart-sequential").iterdir())
    record = json.loads((run_dir / "stages.json").read_text())
    assert [s["name"] for s in record["stages"]] == ["handbook", "support", "routing"]
    folders = [Path(s["folder"]) for s in record["stages"]]
    for before, after in zip(folders, folders[1:]):
        assert json.loads((after / "manifest.json").read_text())["start"]["trainable_sha256"] == \
            json.loads((before / "summary.json").read_text())["end"]["trainable_sha256"]
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert summary["data"]["examples"] >= 10 and "rouge_l" in summary["tuned"]
