"""The layer change report: ‖ΔW‖/‖W‖ per block, checked against a direct computation."""

import json
import math
from collections import defaultdict

import pytest
import torch
from safetensors.torch import load_file

from tailor.runs import Run
from tailor.train.adapters import block_index


def direct(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]) -> dict[int, float]:
    """Per block, from two plain state dicts: sqrt(Σ‖after - before‖²) / sqrt(Σ‖before‖²) over the
    weights that changed at all."""
    changed, size = defaultdict(float), defaultdict(float)
    for name, before in base.items():
        block = block_index(name)
        if block is None or name not in tuned or torch.equal(tuned[name].float(), before.float()):
            continue
        changed[block] += float((tuned[name].float() - before.float()).pow(2).sum())
        size[block] += float(before.float().pow(2).sum())
    return {b: math.sqrt(changed[b]) / math.sqrt(size[b]) for b in changed}


def reported(run_dir) -> dict[int, float]:
    report = Run(run_dir).layer_change()
    return {b["block"]: b["relative_change"] for b in report["blocks"]}


def test_lora_report_matches_the_merged_weights(make_job, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tailor.spec import load_job
    from tailor.techniques import task

    run_dir = task.run(load_job(make_job("lora-layers", training={"max_steps": 3})), show_progress=False)
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), Run(run_dir).adapter_dir)
    merged = merged.merge_and_unload().state_dict()
    expected, got = direct(base, merged), reported(run_dir)
    assert set(got) == {0, 1} and set(expected) == {0, 1}
    for block in expected:
        assert got[block] == pytest.approx(expected[block], rel=1e-4)
        assert got[block] > 0
    rows = [json.loads(l) for l in Run(run_dir).metrics_file.read_text().splitlines()]
    assert rows[-1]["type"] == "layer_change" and rows[-1]["block_01"] == pytest.approx(got[1])
    assert "layer-change" in Run(run_dir).report_file.read_text()


def test_freeze_report_shows_only_the_trained_blocks(make_job, tiny_model_dir):
    from tailor.spec import load_job
    from tailor.techniques import task

    job = make_job("freeze-layers", adapter={"kind": "freeze", "train_top_blocks": 1, "train_norm": True},
                   training={"max_steps": 3})
    run_dir = task.run(load_job(job), show_progress=False)
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    tuned = load_file(str(Run(run_dir).model_dir / "model.safetensors"))
    got = reported(run_dir)
    assert got == {1: pytest.approx(direct(base, tuned)[1], rel=1e-4)}  # block 0 was frozen: not in the report
    other = Run(run_dir).layer_change()["other"]
    assert set(other) == {"final_norm"} and other["final_norm"] > 0


def test_lora_in_the_top_block_changes_only_that_block(make_job):
    from tailor.spec import load_job
    from tailor.techniques import task

    job = make_job("top-lora", adapter={"lora_top_blocks": 1}, training={"max_steps": 3})
    run_dir = task.run(load_job(job), show_progress=False)
    assert set(reported(run_dir)) == {1}
