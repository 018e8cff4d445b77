"""The embedded SmolLM2-135M for real: a short LoRA run, and the quickstart end to end."""

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tailor.cli import app
from tailor.quickstart import JOB
from tailor.runs import Run
from tailor.spec import load_job
from tailor.techniques import task

from conftest import manifest_of, train_losses

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def calibrated(embedded_path) -> None:
    """This machine's calibration as `tailor advise --calibrate` measured it (2026-11-29), so that the
    quickstart's step 0 does not spend a minute measuring again; tests/test_advise.py runs the probes."""
    import os

    import torch

    from tailor.advise.calibrate import ENGINE, machine_key

    path = Path(os.environ["TAILOR_CACHE"]) / "calibration.json"
    if not path.exists():
        path.write_text(json.dumps({machine_key(torch.get_num_threads()): {
            "peak_tflops": 0.408, "bandwidth_gbs": 34.9, "bf16": True, "runtime_gb": 0.39, "activation_factor": 2.55,
            "utilisation": {"lora": 1.0, "full": 0.61, "freeze": 0.61}, "elementwise_ns": 21.1,
            "decode_step_s": {"1": 0.041, "16": 0.050}, "measured_at": "2026-11-29T19:59:49+00:00",
            "engine": ENGINE}}),
            encoding="utf-8")


@pytest.fixture(scope="module")
def embedded_run(embedded_path, tmp_path_factory) -> Path:
    """Four LoRA steps of the quickstart job on the embedded model."""
    job = load_job(JOB, [f"output.dir={tmp_path_factory.mktemp('embedded-run')}", "training.max_steps=4",
                         "training.log_every=1", "training.learning_rate=2e-3", "training.warmup_ratio=0",
                         "training.threads=2", "training.val_generate=0",
                         "eval.enabled=false"])  # the quickstart test evaluates
    return task.run(job, show_progress=False)


def test_lora_on_the_embedded_model_learns_and_saves_a_peft_adapter(embedded_run, embedded_path):
    run_dir = embedded_run
    losses = train_losses(run_dir)
    assert len(losses) == 4 and losses[-1] < losses[0]
    config = json.loads((Run(run_dir).adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["base_model_name_or_path"] == str(embedded_path)
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}
    manifest = manifest_of(run_dir)
    assert manifest["model"]["kind"] == "embedded" and manifest["encoding"]["truncated"] == 0


def test_the_embedded_run_served_to_concurrent_clients_and_exported_with_parity(embedded_run, tmp_path):
    import httpx
    import openai
    from transformers import AutoModelForCausalLM

    from tailor.feedback.store import FeedbackStore
    from tailor.quickstart import held_out_questions
    from tailor.serve.export import export_run, parity
    from tailor.serve.server import InThread, ServeSettings, build

    db = f"sqlite:///{tmp_path / 'feedback.db'}"
    questions = held_out_questions()
    # float32: in bf16 a row's numbers depend on the batch it shares a matrix product with, enough to
    # flip a near-tie greedy token; what this checks is the batching itself (padding, masks, joins)
    app, _, batcher = build(ServeSettings(runs=[f"support={embedded_run}"], db=db, dtype="float32"),
                            say=lambda m: None)
    with InThread(app, batcher) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=300)

        def session(i: int) -> str:
            messages = [{"role": "user", "content": questions[i % len(questions)]}]
            reply = client.chat.completions.create(model="support", messages=messages, temperature=0, max_tokens=12)
            rating = {"completion_id": reply.id, "rating": 1 + i % 5}
            assert httpx.post(live.url + "/v1/feedback", json=rating, timeout=60).json()["completion_id"] == reply.id
            return reply.choices[0].message.content

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(session, range(16)))
        # the same question gets the same greedy answer, whatever else shared its batch
        for i in range(16):
            assert answers[i] == answers[i % len(questions)]
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="support", messages=[{"role": "user", "content": questions[0]}], temperature=0, max_tokens=12,
            stream=True))
        assert streamed == answers[0]
    assert len(FeedbackStore(db).rows()) == 16

    folder = export_run(embedded_run, tmp_path / "export", dtype="float32", say=lambda m: None)
    eos = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    assert (AutoModelForCausalLM.from_pretrained(folder).config.model_type == "llama"
            and 2 in (eos if isinstance(eos, list) else [eos]))
    prompts = [[{"role": "user", "content": q}] for q in questions]
    result = parity(embedded_run, folder, prompts, max_new_tokens=24)
    assert result["agree"] == len(prompts), result


