"""Settings left to Tailor (`auto`) and forgetting protection (training.replay), on the tiny model."""

from __future__ import annotations

import re

import pytest
import yaml
from rich.console import Console

from tailor.runs import Run
from tailor.spec import SpecError, load_job, parse_job
from tailor.techniques import run as run_technique
from tailor.train import auto, replay

from conftest import manifest_of

AUTO_TRAINING = {"learning_rate": "auto", "epochs": "auto", "batch_size": "auto", "grad_accum": "auto",
                 "max_steps": None}


def _run(path, *overrides, resume=False):
    console = Console(record=True, width=200)
    run_dir = run_technique(load_job(path, list(overrides)), resume=resume, console=console, show_progress=False)
    return run_dir, console.export_text()


def test_auto_settings_follow_the_model_and_are_recorded(make_job, tiny_model_dir):
    path = make_job("auto", adapter={"rank": "auto", "alpha": "auto"}, training=AUTO_TRAINING)
    run_dir, said = _run(path)
    chosen = {c["key"]: c for c in manifest_of(run_dir)["auto"]}
    # The tiny model has under a million parameters: the rules for the smallest models apply.
    assert chosen["training.learning_rate"]["value"] == 5e-4
    assert chosen["adapter.rank"]["value"] == 16 and chosen["adapter.alpha"]["value"] == 32
    assert chosen["training.epochs"]["value"] == 4.0  # 24 conversations
    assert chosen["training.batch_size"]["value"] == 2  # a CPU
    assert chosen["training.grad_accum"]["value"] >= 1
    assert all(c["why"] for c in chosen.values())
    assert "auto training.learning_rate = 0.0005: LoRA on a 0M model" in said
    ran = Run(run_dir).raw_job()  # what ran, in the run's job.yaml
    assert ran["training"]["learning_rate"] == 5e-4 and ran["adapter"]["rank"] == 16
    steps = [r for r in Run(run_dir).metrics() if r["type"] == "train"]
    assert steps, "it trained"
    # The same job resumes: auto chooses the same values again, and the check accepts them.
    _, again = _run(path, resume=True)
    assert "already finished" in again


def test_auto_rules_by_model_size():
    assert auto.learning_rate(135_000_000, "lora").value == 5e-4
    assert auto.learning_rate(1_700_000_000, "lora").value == 2e-4
    assert auto.learning_rate(7_600_000_000, "lora").value == 1e-4
    assert auto.learning_rate(70_000_000_000, "lora").value == 5e-5
    assert auto.learning_rate(135_000_000, "lora", "preference").value == pytest.approx(5e-4 / 20)
    assert auto.learning_rate(135_000_000, "full").value < auto.learning_rate(135_000_000, "lora").value
    assert auto.lora_rank(135_000_000, 200).value == 16 and auto.lora_rank(7_000_000_000, 200).value == 8
    assert auto.lora_rank(7_000_000_000, 20_000).value == 16
    assert [auto.epochs(n).value for n in (100, 1_000, 10_000, 50_000)] == [4.0, 3.0, 2.0, 1.0]
    assert auto.grad_accum(rows=36, micro=2).value == 2  # 3 rows per step wanted: 2 x 2
    assert auto.grad_accum(rows=5_000, micro=2).value == 8  # at most 16 rows per step
    assert auto.grad_accum(rows=5, micro=2).value == 1


def test_auto_in_the_job_spec():
    job = parse_job({"data": {"train": ["x.jsonl"]}, "training": {"learning_rate": "auto"},
                     "adapter": {"rank": "auto"}})
    assert job.training.learning_rate == "auto" and job.adapter.rank == "auto"
    with pytest.raises(SpecError, match=r"training.learning_rate: must be a number above 0, or auto .*got 'fast'"):
        parse_job({"data": {"train": ["x.jsonl"]}, "training": {"learning_rate": "fast"}})
    with pytest.raises(SpecError, match=r"adapter.rank: must be a number above 0, or auto .*got 0"):
        parse_job({"data": {"train": ["x.jsonl"]}, "adapter": {"rank": 0}})


