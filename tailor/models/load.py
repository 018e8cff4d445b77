"""Find a base model wherever it is (embedded, hub, folder, GGUF) and load it for training or chat."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from tailor.models.embedded import EMBEDDED, ModelNotFound, cache_root, embedded_gguf

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Used only when a base model ships no chat template: ChatML, which most instruct models use.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ResolvedModel:
    path: str  # a local folder that from_pretrained loads
    source: str  # what the user wrote
    kind: str  # embedded | gguf | local | hub
    hub_id: str | None = None


def resolve_model(source: str, revision: str | None = None) -> ResolvedModel:
    """Turn what the job names into a local folder, converting or downloading once if needed."""
    if source.startswith("embedded:"):
        name = source.split(":", 1)[1]
        gguf = embedded_gguf(name)
        return ResolvedModel(str(convert_gguf(gguf, cache_root() / name)), source, "embedded",
                             EMBEDDED[name]["hub_id"])
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFound(f"{source}: GGUF file not found; check the path")
        return ResolvedModel(str(convert_gguf(path, cache_root() / f"gguf-{_file_key(path)}")), source, "gguf")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFound(f"{source}: folder has no config.json; point model.base at a Hugging Face "
                                "model folder (config.json, *.safetensors, tokenizer files)")
        return ResolvedModel(str(path.resolve()), source, "local")
    if HUB_ID.match(source):
        return ResolvedModel(download_from_hub(source, revision), source, "hub", source)
    raise ModelNotFound(
        f"{source}: not an embedded model, an existing folder, a .gguf file or a hub id (org/name); "
        f"the default is embedded:smollm2-135m-instruct"
    )


def download_from_hub(hub_id: str, revision: str | None) -> str:
    """Through the normal Hugging Face cache: a model downloaded once (here or copied in) is reused."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            hub_id, revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"],
        )
    except Exception as exc:  # offline, not cached, gated, misspelt: all end in the same advice
        raise ModelNotFound(
            f"{hub_id}: could not get it from the Hugging Face hub and it is not in the local cache "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            f"Fix: on a machine with internet run `hf download {hub_id}` and copy ~/.cache/huggingface here, "
            f"or download the model folder and set model.base to its path."
        ) from None


def _file_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors folder (bf16) and return that folder."""
    if (out_dir / "config.json").exists():
        return out_dir
    from filelock import FileLock

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir) + ".lock"):  # several training processes may start at once
        if (out_dir / "config.json").exists():
            return out_dir
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16,
            quantization_config=GgufConfig(gguf_file=str(gguf), dequantize=True),
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # A model loaded from GGUF is marked quantized and refuses save_pretrained; once
        # dequantized it is a plain model, so drop the marks.
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{gguf}\n", encoding="utf-8")
        os.replace(tmp, out_dir)
    return out_dir


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHATML
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, dtype: torch.dtype, device: str | torch.device = "cpu", trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation="sdpa", trust_remote_code=trust_remote_code
    )
    return model.to(device)


def load_model_4bit(path: str, dtype: torch.dtype, device: str | torch.device = "cpu", trust_remote_code: bool = False,
                    double_quant: bool = False, training: bool = True):
    """The model with every linear layer of its blocks in 4-bit NF4 (bitsandbytes' Linear4bit), the
    rest (embeddings, norms, the head) in `dtype`; the 4-bit matmuls compute in `dtype`.

    bitsandbytes and not torchao's NF4: on this machine's Zen 4 CPU bitsandbytes' Linear4bit ran a
    forward and backward 1.2x faster (bench/qlora_backends.py), and transformers and PEFT take it
    as it is (BitsAndBytesConfig, LoRA on Linear4bit), where torchao's NF4 needs its own LoRA layer."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                bnb_4bit_use_double_quant=double_quant)
    device = torch.device(device)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation="sdpa", trust_remote_code=trust_remote_code,
        quantization_config=config, device_map={"": device.index if device.type == "cuda" else device.type},
    )
    if training:
        # On an AVX512-BF16 CPU, the first forward in eval mode (a validation) repacks each 4-bit
        # weight in place for a kernel that has no backward; the training steps after it would then
        # get no gradient through the frozen layers, silently. Keep the layout that trains.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return model


class _NoHubKernel(logging.Filter):
    """bitsandbytes, when imported (transformers and DeepSpeed import it too), tries to fetch a
    faster CPU kernel from the Hugging Face hub and warns when it cannot (always, offline); it then
    uses its own, which is what runs here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoHubKernel())
# DeepSpeed (when installed, transformers imports it) warns on every start that it found no GPU;
# where there is none, telling it so up front is the same choice without the warning.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
