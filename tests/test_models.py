"""Base-model loading: local folders, hub ids (offline), GGUF files and the embedded default."""

import subprocess
import sys

import pytest
import torch

from tailor.models import ModelNotFound, best_dtype, hardware, resolve_model
from tailor.models.generate import answer, load_base


def test_local_folder_resolves_to_itself(tiny_model_dir):
    resolved = resolve_model(str(tiny_model_dir))
    assert resolved.kind == "local" and resolved.path == str(tiny_model_dir)


def test_folder_without_config_is_explained(tmp_path):
    with pytest.raises(ModelNotFound, match="no config.json"):
        resolve_model(str(tmp_path))


def test_hub_id_offline_and_not_cached_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFound) as exc:
        resolve_model("SomeOrg/not-cached-model")
    text = str(exc.value)
    assert "SomeOrg/not-cached-model" in text and "hf download SomeOrg/not-cached-model" in text


def test_unrecognised_source_is_explained():
    with pytest.raises(ModelNotFound, match="not an embedded model, an existing folder, a .gguf file or a hub id"):
        resolve_model("no such thing")
    with pytest.raises(ModelNotFound, match="no such embedded model"):
        resolve_model("embedded:gpt-9")


def test_dtype_choice(monkeypatch):
    assert best_dtype("float32") == torch.float32 and best_dtype("bfloat16") == torch.bfloat16
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert best_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2"}))
    assert best_dtype("auto", "cpu") == torch.float32


def test_batched_greedy_answers_equal_one_at_a_time(tiny_model_dir):
    model, tokenizer = load_base(str(tiny_model_dir), dtype="float32")
    convs = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "a much longer question here"}]]
    together = answer(model, tokenizer, convs, max_new_tokens=8)
    alone = [answer(model, tokenizer, [c], max_new_tokens=8)[0] for c in convs]
    assert together == alone


def test_cli_chat_on_a_local_model(tiny_model_dir):
    result = subprocess.run([sys.executable, "-m", "tailor", "chat", "--model", str(tiny_model_dir), "hello",
                             "--max-new-tokens", "5", "--dtype", "float32"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    result = subprocess.run([sys.executable, "-m", "tailor", "chat", "--model", "Nope/missing", "hi"],
                            capture_output=True, text=True, timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert result.returncode == 2 and "hf download Nope/missing" in result.stderr


@pytest.mark.integration
def test_embedded_gguf_converts_once_and_chats(embedded_path):
    resolved = resolve_model("embedded:smollm2-135m-instruct")
    assert resolved.path == str(embedded_path)
    assert ((embedded_path / "model.safetensors").exists()
            and (embedded_path / "SOURCE").read_text().strip().endswith(".gguf"))
    model, tokenizer = load_base("embedded:smollm2-135m-instruct")
    assert model.config.num_hidden_layers == 30 and model.dtype == best_dtype("auto")
    reply = answer(model, tokenizer, [[{"role": "user", "content": "What is the capital of France?"}]], 20)[0]
    assert "Paris" in reply


@pytest.mark.integration
def test_gguf_file_path_loads_the_same_weights(embedded_path):
    from safetensors.torch import load_file

    from tailor.models.embedded import embedded_gguf

    resolved = resolve_model(str(embedded_gguf("smollm2-135m-instruct")))
    assert resolved.kind == "gguf"
    a = load_file(f"{resolved.path}/model.safetensors")
    b = load_file(f"{embedded_path}/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in list(a)[:5])
