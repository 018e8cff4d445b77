"""Data parallel training with torchrun: 2 CPU processes (gloo) match 1 process with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tailor.runs import Run
from tailor.spec import load_job
from tailor.techniques import run as run_technique
from tailor.techniques import task

from conftest import train_losses


def tailor_train(path: Path, out: Path, batch_size: int, *args: str) -> list[str]:
    return ["-m", "tailor", "train", str(path), "--set", f"training.batch_size={batch_size}", "--set",
            f"output.dir={out}", "--no-progress", *args]


def train_on_two_processes(path: Path, out: Path, batch_size: int, *args: str) -> tuple[subprocess.CompletedProcess,
                                                                                       Path]:
    """`tailor train` under torchrun with 2 CPU processes; (the process, its only run folder)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2",
                             *tailor_train(path, out, batch_size, *args)], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, only_run(out)


def val_losses(run_dir: Path) -> list[float]:
    return [r["val_loss"] for r in Run(run_dir).metrics() if r.get("type") == "eval"]


def only_run(out: Path) -> Path:
    runs = [run for job in out.iterdir() for run in job.iterdir()]
    assert len(runs) == 1 and Run(runs[0]).done
    return runs[0]


def saved_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    folder = Run(run_dir).require_result()
    return {n: t for f in sorted(folder.glob("*.safetensors")) for n, t in load_file(str(f)).items()}


def assert_same_result(run_dir: Path, single: Path) -> None:
    """The result folder holds the same files and, within float32 summation order, the same weights
    (after a few steps at the tests' learning rate of 1e-2, a few elements differ by up to 2e-5)."""
    import torch

    assert sorted(p.name for p in Run(run_dir).require_result().iterdir()) == \
        sorted(p.name for p in Run(single).require_result().iterdir())
    a, b = saved_weights(run_dir), saved_weights(single)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=1e-3)


def test_two_processes_equal_one_with_the_same_global_batch(make_job, tmp_path):
    # One epoch of 19 packed rows in global batches of 6: the last step has a single row, so the
    # second process has none and must still take part in the gradient all-reduce.
    path = make_job("ddp", training={"max_steps": None, "epochs": 1, "save_every": 2})
    single = task.run(load_job(path, ["training.batch_size=6"]), show_progress=False)
    assert len(train_losses(single)) == 4

    result, run_dir = train_on_two_processes(path, tmp_path / "ddp-runs", batch_size=3)
    assert "on 2 process(es)" in result.stderr and run_dir.parent.name == "ddp"
    assert train_losses(run_dir) == pytest.approx(train_losses(single), abs=1e-5)


def test_preference_training_on_two_processes_equals_one(make_job, tmp_path):
    # The preference loss through the same engine: a staged run (behavioral, preference stage only),
    # reference log-probabilities written by rank 0 and read by both, pairs split across ranks.
    import json

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({
        "prompt": [{"role": "user", "content": f"lamp question {i}?"}],
        "chosen": [{"role": "assistant", "content": f"Hello spark! answer {i} glows. Keep glowing!"}],
        "rejected": [{"role": "assistant", "content": f"Dear customer. answer {i}. Regards."}]}) + "\n"
        for i in range(14)), encoding="utf-8")
    path = make_job("ddp-pref", technique="behavioral", data={"train": [str(pairs)], "validation_fraction": 0.0},
                    behavioral={"demonstration_epochs": 0, "preference_learning_rate": 1e-2},
                    training={"max_steps": 3, "packing": False}, sequential={"max_regression": None})
    single = run_technique(load_job(path, ["training.batch_size=4"]), show_progress=False)

    _, run_dir = train_on_two_processes(path, tmp_path / "ddp-runs", batch_size=2)
    assert run_dir.parent.name == "ddp-pref"
    assert train_losses(run_dir) == pytest.approx(train_losses(single), abs=1e-5)


# --- FSDP2 and DeepSpeed ZeRO-3: every process holds a shard of every weight ---------------------
# Tolerance: 2 processes add their gradients in another order than one does; float32 on the tiny
# model keeps the difference below 1e-5 in the losses.

SHARDS = {"fsdp": "sharded/.metadata", "deepspeed": "deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_states.pt"}


