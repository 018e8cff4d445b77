"""A Tailor GGUF in llama.cpp itself: the same prompts as `tailor export --format gguf`'s parity
check, rendered by the file's own chat template in llama.cpp, and greedy tokens against the run's.

llama.cpp's Python binding on PyPI with a prebuilt CPU wheel is `xllamacpp` (llama-cpp-python has
only a source package: it compiles llama.cpp at install). It is not a dependency of Tailor; give
it a venv of its own:

    python -m venv /tmp/xl && /tmp/xl/bin/pip install xllamacpp
    tailor export RUN --format gguf --quant q8_0            # writes RUN/gguf/NAME-q8_0.gguf and gguf-parity-q8_0.json
    /tmp/xl/bin/python bench/gguf_llamacpp.py RUN/gguf      # every NAME-QUANT.gguf with its parity file

Prints per file: the chat template rendered as the run renders it, the prompt ids, and how many
greedy tokens llama.cpp gives that are the run's (and the transformers read-back's).
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path


def post(server, path: str, body: dict) -> dict:
    request = urllib.request.Request(server.listening_address + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


def agreement(a: list[int], b: list[int]) -> float:
    longest = max(len(a), len(b))
    return sum(x == y for x, y in zip(a, b)) / longest if longest else 1.0


def check(gguf_file: Path, parity: dict) -> None:
    import xllamacpp as xlc

    params = xlc.CommonParams()
    params.model.path = str(gguf_file)
    params.n_ctx = 1024
    params.n_parallel = 1
    params.warmup = False
    server = xlc.Server(params)
    rendered = same_ids = same = 0
    shares, shares_tf = [], []
    for r in parity["results"]:
        rendered += post(server, "/apply-template", {"messages": r["messages"]})["prompt"] == r["prompt_text"]
        ids = post(server, "/tokenize", {"content": r["prompt_text"], "add_special": True, "parse_special": True})
        same_ids += ids["tokens"] == r["prompt_ids"]
        n = max(len(r["run_tokens"]), 1)
        out = post(server, "/completion", {"prompt": r["prompt_ids"], "n_predict": n, "temperature": 0,
                                           "samplers": ["top_k"], "top_k": 1, "return_tokens": True})["tokens"]
        same += out == r["run_tokens"]
        shares.append(agreement(out, r["run_tokens"]))
        shares_tf.append(agreement(out, r["gguf_tokens"]))
    n = len(parity["results"])
    print(f"{gguf_file.name}: llama.cpp renders {rendered}/{n} prompts as the run does, tokenizes {same_ids}/{n} "
          f"to the run's ids; greedy answers: {same}/{n} the run's exactly, {sum(shares) / n:.0%} of tokens agree "
          f"with the run, {sum(shares_tf) / n:.0%} with transformers reading the same file")
    del server


def main(folder: Path) -> None:
    for gguf_file in sorted(folder.glob("*.gguf")):
        quant = gguf_file.stem.rsplit("-", 1)[-1]
        parity_file = folder / f"gguf-parity-{quant}.json"
        if parity_file.exists():
            check(gguf_file, json.loads(parity_file.read_text(encoding="utf-8")))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
