"""The five techniques on the tiny model: multi-task sampling, stages that continue each other and
the gate between them, transfer's trainable parameters, preference optimisation."""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from tailor.runs import Run
from tailor.spec import load_job
from tailor.techniques import run as run_technique
from tailor.train.loop import TrainSettings
from tailor.train.mixture import MixturePlan, task_probabilities

from conftest import assert_declared, manifest_of


def run(job_path, *overrides, resume=False) -> Path:
    return run_technique(load_job(job_path, list(overrides)), resume=resume, show_progress=False)


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in Run(run_dir).metrics_file.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def qa(question: str, answer: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], **extra}


# --- multitask ----------------------------------------------------------------------------------


def test_task_probabilities_follow_size_temperature_and_weights():
    sizes = {"big": 900, "small": 100}
    assert task_probabilities(sizes, "proportional") == pytest.approx({"big": 0.9, "small": 0.1})
    assert task_probabilities(sizes, "temperature", 2.0) == pytest.approx({"big": 30 / 40, "small": 10 / 40})
    assert task_probabilities(sizes, "temperature", 1e6)["small"] == pytest.approx(0.5, abs=1e-4)
    assert (task_probabilities(sizes, "weights", weights={"big": 1, "small": 3})
            == pytest.approx({"big": 0.25, "small": 0.75}))
    with pytest.raises(ValueError, match="no weight for small"):
        task_probabilities(sizes, "weights", weights={"big": 1})


def test_mixture_sampling_frequencies_match_the_weights_chi_square():
    task_rows = {"a": list(range(0, 5)), "b": list(range(5, 55)), "c": list(range(55, 255))}
    p = task_probabilities({t: len(r) for t, r in task_rows.items()}, "weights", weights={"a": 5, "b": 3, "c": 2})
    plan = MixturePlan.make(task_rows, p, TrainSettings(batch_size=8, max_steps=1000, seed=3), world=1)
    counts = plan.counts(1000)
    n = sum(counts.values())
    chi2 = sum((counts[t] - n * p[t]) ** 2 / (n * p[t]) for t in p)
    assert chi2 < 13.82  # 2 degrees of freedom, p = 0.001
    # a small task drawn more often than its size cycles through all its rows evenly
    drawn_a = [r for s in range(200) for r in plan.step_rows(s) if r < 5]
    assert max(drawn_a.count(i) for i in range(5)) - min(drawn_a.count(i) for i in range(5)) <= 1
    # the schedule is a pure function of its inputs: a resumed run replays it
    again = MixturePlan.make(task_rows, p, TrainSettings(batch_size=8, max_steps=1000, seed=3), world=1)
    assert [again.step_rows(s) for s in (999, 0, 500)] == [plan.step_rows(s) for s in (999, 0, 500)]


@pytest.fixture
def two_tasks(tmp_path) -> tuple[Path, Path]:
    rng = random.Random(0)
    words = "lamp glow bulb ember beacon halo order refund".split()
    support = [qa(" ".join(rng.choices(words, k=4)) + "?", "Hello! " + " ".join(rng.choices(words, k=8)))
               for _ in range(30)]
    routing = [qa(" ".join(rng.choices(words, k=5)), rng.choice(["orders", "devices"])) for _ in range(12)]
    return write_jsonl(tmp_path / "support.jsonl", support), write_jsonl(tmp_path / "routing.jsonl", routing)


def test_multitask_logs_every_task_and_draws_by_the_weights(make_job, two_tasks):
    support, routing = two_tasks
    path = make_job("mt", technique="multitask",
                    data={"train": [{"path": str(support), "task": "support"},
                                    {"path": str(routing), "task": "routing"}],
                          "validation_fraction": 0.2},
                    multitask={"sampling": "weights", "weights": {"support": 1, "routing": 1},
                               "instructions": {"routing": "Reply with one department."}},
                    training={"max_steps": 6, "eval_every": 3})
    run_dir = run(path)
    evals = [r for r in rows_of(run_dir) if r["type"] == "eval"]
    assert {"val_loss/support", "val_loss/routing", "val_token_accuracy/routing"} <= set(evals[-1])
    manifest = manifest_of(run_dir)
    assert manifest["tasks"]["routing"]["probability"] == pytest.approx(0.5)
    assert manifest["tasks"]["routing"]["instruction"] == "Reply with one department."
    summary = Run(run_dir).summary()
    drawn = summary["tasks"]
    assert drawn["support"]["rows_drawn"] + drawn["routing"]["rows_drawn"] == 6 * 2
    report = Run(run_dir).report_file.read_text()
    assert "tasks-loss" in report and "Validation loss by task" in report