def test_quickstart_runs_every_step(embedded_path, calibrated, tmp_path):
    result = CliRunner().invoke(app, ["quickstart", "--steps", "2", "--out", str(tmp_path)], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    for heading in ("0 · Decide", "1 · Load the base model", "2 · Prepare the data", "3 · Fine-tune",
                    "4 · Base vs tuned", "5 · Evaluate", "6 · Scale", "7 · Serve it", "8 · All of it in a browser"):
        assert heading in result.output
    # The same job with a 4-bit base, read from both run folders, and the advisor's plans on GPUs.
    assert "QLoRA: the same job with the base's linear layers in 4-bit NF4" in result.output
    qlora_run = next((tmp_path / "quickstart-qlora").iterdir())
    assert Run(qlora_run).manifest().adapter.kind == "qlora" and Run(qlora_run).done
    assert "On 1 x NVIDIA L4 24 GB: " in result.output
    assert "On 4 x NVIDIA A100 80 GB (full fine-tuning): " in result.output
    assert "torchrun --nproc_per_node 4 -m tailor train job.yaml" in result.output
    # The advisor's verdict on the shipped example, its files, and its estimate held against the run.
    assert "Fine-tune: custom responses" in result.output and "model 1: " in result.output
    advice = json.loads((tmp_path / "advice" / "advice.json").read_text())
    assert advice["decision"] == "fine-tune" and advice["technique"]["name"] == "task"
    assert (tmp_path / "advice" / "job.yaml").exists() and "Steps 2-5 took" in result.output
    assert "records: 132 read = 121 kept + 2 rejected + 9 duplicates (6 exact, 3 near) + 0 filtered" in result.output
    prepared = tmp_path / "prepared"
    for planted in ("maria.keller@gmail.com", "4111 1111 1111 1111", "DE89 3704", "Priya", "(415) 555-2671"):
        for f in [*prepared.rglob("*.arrow"), *prepared.glob("*.json*"), prepared / "card.md"]:
            assert planted not in f.read_text(encoding="utf-8", errors="replace"), (planted, f)
    run_dir = next((tmp_path / "quickstart").iterdir())
    # Forgetting protection is on: the base model's own answers to general prompts near the shop's.
    assert Run(run_dir).manifest().replay == {"examples": 24, "share": 0.2}
    assert "forgetting protection: 24 of the base model's own answers" in result.output
    comparison = Run(run_dir).quickstart_file.read_text()
    assert comparison.count("**Base:**") == 3 and comparison.count("**Tuned:**") == 3
    summary = Run(run_dir).eval_summary()
    assert summary["data"]["examples"] == 12  # the prepared test split
    assert summary["retention"]["questions"] == 120
    assert ("gate: PASSED" if summary["gate"]["passed"] else "gate: FAILED") in result.output
    assert "ROUGE-L" in result.output and "general questions" in result.output
    assert ('"rating": "up"} → feedback #1 stored' in result.output
            and "curl http://127.0.0.1:8000/v1/chat" in result.output)
    assert "seed 2**70 → 400 seed:" in result.output
    assert "8 · All of it in a browser" in result.output and "The studio answered on http://127.0.0.1:" in result.output
    assert "tailor studio --workspace" in result.output
    # The run as GGUF with its Modelfile, beside the run's other results.
    assert "Elsewhere: " in result.output and (Run(run_dir).gguf_dir / "quickstart-q8_0.gguf").stat().st_size > 1e8
    assert (Run(run_dir).gguf_dir / "Modelfile").read_text().startswith("FROM ./quickstart-q8_0.gguf")


def test_quickstart_sequential_runs_three_gated_stages(embedded_path, calibrated, tmp_path):
    # the staged path end to end on the real model: each stage's data prepared once, three stages
    # that continue each other, the gate after each, the evaluation of the stage kept
    result = CliRunner().invoke(app, ["quickstart", "--technique", "sequential", "--steps", "2",
                                      "--out", str(tmp_path)],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "after stage routing: validation loss handbook" in result.output
    # step 6 does not train the three stages again in 4-bit
    assert "trains every stage of a sequential job with the base in 4-bit" in result.output
    assert not (tmp_path / "quickstart-sequential-qlora").exists()
    assert {p.name for p in tmp_path.iterdir()} >= {"prepared-support", "prepared-routing", "quickstart-sequential"}
    run_dir = next((tmp_path / "quickstart-sequential").iterdir())
    record = Run(run_dir).stages_record()
    assert [s["name"] for s in record["stages"]] == ["handbook", "support", "routing"]
    folders = [Path(s["folder"]) for s in record["stages"]]
    for before, after in zip(folders, folders[1:]):
        assert manifest_of(after)["start"]["trainable_sha256"] == \
            Run(before).summary()["end"]["trainable_sha256"]
    summary = Run(run_dir).eval_summary()
    assert summary["data"]["examples"] >= 10 and "rouge_l" in summary["tuned"]
