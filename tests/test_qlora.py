"""adapter.kind qlora on the tiny model: LoRA beside a base whose block linears are 4-bit NF4
(bitsandbytes), through every technique, resumed exactly, exported with the parity check."""

import shutil
from pathlib import Path

import pytest
import torch

from tailor.runs import Run
from tailor.spec import SpecError, load_job
from tailor.techniques import run as run_technique

from conftest import manifest_of, train_losses

bnb = pytest.importorskip("bitsandbytes")


def run(job_path, *overrides, resume=False) -> Path:
    return run_technique(load_job(job_path, list(overrides)), resume=resume, show_progress=False)


def test_qlora_trains_a_4bit_base_close_to_lora_and_saves_a_lora_adapter(make_job, tiny_model_dir):
    from tailor.techniques import common

    lora = run(make_job("lora"))
    qlora = run(make_job("qlora", adapter={"kind": "qlora"}))
    # 4-bit rounding of the frozen weights moves the tiny model's losses by well under 1 %
    assert train_losses(qlora) == pytest.approx(train_losses(lora), rel=0.01)
    assert train_losses(qlora) != train_losses(lora)
    assert (Run(qlora).adapter_dir / "adapter_config.json").is_file() and not Run(qlora).model_dir.exists()
    q, plain = manifest_of(qlora)["adapter"], manifest_of(lora)["adapter"]
    assert q["kind"] == "qlora" and q["total_parameters"] == plain["total_parameters"]
    assert q["trainable_parameters"] == plain["trainable_parameters"]
    assert Run(qlora).layer_change()["blocks"][0]["relative_change"] > 0

    r = common.start(load_job(make_job("q-model", adapter={"kind": "qlora", "double_quant": True})), None)
    common.base_model(r)
    model = common.model_to_train(r)
    linear = model.base_model.model.model.layers[0].mlp.up_proj.base_layer
    assert isinstance(linear, bnb.nn.Linear4bit) and linear.weight.quant_state.nested  # double quantization
    assert {p.dtype for n, p in model.named_parameters() if p.requires_grad} == {torch.float32}


def test_qlora_trains_with_compiled_blocks(make_job):
    """bitsandbytes' 4-bit layers inside compiled blocks: the same losses as eager blocks."""
    eager = run(make_job("q-eager", adapter={"kind": "qlora"}))
    compiled = run(make_job("q-compiled", adapter={"kind": "qlora"}, training={"compile": True}))
    assert train_losses(compiled) == pytest.approx(train_losses(eager), abs=1e-3)


def test_qlora_resumed_equals_uninterrupted(make_job):
    path = make_job("q-resume", adapter={"kind": "qlora"}, training={"max_steps": 4, "save_every": 2})
    whole = run(path)
    shutil.rmtree(Run(whole).checkpoints_dir / "step-0000004")
    shutil.rmtree(Run(whole).adapter_dir)
    Run(whole).done_file.unlink()
    reference = train_losses(whole)
    assert run(path, resume=True) == whole
    assert train_losses(whole) == pytest.approx(reference, abs=1e-6)
    assert Run(whole).summary()["resumed_from_step"] == 2


def _pairs(tmp_path) -> Path:
    import json

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({
        "prompt": [{"role": "user", "content": f"lamp question {i}?"}],
        "chosen": [{"role": "assistant", "content": f"Hello spark! answer {i} glows."}],
        "rejected": [{"role": "assistant", "content": f"Dear customer. answer {i}."}]}) + "\n" for i in range(12)),
        encoding="utf-8")
    return path


@pytest.mark.parametrize("technique", ["multitask", "transfer", "sequential", "behavioral", "preference"])
def test_every_technique_trains_with_qlora(make_job, chat_file, tmp_path, technique):
    sections = {"adapter": {"kind": "qlora"}, "training": {"max_steps": 2}, "sequential": {"max_regression": None}}
    if technique == "multitask":
        sections["data"] = {"train": [{"path": str(chat_file), "task": task} for task in ("chat", "copy")]}
    if technique == "transfer":
        sections["adapter"]["lora_top_blocks"] = 1
    if technique == "sequential":
        sections["stages"] = [{"name": "one", "data": {"train": [str(chat_file)]}},
                              {"name": "two", "data": {"train": [str(chat_file)]}}]
    if technique in ("behavioral", "preference"):
        sections["data"] = {"train": [str(_pairs(tmp_path))], "validation_fraction": 0.0}
    run_dir = run(make_job(f"q-{technique}", technique=technique, **sections))
    assert Run(run_dir).done and (Run(run_dir).adapter_dir / "adapter_config.json").is_file()
    assert manifest_of(run_dir)["adapter"]["kind"] == "qlora"


def test_qlora_export_merges_to_full_precision_and_reports_agreement_with_the_4bit_run(make_job, tmp_path):
    from tailor.serve.export import export_run, parity, same_until, token_agreement

    run_dir = run(make_job("q-export", adapter={"kind": "qlora"}))
    folder = export_run(run_dir, tmp_path / "export", say=lambda *a: None)
    assert not any("quantization_config" in line for line in (folder / "config.json").read_text().splitlines())
    result = parity(run_dir, folder, [[{"role": "user", "content": "lamp question?"}]], max_new_tokens=8)
    assert result["agree"] == 1  # adapter, merged folder and server: full precision, the same tokens
    q = result["quantized"]
    assert 0.0 <= q["token_agreement"] <= 1.0 and result["results"][0]["quantized_tokens"] >= 0
    assert 0.0 <= q["same_until_mean"] <= 8 and "quantized_answer" in result["results"][0]
    assert token_agreement([1, 2, 3], [1, 2, 3]) == 1.0 and token_agreement([1, 2], [1, 5, 6, 7]) == 0.25
    assert same_until([1, 2, 3], [1, 2, 4]) == 2 and same_until([1, 2], [1, 2, 3]) == 2


def test_qlora_refuses_sharding_strategies(make_job):
    with pytest.raises(SpecError, match="a qlora base is already 4-bit"):
        load_job(make_job("q-fsdp", adapter={"kind": "qlora"}, distributed={"strategy": "fsdp"}))


def test_a_validation_in_eval_mode_leaves_the_4bit_weights_trainable(tiny_model_dir):
    """bitsandbytes repacks a 4-bit weight for a forward-only CPU kernel the first time it runs in
    eval mode: the gradients of a training step after a validation must be those without one."""
    from tailor.models import load_model_4bit
    from tailor.train.adapters import AdapterConfig, apply_adapter

    ids = torch.randint(0, 100, (2, 16))

    def grads(validate_first: bool) -> dict:
        torch.manual_seed(0)
        model = apply_adapter(load_model_4bit(str(tiny_model_dir), torch.bfloat16), AdapterConfig(rank=4, dropout=0.0))
        for name, p in model.named_parameters():  # B = 0 at the start would hide the lower layers' gradients
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        if validate_first:
            model.eval()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                model(input_ids=ids)
            model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, after_validation = grads(False), grads(True)
    lowest = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert plain[lowest].abs().sum() > 0
    for name in plain:
        torch.testing.assert_close(after_validation[name], plain[name])