@pytest.mark.parametrize("strategy,kind", [("fsdp", "lora"), ("fsdp", "full"), ("deepspeed", "lora"),
                                           ("deepspeed", "full")])
def test_sharded_on_two_processes_equals_one_resumes_exactly_and_saves_the_same_folder(make_job, tmp_path,
                                                                                         strategy, kind):
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")  # pip install "tailor-llm[deepspeed]" (the test extra has it)
    # Validation on 6 held-out conversations packed into fewer rows than processes x batch: the
    # second process has none to score and must still join every forward (weights are gathered).
    path = make_job(f"{strategy}-{kind}", adapter={"kind": kind}, distributed={"strategy": strategy, "zero_stage": 3},
                    data={"validation_fraction": 0.25}, training={"max_steps": 4, "save_every": 2, "grad_accum": 2,
                                                                  "eval_every": 2})
    single = run_technique(load_job(path, ["training.batch_size=4", "distributed.strategy=ddp"]), show_progress=False)
    result, run_dir = train_on_two_processes(path, tmp_path / "ranks", 2)
    assert f"on 2 process(es) ({strategy})" in result.stderr
    assert train_losses(run_dir) == pytest.approx(train_losses(single), abs=1e-5)
    assert val_losses(run_dir) == pytest.approx(val_losses(single), abs=1e-5) and len(val_losses(single)) == 2
    assert_same_result(run_dir, single)
    checkpoint = Run(run_dir).checkpoints_dir / "step-0000004"
    assert (checkpoint / SHARDS[strategy]).is_file() and not (checkpoint / "trainable.safetensors").exists()
    assert Run(run_dir).deepspeed_file.is_file() == (strategy == "deepspeed")
    if kind == "full":
        return
    # Killed after the checkpoint of step 2: resumed from the shards, the same losses and weights.
    import shutil

    reference = train_losses(run_dir)
    shutil.rmtree(checkpoint)
    shutil.rmtree(Run(run_dir).require_result())
    Run(run_dir).done_file.unlink()
    _, resumed = train_on_two_processes(path, tmp_path / "ranks", 2, "--resume")
    assert resumed == run_dir and Run(run_dir).summary()["resumed_from_step"] == 2
    assert train_losses(run_dir) == pytest.approx(reference, abs=1e-6)
    assert_same_result(run_dir, single)


