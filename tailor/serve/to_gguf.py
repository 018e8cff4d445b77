"""`tailor export RUN --format gguf [--quant f16|bf16|q8_0|q4_0]`: one GGUF file for llama.cpp,
Ollama and LM Studio, with the parity check `tailor export` gives a merged folder.

`write_gguf` turns a merged transformers folder (what `export_run` writes: config.json, safetensors,
tokenizer files) into one GGUF file with the `gguf` package's writer and tensor-name map, never
llama.cpp's convert script, which is not a package and cannot be fetched here. It writes what
llama.cpp's converter writes for these architectures, with the same key names, so that llama.cpp,
Ollama and transformers (`from_pretrained(folder, gguf_file=...)`) all read it:

  weights    renamed with gguf.get_tensor_name_map; 1-D tensors (norms, biases) in F32 as llama.cpp
             wants them; Llama/Mistral Q and K rows permuted (see `_permute`)
  config     the llama.cpp hyperparameter keys transformers maps back (context, width, heads, ...)
  tokenizer  byte-level BPE ("gpt2"): every token, its type (control / user-defined / normal), the
             merges, the pre-tokenizer name, bos/eos/pad/unk ids, add_bos, the chat template

`export_gguf` merges a run as `tailor export` does (float32), writes RUN/gguf/MODEL-QUANT.gguf and
an Ollama Modelfile beside it (tailor/serve/modelfile.py). `gguf_parity` then loads the file back
with transformers (which reads GGUF) and checks three things: every weight equals the run's merged
weight rounded exactly as the file type rounds it (the file holds what was meant: names, Q/K order,
blocks); the greedy answers to the parity prompts, against the run's own; and the perplexity on the
retention probe's general text, against the run's (what q8_0 and q4_0 cost).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np

from tailor.errors import TailorError
from tailor.files import write_atomic
from tailor.runs import Run


class GGUFExportError(TailorError, ValueError):
    pass


# architectures (config.json "architectures") -> gguf.MODEL_ARCH member name. Mistral is llama in
# llama.cpp: same graph, same names, same Q/K permute.
ARCHS = {"LlamaForCausalLM": "LLAMA", "MistralForCausalLM": "LLAMA", "Qwen2ForCausalLM": "QWEN2",
         "Qwen3ForCausalLM": "QWEN3"}
QUANTS = ("f16", "bf16", "q8_0", "q4_0")


def write_gguf(model_dir: Path, out_file: Path, quant: str = "f16") -> Path:
    """Write the model folder as one GGUF file (written beside, then renamed: never half a file)."""
    import gguf
    from safetensors import safe_open
    from transformers import AutoTokenizer

    model_dir, out_file = Path(model_dir), Path(out_file)
    if quant not in QUANTS:
        raise GGUFExportError(f"--quant {quant}: use one of {', '.join(QUANTS)}")
    config, architecture = _supported(model_dir)
    arch = gguf.MODEL_ARCH[ARCHS[architecture]]
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        # llama3 / yarn / linear scaling need extra keys (llama3 a rope_freqs tensor) that
        # transformers' GGUF loader does not read back, so a round trip would change the model.
        raise GGUFExportError(f"{model_dir}: rope scaling {rope.get('rope_type') or rope.get('type')!r} is not "
                              "written to GGUF yet (only the default rope)")
    n_layers, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))

    tmp = out_file.with_name(out_file.name + f".tmp-{os.getpid()}")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
    try:
        writer.add_type("model")
        writer.add_name(config.get("_name_or_path") or model_dir.name)
        writer.add_context_length(config.get("max_position_embeddings", 2048))
        writer.add_embedding_length(config["hidden_size"])
        writer.add_block_count(n_layers)
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
        writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(head_dim)  # transformers reads it as Llama's head_dim
        if head_dim != config["hidden_size"] // n_head:  # Qwen3: llama.cpp reads these instead
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(writer, model_dir, tokenizer, config["vocab_size"])

        # Two passes so that only one tensor is in memory at a time: the header lists every
        # tensor's name, shape, type and size before the first byte of data.
        names = gguf.get_tensor_name_map(arch, n_layers)
        plan = []  # (gguf name, file, hf name, type)
        for file in sorted(model_dir.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for hf_name in f.keys():
                    if hf_name.endswith("rotary_emb.inv_freq") or (
                            hf_name == "lm_head.weight" and config.get("tie_word_embeddings")):
                        continue  # recomputed / the embedding itself
                    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                    if name is None:
                        raise GGUFExportError(f"{file.name}: {hf_name} has no GGUF name for {architecture}")
                    shape = tuple(f.get_slice(hf_name).get_shape())
                    qtype = _tensor_type(name, shape, quant)
                    writer.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(shape, qtype), raw_dtype=qtype)
                    plan.append((name, file, hf_name, qtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, file, hf_name, qtype in plan:
            with safe_open(str(file), framework="pt") as f:
                data = f.get_tensor(hf_name).float().numpy()
            if arch == gguf.MODEL_ARCH.LLAMA and name.split(".")[-2] in ("attn_q", "attn_k"):
                data = _permute(data, n_head if name.split(".")[-2] == "attn_q" else n_kv)
            writer.write_tensor_data(gguf.quants.quantize(data, qtype))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        writer.close()
    os.replace(tmp, out_file)
    return out_file


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's llama graph applies rope to interleaved pairs (0,1), (2,3)... of each head;
    transformers' Llama rotates the two halves (i, i + head_dim/2). llama.cpp's converter reorders
    the rows of Q and K (weight and bias) to match: within each head, row i of the first half and
    row i of the second half become neighbours. transformers' GGUF loader (LlamaTensorProcessor.
    _reverse_permute_weights) undoes exactly this, for arch "llama" only; Qwen2/Qwen3 use the
    halves layout in llama.cpp too and are not permuted. K uses the KV head count."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _tensor_type(name: str, shape: tuple[int, ...], quant: str):
    from gguf import GGMLQuantizationType as T

    if len(shape) == 1:
        return T.F32  # norms and biases: llama.cpp keeps 1-D tensors in F32 in every file type
    wanted = {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[quant]
    if quant == "q4_0" and name in ("token_embd.weight", "output.weight"):
        # the output projection (the tied embedding, for SmolLM2) costs the most quality at 4 bits;
        # llama-quantize keeps it at Q6_K, which gguf.quants cannot write, so Q8_0.
        wanted = T.Q8_0
    if wanted in (T.Q8_0, T.Q4_0) and shape[-1] % 32:
        return T.F16  # blocks of 32 along a row; llama.cpp's converter falls back the same way
    return wanted


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * shape[-1] // block * size


def _add_tokenizer(writer, model_dir: Path, tokenizer, vocab_size: int) -> None:
    """The tokenizer as llama.cpp's converter writes a byte-level BPE vocabulary (get_vocab_base)."""
    import gguf

    # What transformers runs, not tokenizer.json: a class picked by model_type may rebuild parts
    # (Qwen2Tokenizer sets Qwen's split regex whatever tokenizer.json says).
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE" or spec["model"].get("byte_fallback") or \
            (spec.get("decoder") or {}).get("type") != "ByteLevel":
        # SentencePiece-style vocabularies (Mistral v0.x, Llama 2) are tokenizer model "llama" with
        # scores and byte tokens (gguf.vocab.LlamaHfVocab reads them): not written yet.
        raise GGUFExportError(f"{model_dir}: its tokenizer is not byte-level BPE ({spec['model']['type']}); only "
                              "byte-level BPE tokenizers (SmolLM2, Qwen, Llama 3) are written to GGUF yet; "
                              "tailor export without --format gguf writes a merged folder for any tokenizer")
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    # The embedding may have more rows than the tokenizer has tokens (Qwen pads to a multiple of
    # 128): llama.cpp wants one token per row, so the gaps are unused placeholders.
    for i in range(max(vocab_size, len(vocab))):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            # control tokens (<|im_start|>) must stay whole in a prompt: transformers' GGUF reader
            # adds type 3 as special tokens, type 4 as plain added tokens, like llama.cpp does
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(spec, model_dir))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # merges, bos/eos/unk/pad ids (tokenizer_config.json, then config.json) and the chat template
    # (tokenizer_config.json or chat_template.jinja), read by the gguf package itself
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)
    # The ChatML end of turn when it is not eos (a base model fine-tuned on chat): llama.cpp and
    # Ollama stop on eot as well.
    end_ids = _generation_eos(model_dir)
    eot = next((i for i in end_ids if i != special.special_token_ids.get("eos")), None)
    if eot is not None:
        writer.add_eot_token_id(eot)
    probe = tokenizer("a")["input_ids"]
    if "bos" not in special.add_special_token:  # llama.cpp's default for BPE differs by version
        writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    writer.add_add_space_prefix(False)