def test_multitask_refuses_records_without_a_task(make_job, two_tasks, chat_file):
    from tailor.data import DataError

    support, _ = two_tasks
    path = make_job("mt-untagged", technique="multitask",
                    data={"train": [{"path": str(support), "task": "support"}, str(chat_file)]})
    with pytest.raises(DataError, match="have no task"):
        run(path)


# --- transfer -----------------------------------------------------------------------------------


def test_transfer_trains_only_the_named_top_blocks(tiny_model_dir):
    from tailor.models import load_model
    from tailor.train.adapters import AdapterConfig, apply_adapter

    from conftest import build_tokenizer

    for cfg, allowed in ((AdapterConfig(kind="freeze", train_top_blocks=1, train_norm=True),
                          ("layers.1.", "model.norm.")),
                         (AdapterConfig(kind="lora", rank=2, lora_top_blocks=1), ("layers.1.",))):
        model = apply_adapter(load_model(str(tiny_model_dir), torch.float32), cfg)
        ids = torch.tensor([build_tokenizer()("hello lamp")["input_ids"]])
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        with_grad = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
        assert with_grad and all(any(a in n for a in allowed) for n in with_grad), with_grad
        if cfg.kind == "lora":
            assert all("lora_" in n for n in with_grad)


def test_transfer_pretrains_on_domain_text_then_the_task(make_job, tmp_path):
    text = tmp_path / "handbook.txt"
    text.write_text("\n\n".join(f"The Ember lamp {i} glows warm amber and pairs over Bluetooth in the Halo app."
                                for i in range(12)), encoding="utf-8")
    path = make_job("transfer", technique="transfer", adapter={"kind": "freeze", "train_top_blocks": 1},
                    transfer={"domain_text": [str(text)], "domain_epochs": 1}, training={"max_steps": 2},
                    data={"validation_fraction": 0.2})
    run_dir = run(path)
    assert_declared(run_dir)
    stages = Run(run_dir).stages_record()["stages"]
    assert [s["name"] for s in stages] == ["domain", "task"]
    domain = Path(stages[0]["folder"])
    assert manifest_of(domain)["encoding"]["train_label_tokens"] > 0
    # text windows carry loss on every token but their first
    enc = manifest_of(domain)["encoding"]
    assert enc["train_label_tokens"] == enc["train_tokens"] - enc["train_examples"]
    assert (Run(run_dir).model_dir).is_dir() and Run(run_dir).done
    assert manifest_of(run_dir)["technique"] == "transfer"


def test_transfer_refuses_full_fine_tuning(make_job):
    from tailor.spec import SpecError

    with pytest.raises(SpecError, match="technique transfer keeps the lower blocks"):
        load_job(make_job("transfer-full", technique="transfer", adapter={"kind": "full"}))


# --- sequential ---------------------------------------------------------------------------------


@pytest.fixture
def ping_data(tmp_path) -> tuple[Path, Path]:
    """Two stages that teach opposite answers to the same questions: the second makes the model
    forget the first."""
    questions = [f"ping {w} {i}" for i, w in enumerate("lamp glow bulb ember beacon halo order refund".split() * 3)]
    pong = write_jsonl(tmp_path / "pong.jsonl", [qa(q, "pong pong pong") for q in questions])
    other = write_jsonl(tmp_path / "zzz.jsonl", [qa(q, "zzzz zzzz zzzz") for q in questions])
    return pong, other