def test_replay_joins_the_base_models_answers(make_job, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    path = make_job("replayed", training={"replay": {"share": 0.2}})
    n = replay.how_many(24, 0.2, len(replay.builtin_prompts()))
    assert n == 6
    # The base's answers to every prompt, in the cache (the tiny random model's own are empty).
    replay.answers(replay.builtin_prompts(), str(tiny_model_dir),
                   lambda ps: [f"glow lamp {i}" for i, _ in enumerate(ps)], 96, "float32")
    run_dir, said = _run(path)
    m = manifest_of(run_dir)
    assert m["replay"] == {"examples": 6, "share": 0.2}
    assert m["encoding"]["train_examples"] == 24 + 6
    assert "answers 6 general prompt" not in said  # read from the cache
    assert "replay: 6 of the base model's answers to general prompts join 24 training conversations (20%" in said


def test_replay_generates_once_and_caches(make_job, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    path = make_job("generated", training={"replay": {"share": 0.2, "max_new_tokens": 8}})
    _, said = _run(path)
    assert "the base model answers 6 general prompt(s) once" in said
    cached = list((tmp_path / "cache" / "replay").glob("*.json"))
    assert len(cached) == 1 and len(yaml.safe_load(cached[0].read_text())) == 6
    _, again = _run(path)
    assert "answers 6 general prompt" not in again


def test_replay_off_and_on_by_technique(make_job, tiny_model_dir):
    off = make_job("not-replayed", training={"replay": {"enabled": False}})
    assert "replay" not in manifest_of(_run(off)[0])
    none = make_job("share-zero", training={"replay": {"share": 0.0}})
    assert "replay" not in manifest_of(_run(none)[0])


def test_replay_prompts_of_your_own(make_job, tiny_model_dir, tmp_path, monkeypatch):
    prompts = tmp_path / "general.txt"
    prompts.write_text("# ours\nWhat is a lamp?\nName a colour.\n", encoding="utf-8")
    path = make_job("own-prompts", training={"replay": {"share": 0.5, "prompts": [str(prompts)]}})
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    assert "the base model answers 2 general prompt(s) once" in _run(path)[1]
    missing = make_job("no-prompts", training={"replay": {"enabled": True, "prompts": [str(tmp_path / "nope.txt")]}})
    with pytest.raises(Exception, match=r"training.replay.prompts: .*nope.txt: no such file"):
        _run(missing)


def test_replay_prompts_are_not_the_probes_questions():
    """The retention probe measures what replay protects: replaying its own questions would be
    training on the test."""
    from tailor.evaluate.probe import questions

    def words(text: str) -> set[str]:
        text = re.sub(r"answer (with|in) .*$", "", text.lower())
        return set(re.findall(r"[a-z0-9']+", text)) - {"what", "is", "the", "a", "of", "in", "which", "how", "many"}

    prompts = replay.builtin_prompts()
    assert len(prompts) == len(set(prompts)) >= 120
    for q in questions():
        for p in prompts:
            a, b = words(q["question"]), words(p)
            overlap = len(a & b) / max(1, len(a | b))
            assert overlap < 0.5, f"replay prompt {p!r} is too close to probe question {q['question']!r}"


def test_the_prompts_nearest_the_task_come_first():
    prompts = ["Write a haiku about snow.", "What is the capital of Peru? Answer with one word.",
               "Explain gravity to a child.", "Which planet do we live on? Answer with one word."]
    quiz = ["What is the capital of Chile?", "Which river is the longest?"]
    assert replay.chosen(prompts, 2, seed=0, like=quiz) == [
        "What is the capital of Peru? Answer with one word.", "Which planet do we live on? Answer with one word."]
    assert sorted(replay.chosen(prompts, 4, seed=0)) == sorted(prompts)  # no task: a seeded order
    assert replay.chosen(prompts, 4, seed=1) == replay.chosen(prompts, 4, seed=1)


def test_how_many():
    assert replay.how_many(100, 0.2, 134) == 25
    assert replay.how_many(1000, 0.2, 134) == 134  # at most one per prompt
    assert replay.how_many(100, 0.0, 134) == 0
    assert replay.how_many(3, 0.2, 134) == 1


def test_replay_in_the_spec_docs():
    from tailor.spec import Job

    described = yaml.safe_dump(Job.model_json_schema())
    assert "replay" in described


def test_multitask_replays_as_a_task_of_its_own(make_job, tiny_model_dir, tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    replay.answers(replay.builtin_prompts(), str(tiny_model_dir), lambda ps: ["a lamp glows"] * len(ps), 96,
                   "float32")
    files = {}
    for task, answer in (("support", "Hello! The lamp glows."), ("routing", "orders")):
        files[task] = tmp_path / f"{task}.jsonl"
        files[task].write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{task} question {i}?"},
                                                                {"role": "assistant", "content": answer}]}) + "\n"
                                       for i in range(20)), encoding="utf-8")
    path = make_job("mt-replay", technique="multitask",
                    data={"train": [{"path": str(f), "task": t} for t, f in files.items()]},
                    training={"max_steps": 2, "replay": {"enabled": True, "share": 0.2}})
    m = manifest_of(_run(path)[0])
    assert m["replay"]["examples"] == 10 and set(m["tasks"]) == {"support", "routing", replay.TASK}