def _generation_eos(model_dir: Path) -> list[int]:
    path = model_dir / "generation_config.json"
    ids = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id") if path.exists() else None
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


def _pre_tokenizer(spec: dict, model_dir: Path) -> str:
    """llama.cpp's name for how text is split before BPE (`tokenizer.ggml.pre`). llama.cpp's
    converter finds it by hashing a tokenization; here it is read off the tokenizer. Split regexes
    are matched against transformers' own table, so transformers splits a reloaded file the same."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # GPT-2's regex; also SmolLM2 as Tailor's embedded copy has it (see notes)
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"  # the hub's SmolLM/StarCoder tokenizers: single digits, then GPT-2's regex
    if kinds[:1] == ["Split"]:
        regex = (steps[0].get("pattern") or {}).get("Regex")
        for name in ("qwen2", "llama-bpe", "tekken", "gpt-4o", *GGUF_PRE_TOKENIZER_SPLITS):
            if GGUF_PRE_TOKENIZER_SPLITS.get(name) == regex:
                return name
    raise GGUFExportError(f"{model_dir}: the tokenizer splits text in a way not mapped to a llama.cpp pre-tokenizer "
                          f"({', '.join(map(str, kinds))})")


def export_gguf(run_dir: str | Path, quant: str = "f16", out: str | Path | None = None, say=print) -> Path:
    """The run merged (float32, as `tailor export` merges it), written as OUT/MODEL-QUANT.gguf with
    an Ollama Modelfile beside it (OUT: RUN/gguf by default). Returns the GGUF file."""
    import tempfile

    from transformers import AutoTokenizer

    from tailor.serve.export import export_run
    from tailor.serve.modelfile import ollama_modelfile

    if quant not in QUANTS:
        raise GGUFExportError(f"--quant {quant}: use one of {', '.join(QUANTS)}")
    run = Run(Path(run_dir).resolve())
    out = Path(out) if out else run.gguf_dir
    gguf_file = out / f"{run.name}-{quant}.gguf"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tailor-gguf-") as tmp:
        merged = export_run(run, Path(tmp) / "merged", dtype="float32", say=lambda *_: None)
        _supported(merged)  # before the minutes of writing: an architecture we cannot write says so at once
        tokenizer = AutoTokenizer.from_pretrained(str(merged))
        end_ids = json.loads((merged / "tailor_export.json").read_text(encoding="utf-8"))["eos_token_id"]
        modelfile = ollama_modelfile(tokenizer.chat_template or "", tokenizer.convert_ids_to_tokens(end_ids),
                                     gguf_file=gguf_file.name, template_name=f"the chat template of {run.path}")
        write_gguf(merged, gguf_file, quant)
    write_atomic(out / "Modelfile", modelfile)
    say(f"exported {run.id} → {gguf_file} ({quant}, {gguf_file.stat().st_size / 2 ** 20:,.1f} MB, "
        f"{time.perf_counter() - started:.0f} s) and {out / 'Modelfile'} (ollama create NAME -f {out / 'Modelfile'})")
    return gguf_file


def gguf_parity(run_dir: str | Path, gguf_file: str | Path, prompts: list[list[dict]] | None = None,
                max_new_tokens: int = 48) -> dict:
    """The GGUF read back by transformers against the run: its weights against the run's merged
    weights rounded as the file type rounds them, its greedy answers against the run's (base +
    adapter, float32) on the parity prompts, its perplexity on the probe's general text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tailor.evaluate.probe import general_text
    from tailor.serve.export import _generate, _merged, answer_end_ids, run_prompts, same_until, token_agreement
    from tailor.train.loss import text_loss

    run, gguf_file = Run(Path(run_dir).resolve()), Path(gguf_file)
    prompts = prompts or run_prompts(run)
    quant = gguf_file.stem.rsplit("-", 1)[-1]
    folder, name = str(gguf_file.parent), gguf_file.name
    quiet = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # transformers' GGUF reader draws its own progress bar
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
        loaded_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    finally:
        if quiet is None:
            os.environ.pop("TQDM_DISABLE")
        else:
            os.environ["TQDM_DISABLE"] = quiet
    model, tokenizer = _merged(run)  # the run's weights, base + adapter, float32
    weights = _weights_check(model, loaded, quant)
    end_ids = answer_end_ids(model, tokenizer)

    results = []
    for messages in prompts:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
        file_ids = loaded_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                        return_dict=True)["input_ids"]
        ran = _generate(model, ids, end_ids, tokenizer.pad_token_id, max_new_tokens)
        got = _generate(loaded, list(file_ids), end_ids, tokenizer.pad_token_id, max_new_tokens)
        same_prompt = list(file_ids) == list(ids)
        results.append({"prompt": messages[-1]["content"], "same_prompt": same_prompt,
                        "agree": got == ran and same_prompt,
                        "token_agreement": token_agreement(got, ran), "same_until": same_until(got, ran),
                        "run_answer": tokenizer.decode(ran, skip_special_tokens=True),
                        "gguf_answer": tokenizer.decode(got, skip_special_tokens=True),
                        # for a check in another runtime (bench/gguf_llamacpp.py): the prompt as the
                        # run renders it, its ids, and both answers' token ids
                        "prompt_text": tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                     tokenize=False),
                        "messages": messages, "prompt_ids": list(ids), "run_tokens": ran, "gguf_tokens": got})
    text = general_text()
    perplexity = {name: math.exp(text_loss(m, tokenizer, text, 512, bf16=False).mean)
                  for name, m in (("run", model), ("gguf", loaded))}
    return {"file": str(gguf_file), "quant": quant, "bytes": gguf_file.stat().st_size, "prompts": len(results),
            "agree": sum(r["agree"] for r in results), "max_new_tokens": max_new_tokens,
            "token_agreement": sum(r["token_agreement"] for r in results) / len(results),
            "same_prompts": sum(r["same_prompt"] for r in results), "weights": weights,
            "perplexity": {**perplexity, "change": perplexity["gguf"] / perplexity["run"] - 1},
            "results": results}