def staged_job(make_job, name, first, second, **sections):
    stages = [{"name": "first", "data": {"train": [str(first)], "validation_fraction": 0.2}},
              {"name": "second", "data": {"train": [str(second)], "validation_fraction": 0.2},
               "training": {"learning_rate": 3e-2}},
              {"name": "third", "data": {"train": [str(first)], "validation_fraction": 0.2}}]
    sections["training"] = {"max_steps": 4} | sections.get("training", {})
    return make_job(name, technique="sequential", stages=stages, **sections)


def test_each_stage_starts_exactly_from_the_previous_stage_weights(make_job, ping_data):
    first, _ = ping_data
    for kind in ("lora", "freeze"):
        path = staged_job(make_job, f"seq-{kind}", first, first, adapter={"kind": kind, "train_top_blocks": 1},
                          sequential={"max_regression": None})
        run_dir = run(path)
        folders = sorted((Run(run_dir).stages_dir).iterdir())
        assert [f.name for f in folders] == ["1-first", "2-second", "3-third"]
        for before, after in zip(folders, folders[1:]):
            end = Run(before).summary()["end"]["trainable_sha256"]
            start = manifest_of(after)["start"]
            assert start["from"] == str(before) and start["trainable_sha256"] == end
        first_start = manifest_of(folders[0])["start"]["trainable_sha256"]
        assert first_start != Run(folders[0]).summary()["end"]["trainable_sha256"]
        # the run's result is the last stage's
        result = "adapter" if kind == "lora" else "model"
        assert (sorted(p.name for p in (run_dir / result).iterdir())
                == sorted(p.name for p in (folders[-1] / result).iterdir()))
        steps = [r["step"] for r in rows_of(run_dir) if r["type"] == "train"]
        assert steps == sorted(steps) and steps[-1] == 12


def test_the_gate_stops_when_a_stage_makes_the_model_forget(make_job, ping_data):
    first, second = ping_data
    path = staged_job(make_job, "seq-forget", first, second, training={"max_steps": 8},
                      sequential={"max_regression": 0.1, "on_regression": "stop"})
    run_dir = run(path)
    record = Run(run_dir).stages_record()["stages"]
    assert [s["name"] for s in record] == ["first", "second"]  # the third never ran
    regression = record[1]["regressions"][0]
    assert regression["stage"] == "first" and regression["rise"] > 0.1
    assert not (Run(run_dir).stages_dir / "3-third").exists()
    summary = Run(run_dir).summary()
    assert summary["stopped_at_stage"] == "second" and summary["result_of"] == "1-first"
    first_summary = json.loads((Run(run_dir).stages_dir / "1-first" / "summary.json").read_text())
    assert summary["final_val_loss"] == first_summary["final_val_loss"]
    kept = Run(run_dir).stages_dir / "1-first" / "adapter" / "adapter_model.safetensors"
    assert (Run(run_dir).adapter_dir / "adapter_model.safetensors").read_bytes() == kept.read_bytes()
    page = Run(run_dir).report_file.read_text()
    assert "id='stages'" in page and "the result is the stage before it, stages/1-first" in page

    warned = run(staged_job(make_job, "seq-warn", first, second, training={"max_steps": 8},
                            sequential={"max_regression": 0.1, "on_regression": "warn"}))
    assert len(Run(warned).stages_record()["stages"]) == 3


def test_resume_restarts_at_the_unfinished_stage(make_job, ping_data):
    first, _ = ping_data
    path = staged_job(make_job, "seq-resume", first, first, sequential={"max_regression": None},
                      training={"save_every": 2})
    whole = run(path)
    reference = rows_of(whole)
    first_metrics = (Run(whole).stages_dir / "1-first" / "metrics.jsonl").stat().st_mtime_ns
    # as if killed during stage 2, after its checkpoint at step 2
    second = Run(whole).stages_dir / "2-second"
    for name in ("DONE", "summary.json"):
        (second / name).unlink()
    shutil.rmtree(Run(second).adapter_dir)
    shutil.rmtree(Run(second).checkpoints_dir / "step-0000004")
    shutil.rmtree(Run(whole).stages_dir / "3-third")
    (Run(whole).done_file).unlink()
    record = Run(whole).stages_record()
    (Run(whole).stages_file).write_text(json.dumps({"stages": record["stages"][:1]}))
    resumed = run(path, resume=True)
    assert resumed == whole
    assert (Run(whole).stages_dir / "1-first" / "metrics.jsonl").stat().st_mtime_ns == first_metrics  # not retrained
    assert [r["loss"] for r in rows_of(resumed) if r["type"] == "train"] == pytest.approx(
        [r["loss"] for r in reference if r["type"] == "train"], abs=1e-5)