def test_two_nodes_of_one_process_each_equal_two_processes(make_job, tmp_path):
    """Several machines, played on one: two torchrun launches of one process each meet through a
    c10d rendezvous on 127.0.0.1, as two nodes would on their network."""
    import socket

    path = make_job("nodes", distributed={"strategy": "fsdp"}, training={"max_steps": 3})
    single = run_technique(load_job(path, ["training.batch_size=4"]), show_progress=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "node-runs"
    node = [str(torchrun), "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "tailor-test", *tailor_train(path, out, 2)]
    nodes = [subprocess.Popen(node, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    logs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(err[-2000:] for _, err in logs)
    assert train_losses(only_run(out)) == pytest.approx(train_losses(single), abs=1e-5)


def test_the_deepspeed_config_comes_from_the_section_or_your_file_with_the_jobs_batches(tmp_path):
    import json

    pytest.importorskip("deepspeed")
    from dataclasses import replace

    from deepspeed.runtime.config import DeepSpeedConfig

    from tailor.train.distributed import Sharding, deepspeed_config
    from tailor.train.loop import TrainSettings

    settings = TrainSettings(batch_size=2, grad_accum=4, max_grad_norm=1.0)
    # world 1: DeepSpeedConfig checks train_batch_size against the processes it sees (none started here)
    written = deepspeed_config(Sharding("deepspeed", zero_stage=3, cpu_offload=True),
                               replace(settings, bf16_autocast=True), world=1)
    assert written["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    parsed = DeepSpeedConfig(written)  # DeepSpeed's own validation
    assert (parsed.zero_optimization_stage, parsed.train_batch_size, parsed.bfloat16_config.enabled) == (3, 8, True)
    assert parsed.zero_config.offload_optimizer.device == "cpu" and parsed.gradient_clipping == 1.0

    yours = tmp_path / "zero2.json"
    yours.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 5e7},
                                 "train_micro_batch_size_per_gpu": 64, "bf16": {"enabled": True}}))
    mine = deepspeed_config(Sharding("deepspeed", deepspeed_config=str(yours)), settings, world=1)
    parsed = DeepSpeedConfig(mine)
    assert parsed.zero_optimization_stage == 2 and parsed.zero_config.reduce_bucket_size == 5e7
    assert (parsed.train_micro_batch_size_per_gpu, parsed.bfloat16_config.enabled) == (2, False)  # the job's


def test_a_resume_needs_as_many_processes_as_the_start(make_job):
    import json

    from tailor.techniques.common import ResumeError

    path = make_job("procs", training={"max_steps": 2, "save_every": 1})
    run = Run(run_technique(load_job(path), show_progress=False))
    run.done_file.unlink()  # as if killed
    manifest = json.loads(run.manifest_file.read_text())
    run.manifest_file.write_text(json.dumps({**manifest, "processes": 2}))
    with pytest.raises(ResumeError, match=r"trained on 2 process\(es\) and this launch has 1; relaunch with 2"):
        run_technique(load_job(path), resume=True, show_progress=False)


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_every_technique_and_adapter_kind_trains_sharded_in_one_process(make_job, pairs_file, chat_file, strategy,
                                                                         monkeypatch):
    """With one process the sharded strategies run their whole code path (sharding, sharded
    checkpoints, gathering the result): the freeze kind (trainable and frozen blocks side by side),
    a staged technique (a new model sharded per stage) and the preference loss."""
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
        # DeepSpeed reads LOCAL_RANK while it trains, so Tailor sets it for a one-process run and
        # leaves it; set here, it is gone again after this test instead of steering later ones
        monkeypatch.setenv("LOCAL_RANK", "0")
    jobs = {"freeze": dict(adapter={"kind": "freeze", "train_top_blocks": 1}),
            "transfer": dict(technique="transfer", adapter={"kind": "lora", "lora_top_blocks": 1},
                             transfer={"domain_text": [str(chat_file)]}),
            "behavioral": dict(technique="behavioral", data={"train": [str(pairs_file)], "validation_fraction": 0.2},
                               sequential={"max_regression": None})}
    for name, sections in jobs.items():
        sections.setdefault("training", {}).update(max_steps=2, save_every=1)
        path = make_job(f"{strategy}-{name}", distributed={"strategy": strategy}, **sections)
        sharded = run_technique(load_job(path), show_progress=False)
        plain = run_technique(load_job(path, ["distributed.strategy=ddp", f"name={name}-ddp"]), show_progress=False)
        assert train_losses(sharded) == pytest.approx(train_losses(plain), abs=1e-5), name
        assert_same_result(sharded, plain)


def test_zero3_runs_when_one_process_has_more_answer_tokens_than_another(make_job, tmp_path):
    """ZeRO-3 gathers the head's weight at each call, and the head runs in chunks of answer
    tokens: a process with a 400-token answer and one with a 20-token answer must still call it
    as many times (tailor.train.loss.chunk_starts), or they wait on each other's collectives."""
    import json

    pytest.importorskip("deepspeed")
    data = tmp_path / "uneven.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"lamp {i}?"},
        {"role": "assistant", "content": ("glow " * 80 if i % 2 == 0 else "short answer") + f" {i}"}]}) + "\n"
        for i in range(2)), encoding="utf-8")  # each step: the long answer on one process, the short on the other
    # Every weight partitioned, however small (DeepSpeed keeps those under 100,000 elements whole)
    config = tmp_path / "zero3.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    path = make_job("uneven", data={"train": [str(data)]},
                    distributed={"strategy": "deepspeed", "deepspeed_config": str(config)},
                    training={"max_steps": 2, "max_seq_len": 512, "packing": False})
    single = run_technique(load_job(path, ["training.batch_size=2", "distributed.strategy=ddp",
                                           "distributed.deepspeed_config="]), show_progress=False)
    _, run_dir = train_on_two_processes(path, tmp_path / "ranks", 1)
    assert train_losses(run_dir) == pytest.approx(train_losses(single), abs=1e-5)