def gguf_parity_lines(result: dict) -> list[str]:
    w, p = result["weights"], result["perplexity"]
    lines = [f"weights: {w['tensors']} tensors read back by transformers; each equals the run's merged weight rounded "
             f"to its type in the file ({', '.join(f'{k} {v}' for k, v in w['types'].items())}): "
             + ("yes" if w["exact"] else f"NO, {w['worst']} differs by {w['max_diff']:.3g}"),
             f"answers: {result['agree']}/{result['prompts']} prompts give the run's greedy tokens "
             f"({result['token_agreement']:.0%} of tokens agree, {result['max_new_tokens']} new tokens each); the "
             f"file's tokenizer renders {result['same_prompts']}/{result['prompts']} prompts to the run's ids",
             f"perplexity on the probe's general text: run {p['run']:.3f}, gguf {p['gguf']:.3f} ({p['change']:+.2%})"]
    lines += [f"  differs from token {r['same_until']}: {r['prompt'][:60]!r}" for r in result["results"]
              if not r["agree"]]
    return lines


def _weights_check(model, loaded, quant: str) -> dict:
    """Every tensor transformers read back from the file against the run's, rounded through
    gguf.quants exactly as write_gguf rounds it: a wrong name, Q/K order or block would differ."""
    import gguf

    config = model.config
    arch = gguf.MODEL_ARCH[ARCHS[config.architectures[0]]]
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    file_state = loaded.state_dict()
    worst, max_diff, types = None, 0.0, {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings or hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        data = tensor.float().numpy()
        qtype = _tensor_type(name, data.shape, quant)
        types[qtype.name] = types.get(qtype.name, 0) + 1
        expected = gguf.quants.dequantize(gguf.quants.quantize(data, qtype), qtype).reshape(data.shape)
        diff = float(np.abs(file_state[hf_name].float().numpy() - expected).max())
        if diff > max_diff:
            worst, max_diff = hf_name, diff
    return {"tensors": sum(types.values()), "types": types, "exact": max_diff == 0.0, "max_diff": max_diff,
            "worst": worst}


def _supported(model_dir: Path) -> tuple[dict, str]:
    """(config.json, its architecture) of a model folder whose architecture the writer knows."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    architecture = (config.get("architectures") or ["?"])[0]
    if architecture not in ARCHS:
        raise GGUFExportError(f"{model_dir}: {architecture} cannot be written as GGUF yet; supported: "
                              + ", ".join(sorted(ARCHS)) + " (tailor export without --format gguf writes a "
                              "merged transformers folder for any architecture)")
    return config, architecture