def test_stage_settings_are_checked_before_anything_runs(make_job, ping_data):
    from tailor.spec import SpecError

    first, _ = ping_data
    path = make_job("seq-bad", technique="sequential",
                    stages=[{"name": "a", "training": {"learning_rate": -1}}, {"name": "a", "training": {"epoch": 2}}])
    with pytest.raises(SpecError) as err:
        load_job(path)
    assert "stages.0.training.learning_rate" in str(err.value) and "same name" in str(err.value)
    assert "stages.1.training.epoch: unknown key; did you mean 'epochs'?" in str(err.value)


# --- behavioral ---------------------------------------------------------------------------------


def test_reference_is_the_starting_model_so_the_first_margin_is_zero(tiny_model_dir, pairs_file):
    from tailor.data import read_many
    from tailor.models import load_model
    from tailor.train.adapters import AdapterConfig, apply_adapter
    from tailor.train.packing import collate
    from tailor.train.preference import PreferenceLoss, encode_pairs, pair_rows, reference_logprobs

    from conftest import build_tokenizer

    tok = build_tokenizer()
    model = apply_adapter(load_model(str(tiny_model_dir), torch.float32), AdapterConfig(kind="lora", rank=2))
    pairs, dropped = encode_pairs(tok, read_many([str(pairs_file)])[:6], 256)
    rows = pair_rows(pairs, 600, packing=True)
    assert dropped == 0 and sorted(i for r in rows for i in r) == list(range(12)) and len(rows) < 6
    for ex, value in zip(pairs, reference_logprobs(model, pairs, rows, tok.pad_token_id, 4, bf16=False)):
        ex.ref_logp = value
    loss, stats, n = PreferenceLoss(model, "dpo", 0.1)(**collate(rows, pairs, tok.pad_token_id))
    assert n.item() == 6 and stats[1].item() == pytest.approx(0.0, abs=1e-4)  # margin
    assert loss.item() / 6 == pytest.approx(0.6931, abs=1e-3)  # -log sigmoid(0)
    # packed rows give the same log-probabilities as one answer per row
    alone = reference_logprobs(model, pairs, [[i] for i in range(12)], tok.pad_token_id, 4, bf16=False)
    assert [ex.ref_logp for ex in pairs] == pytest.approx(alone, abs=1e-4)


@pytest.mark.parametrize("loss,beta", [("dpo", 0.1), ("ipo", 0.1), ("orpo", 1.0)])
def test_preference_training_raises_the_chosen_over_rejected_margin(make_job, pairs_file, loss, beta):
    # (ORPO's margin is beta x the difference of mean log-probabilities, next to a language-model loss
    # that moves both answers: it needs the larger weight to show within 12 steps)
    path = make_job(f"pref-{loss}", technique="behavioral",
                    data={"train": [str(pairs_file)], "validation_fraction": 0.2},
                    behavioral={"demonstration_epochs": 0}, preference={"loss": loss, "beta": beta},
                    training={"max_steps": 12, "eval_every": 2, "learning_rate": 1e-2},
                    sequential={"max_regression": None})
    run_dir = run(path)
    evals = [r for r in rows_of(run_dir) if r["type"] == "eval"]
    assert evals[-1]["val_reward_margin"] > evals[0]["val_reward_margin"]
    assert evals[-1]["val_preference_accuracy"] >= 0.75
    if loss != "orpo":
        stage = Path(Run(run_dir).stages_record()["stages"][-1]["folder"])
        assert Run(stage).reference_file.exists()
        assert_declared(run_dir)
    assert "preference-rewards" in Run(run_dir).report_file.read_text()


