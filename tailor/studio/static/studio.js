// Tailor Studio: the little the pages do in the browser. No framework, nothing fetched from the network.
"use strict";
const CSRF = document.querySelector('meta[name="csrf"]').content;

function followTask(id, kind) {
  const log = document.getElementById("task-log"), state = document.getElementById("task-state");
  log.textContent = "";  // the stream sends every line from the start
  const source = new EventSource(`/tasks/${id}/events`);
  source.addEventListener("line", (e) => { log.textContent += JSON.parse(e.data) + "\n"; log.scrollTop = log.scrollHeight; });
  source.addEventListener("state", (e) => {
    const s = JSON.parse(e.data);
    state.textContent = s.state;
    if (s.error) { const p = document.getElementById("task-error"); p.textContent = s.error; p.hidden = false; }
    if (s.state !== "done") return;
    if (kind === "advise") { location.reload(); return; }  // the same address shows the advice once it is ready
    const next = document.getElementById("task-next");
    if (kind === "prepare" && s.result) {
      next.innerHTML = `<a class="button" id="open-card" href="/data/${encodeURIComponent(s.result)}">Open the data card</a>`;
    } else if (typeof s.result === "string" && s.result.startsWith("/")) {
      next.innerHTML = `<a class="button" id="task-result" href="${s.result}">Continue</a>`;
    } else if (s.result) {
      next.textContent = `→ ${s.result}`;
    }
    next.hidden = false;
  });
  source.addEventListener("end", () => source.close());
}

function followRun(ref, layers, estimate) {
  const steps = { loss: [], lossStep: [], val: [], valStep: [], rouge: [], chrf: [], evalStep: [] };
  const layout = (title, y) => ({ title: { text: title }, xaxis: { title: { text: "step" } }, yaxis: { title: { text: y } },
                                  margin: { t: 40, r: 10 }, height: 320 });
  const draw = () => {
    Plotly.react("chart-loss", [
      { x: steps.lossStep, y: steps.loss, name: "train loss", mode: "lines+markers" },
      { x: steps.valStep, y: steps.val, name: "validation loss", mode: "lines+markers" }], layout("Loss", "loss"));
    Plotly.react("chart-rouge", [
      { x: steps.evalStep, y: steps.rouge, name: "validation ROUGE-L", mode: "lines+markers" },
      { x: steps.evalStep, y: steps.chrf, name: "validation chrF", mode: "lines+markers" }], layout("Generated answers", "score"));
  };
  draw();
  if (layers && layers.blocks) {
    Plotly.newPlot("chart-layers", [{ type: "bar", x: layers.blocks.map((b) => b.block),
      y: layers.blocks.map((b) => b.relative_change), name: "‖ΔW‖/‖W‖" }], layout("How much each block changed", "‖ΔW‖/‖W‖"));
  }
  const started = Date.now(); let firstStep = null, wasRunning = false, pending = false;
  const source = new EventSource(`/runs/${ref}/events`);
  source.addEventListener("metric", (e) => {
    const r = JSON.parse(e.data);
    if (r.type === "train") { steps.lossStep.push(r.step); steps.loss.push(r.loss); showStep(r.step); }
    if (r.type === "eval") {
      if (r.val_loss !== undefined) { steps.valStep.push(r.step); steps.val.push(r.val_loss); }
      if (r.val_rouge_l !== undefined) { steps.evalStep.push(r.step); steps.rouge.push(r.val_rouge_l); steps.chrf.push(r.val_chrf); }
    }
    if (!pending) { pending = true; setTimeout(() => { pending = false; draw(); }, 200); }
  });
  function showStep(step) {
    document.getElementById("step").textContent = step;
    const progress = document.getElementById("progress"), total = Number(progress.max);
    progress.value = step;
    if (firstStep === null) firstStep = { step, at: Date.now() };
    const done = step - firstStep.step, seconds = (Date.now() - firstStep.at) / 1000;
    if (wasRunning && done > 0 && total > step) {
      const left = (total - step) * seconds / done;
      document.getElementById("eta").textContent = `about ${Math.ceil(left / 60)} min left`;
    }
  }
  source.addEventListener("state", (e) => {
    const s = JSON.parse(e.data);
    document.getElementById("run-state").textContent = s.done ? "done" : s.state;
    if (s.log) document.getElementById("log").textContent = s.log;
    if (s.state === "running" || s.state === "queued") wasRunning = true;
  });
  source.addEventListener("end", () => { source.close(); if (wasRunning) location.reload(); });
  void started; void estimate;
}

async function post(url, body) {
  const response = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json", "X-Studio-CSRF": CSRF },
                                      body: JSON.stringify(body) });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error((data.error && data.error.message) || response.statusText);
  return data;
}

// One streamed chat completion from the playground's API (tailor serve's), shown as it comes.
async function stream(model, question, maxTokens, out) {
  const response = await fetch("/playground/api/v1/chat/completions", {
    method: "POST", headers: { "Content-Type": "application/json", "X-Studio-CSRF": CSRF },
    body: JSON.stringify({ model, messages: [{ role: "user", content: question }], stream: true, max_tokens: maxTokens }) });
  if (!response.ok) { const e = await response.json(); throw new Error(e.error ? e.error.message : response.statusText); }
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "", id = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, cut).trim(); buffer = buffer.slice(cut + 2);
      if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
      const chunk = JSON.parse(line.slice(6));
      if (chunk.error) throw new Error(chunk.error.message);
      id = chunk.id;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) out.textContent += delta.content;
    }
  }
  return id;
}

function playground() {
  const sides = [...document.querySelectorAll(".chat section")];
  document.getElementById("ask").addEventListener("submit", async (e) => {
    e.preventDefault();
    const question = document.getElementById("question").value, maxTokens = Number(document.getElementById("max-tokens").value);
    await Promise.all(sides.map(async (side) => {
      const out = side.querySelector(".answer"), rate = side.querySelector(".rate");
      out.textContent = ""; rate.hidden = true; side.querySelector(".rated").textContent = "";
      try {
        side.dataset.completion = await stream(side.dataset.model, question, maxTokens, out);
        rate.hidden = false;
      } catch (err) { out.textContent = "error: " + err.message; }
    }));
  });
  for (const side of sides) {
    const send = async (body) => {
      try {
        const stored = await post("/playground/api/v1/feedback", { completion_id: side.dataset.completion, ...body });
        side.querySelector(".rated").textContent = `stored (feedback #${stored.id})`;
      } catch (err) { side.querySelector(".rated").textContent = "error: " + err.message; }
    };
    side.querySelector(".up").addEventListener("click", () => send({ rating: "up" }));
    side.querySelector(".down").addEventListener("click", () => send({ rating: "down" }));
    side.querySelector(".correct").addEventListener("click", () => send({ correction: side.querySelector(".correction").value }));
  }
}