def test_behavioral_demonstrates_then_prefers_and_the_preference_stage_continues_it(make_job, pairs_file):
    path = make_job("behave", technique="behavioral", data={"train": [str(pairs_file)], "validation_fraction": 0.2},
                    training={"max_steps": 4}, sequential={"max_regression": None})
    run_dir = run(path)
    stages = Run(run_dir).stages_record()["stages"]
    assert [s["name"] for s in stages] == ["demonstrations", "preferences"]
    demo, prefs = (Path(s["folder"]) for s in stages)
    assert manifest_of(demo)["encoding"]["train_examples"] == 32  # chosen answers
    assert manifest_of(prefs)["start"]["trainable_sha256"] == \
        Run(demo).summary()["end"]["trainable_sha256"]
    job = manifest_of(prefs)
    assert job["preference"] == {"loss": "dpo", "beta": 0.1, "sft_weight": 1.0}


# --- evaluation and report of the techniques' runs ----------------------------------------------


def _prepared(tmp_path, tiny_model_dir, sources, name):
    from tailor.data.prepare import prepare

    return prepare(sources, tmp_path / name, model=str(tiny_model_dir), num_proc=1, say=lambda m: None,
                   privacy={"enabled": False}, dedup={"near": False}, card={"perplexity_sample": 0, "html": False},
                   split={"validation": 0.2, "test": 0.2}).out


def test_multitask_evaluation_scores_each_task_and_the_report_draws_them(make_job, two_tasks, tiny_model_dir, tmp_path):
    import shutil as sh
    import subprocess

    from tailor.spec import SourceSpec

    support, routing = two_tasks
    prepared = _prepared(tmp_path, tiny_model_dir, [SourceSpec(path=str(support), task="support"),
                                                    SourceSpec(path=str(routing), task="routing")], "mt-prepared")
    path = make_job("mt-eval", technique="multitask", data={"train": [str(prepared)]},
                    training={"max_steps": 4, "eval_every": 2},
                    eval={"max_examples": 20, "max_new_tokens": 6, "retention": False})
    run_dir = run(path)
    summary = Run(run_dir).eval_summary()
    assert set(summary["tasks"]) == {"support", "routing"}
    assert summary["tasks"]["routing"]["examples"] >= 1 and "rouge_l" in summary["tasks"]["support"]["tuned"]
    page = Run(run_dir).report_file.read_text()
    assert "id='tasks'" in page and "tasks-loss" in page
    browser = sh.which("chromium") or sh.which("chromium-browser") or sh.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium on this machine")
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", Run(run_dir).report_file.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    # the per-task charts are drawn: one line per task in each
    assert dom.count('class="main-svg"') >= 2 * 6 and dom.count("trace scatter") >= 6


def test_a_staged_behavioral_run_is_evaluated_on_its_pairs_and_tailor_eval_repeats_it(make_job, pairs_file,
                                                                                     tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from tailor.cli import app

    prepared = _prepared(tmp_path, tiny_model_dir, [str(pairs_file)], "pairs-prepared")
    path = make_job("beh-eval", technique="behavioral", data={"train": [str(prepared)]},
                    training={"max_steps": 3}, sequential={"max_regression": None},
                    eval={"max_examples": 6, "max_new_tokens": 12, "retention": False,
                          "gate": {"metric": "preferred_style", "min_gain": None}})
    run_dir = run(path)
    summary = Run(run_dir).eval_summary()
    assert summary["data"]["examples"] == 6
    assert 0 <= summary["base"]["preferred_style"] <= 1 and 0 <= summary["tuned"]["preferred_style"] <= 1
    first = Run(run_dir).eval_summary_file.read_text()
    result = CliRunner().invoke(app, ["eval", str(run_dir)])
    assert result.exit_code == 0, result.output
    again = Run(run_dir).eval_summary()
    assert again["tuned"] == json.loads(first)["tuned"]  # the same model, prompts and greedy decoding
