"""tailor eval: metrics against hand-computed values, the gate's verdicts and exit codes, and a
whole evaluation of a tiny run."""

import json
import math
import os

import pytest
import torch

from tailor.evaluate.gate import verdict
from tailor.evaluate.metrics import (
    bleu,
    chrf,
    contains_answer,
    exact_match,
    is_label_set,
    label_scores,
    normalize,
    rouge_l,
    text_scores,
)
from tailor.runs import Run
from tailor.spec import GateSpec

from conftest import assert_declared

# --- metrics -------------------------------------------------------------------------------------


def test_normalize_and_exact_match():
    assert normalize("  The answer:\tParis! ") == "the answer paris"
    assert normalize("Ｐａｒｉｓ") == "paris"  # NFKC folds full-width letters
    assert exact_match(["Paris.", "london", "Rome"], ["paris", "Berlin", "rome!"]) == pytest.approx(2 / 3)
    assert exact_match([], []) == 0.0


def test_rouge_l_by_hand():
    # LCS of "the cat sat on the mat" and "the cat is on the mat" is "the cat on the mat": 5 of 6 words
    assert rouge_l(["the cat sat on the mat"], ["the cat is on the mat"]) == [pytest.approx(5 / 6)]
    # P = 2/2, R = 2/4 -> F = 2PR/(P+R) = 2/3
    assert rouge_l(["cat mat"], ["the cat the mat"]) == [pytest.approx(2 / 3)]
    assert rouge_l(["nothing shared"], ["entirely different"]) == [0.0]
    # words of any script count (rouge-score's default tokenizer would score this 0)
    assert rouge_l(["Καλημέρα κόσμε"], ["καλημέρα κόσμε"]) == [pytest.approx(1.0)]


def test_bleu_by_hand():
    # clipped n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths, so no brevity penalty
    expected = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(expected, abs=1e-4)
    assert bleu(["a b c d e"], ["a b c d e"]) == pytest.approx(1.0)
    assert bleu(["refund", "shipping"], ["refund", "shipping"]) == pytest.approx(1.0)  # labels: no 4-grams at all


def test_chrf_bounds_and_order():
    assert chrf(["the same words"], ["the same words"]) == pytest.approx(1.0)
    assert chrf(["xyz"], ["the reference"]) < chrf(["the referense"], ["the reference"]) < 1.0


def test_label_metrics_by_hand():
    # a: TP 1, predicted 1, actual 2 -> P 1, R 1/2, F1 2/3; b: TP 1, predicted 2, actual 2 -> F1 1/2
    scores = label_scores(["A", "b", "B.", "refund"], ["a", "a", "b", "b"])
    assert scores["label_accuracy"] == pytest.approx(0.5)
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_label_metrics_only_for_label_answers():
    labels = ["refund", "shipping", "refund", "warranty", "shipping", "warranty"]
    assert is_label_set(labels)
    assert not is_label_set(["Hello! Your order ships in three days.", "Hello! Refunds take a week."] * 3)
    assert not is_label_set(["a", "b", "c"])  # every label seen once: not enough to call it a label set
    assert ("macro_f1" in text_scores(labels, labels)
            and "macro_f1" not in text_scores(["x y"] * 2, ["a long free answer"] * 2))


def test_contains_answer_matches_whole_words():
    assert contains_answer("The capital of France is Paris.", ["paris"])
    assert contains_answer("Fifty-six!", ["fifty-six"]) and contains_answer("It is 56.", ["56"])
    assert not contains_answer("It is 560.", ["56"])
    assert contains_answer("Water freezes at 0°C.", ["0", "zero"])


# --- the gate ------------------------------------------------------------------------------------


def retention(base_qa, tuned_qa, base_ppl=10.0, tuned_ppl=11.0):
    return {"base": {"qa_accuracy": base_qa, "text_perplexity": base_ppl},
            "tuned": {"qa_accuracy": tuned_qa, "text_perplexity": tuned_ppl},
            "qa_drop": base_qa - tuned_qa, "perplexity_increase": tuned_ppl / base_ppl - 1}


def test_gate_passes_and_fails_on_crafted_results():
    base, tuned = {"rouge_l": 0.20}, {"rouge_l": 0.30}
    ok = verdict(base, tuned, retention(0.5, 0.45), GateSpec(min_gain=0.05, max_retention_drop=0.1))
    assert ok["passed"] and ok["reasons"] == []
    small_gain = verdict(base, tuned, retention(0.5, 0.45), GateSpec(min_gain=0.2))
    assert not small_gain["passed"] and "gain on rouge_l" in small_gain["reasons"][0]
    forgot = verdict(base, tuned, retention(0.5, 0.3), GateSpec(max_retention_drop=0.1))
    assert not forgot["passed"] and "general-question drop" in forgot["reasons"][0]
    perplexity = verdict(base, tuned, retention(0.5, 0.5, 10.0, 13.0), GateSpec(max_perplexity_increase=0.2))
    assert not perplexity["passed"] and "+30.0%" in perplexity["reasons"][0]
    exactly = verdict({"rouge_l": 0.1}, {"rouge_l": 0.3}, None, GateSpec(min_gain=0.2, max_retention_drop=None))
    assert exactly["passed"]  # 0.3 - 0.1 is 0.19999999999999998 in floating point


def test_gate_skips_what_was_not_measured_and_says_why():
    result = verdict({"rouge_l": 0.2}, {"rouge_l": 0.1}, None,
                     GateSpec(metric="macro_f1", min_gain=0.0, max_retention_drop=0.1))
    assert result["passed"]
    assert [c["passed"] for c in result["checks"]] == [None, None]
    assert "label set" in result["checks"][0]["detail"] and "eval.retention is false" in result["checks"][1]["detail"]


# --- a whole evaluation of a tiny run --------------------------------------------------------------


@pytest.fixture
def tiny_run(tmp_path, tiny_model_dir, make_job):
    """A LoRA run of the tiny model trained on a prepared folder with a test split."""
    from tailor.spec import load_job
    from tailor.techniques import task

    from conftest import prepared_conversations

    prepared = prepared_conversations(tmp_path, tiny_model_dir, 60, validation=6, test=8)
    job = load_job(make_job(data={"train": [str(prepared)]}, training={"max_steps": 2},
                            eval={"max_examples": 5, "max_new_tokens": 8}))
    return task.run(job, show_progress=False)


def test_training_ends_with_an_evaluation_and_tailor_eval_repeats_it(tiny_run):
    from typer.testing import CliRunner

    from tailor.cli import app

    summary = Run(tiny_run).eval_summary()
    assert_declared(tiny_run)
    assert summary["data"]["examples"] == 5
    for name in ("base", "tuned"):
        assert math.isclose(summary[name]["perplexity"], math.exp(summary[name]["loss"]), rel_tol=1e-9)
        assert 0 <= summary[name]["rouge_l"] <= 1 and 0 <= summary[name]["token_accuracy"] <= 1
    assert summary["gain"]["loss"] == pytest.approx(summary["tuned"]["loss"] - summary["base"]["loss"])
    assert summary["retention"]["questions"] == 120
    examples = [json.loads(l) for l in Run(tiny_run).eval_examples_file.read_text().splitlines()]
    assert len(examples) == 5 and {"question", "reference", "base", "tuned"} <= set(examples[0])
    assert len(Run(tiny_run).retention_file.read_text().splitlines()) == 120

    runner = CliRunner()
    # the tiny random model learns nothing in 2 steps: a gain of 1.0 is out of reach, -1.0 is not
    failed = runner.invoke(app, ["eval", str(tiny_run), "--set", "eval.gate.min_gain=1.0",
                                 "--set", "eval.retention=false"])
    assert failed.exit_code == 1, failed.output
    assert "gate: FAILED" in failed.stdout and "gain on rouge_l" in failed.stdout
    assert not Run(tiny_run).eval_summary()["gate"]["passed"]
    passed = runner.invoke(app, ["eval", str(tiny_run), "--set", "eval.gate.min_gain=-1.0",
                                 "--set", "eval.retention=false", "--set", "eval.gate.max_retention_drop=null"])
    assert passed.exit_code == 0, passed.output
    assert "gate: PASSED" in passed.stdout


def test_eval_without_test_data_says_what_to_do(tmp_path, make_job):
    from typer.testing import CliRunner

    from tailor.cli import app
    from tailor.spec import load_job
    from tailor.techniques import task

    run_dir = task.run(load_job(make_job(training={"max_steps": 1})), show_progress=False)
    assert not (Run(run_dir).eval_dir).exists()  # no test split: the run ends without an evaluation
    result = CliRunner().invoke(app, ["eval", str(run_dir)])
    assert result.exit_code == 2 and "no test conversations" in result.stderr and "--data" in result.stderr


# --- report.html -----------------------------------------------------------------------------------


def test_report_has_the_charts_and_the_sample_table(tiny_run):
    from html.parser import HTMLParser

    class Sections(HTMLParser):
        def __init__(self):
            super().__init__()
            self.ids, self.cells, self.scripts = [], [], 0
            self._in_samples = False

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag in ("section", "table") and a.get("id"):
                self.ids.append(a["id"])
                self._in_samples = a["id"] == "samples"
            if tag == "script":
                self.scripts += 1

        def handle_data(self, data):
            if self._in_samples and data.strip():
                self.cells.append(data.strip())

    page = Run(tiny_run).report_file.read_text(encoding="utf-8")
    parsed = Sections()
    parsed.feed(page)
    for chart in ("loss-steps", "loss-epochs", "learning-rate", "base-vs-tuned", "retention"):
        assert chart in parsed.ids
    assert "scores" in parsed.ids and "samples" in parsed.ids
    examples = [json.loads(l) for l in Run(tiny_run).eval_examples_file.read_text().splitlines()]
    assert examples[0]["question"] in parsed.cells  # the first test question, in the side-by-side table
    # the library is embedded, not fetched: the page works offline
    assert "<script src" not in page.replace("'", '"').lower() and len(page) > 1_000_000


def test_report_renders_in_a_real_browser(tiny_run):
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        if os.environ.get("CI") == "true":
            pytest.fail("no Chromium: .ci/run installs Debian's chromium package; the browser test must run in CI")
        pytest.skip("no Chromium on this machine")
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", Run(tiny_run).report_file.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    # Plotly draws each chart as SVG once its script has run: the curves are there, not just the page
    assert dom.count('class="main-svg"') >= 2 * 5
    assert dom.count("trace scatter") >= 3 and "trace bars" in dom


# --- during training: generation metrics, early stopping, the best checkpoint ------------------------


def test_validation_generates_and_early_stopping_keeps_the_best(make_job):
    from safetensors.torch import load_file

    from tailor.spec import load_job
    from tailor.techniques import task

    # min_delta 100: nothing after the first validation counts as better, so with patience 2 the run
    # must stop at the third validation (step 3 of 10), and its result is step 1's weights
    job = load_job(make_job("early", data={"validation_fraction": 0.25},
                            training={"max_steps": 10, "eval_every": 1, "val_generate": 3, "val_generate_tokens": 6,
                                      "early_stopping_patience": 2, "early_stopping_min_delta": 100.0,
                                      "save_every": 0, "keep_checkpoints": 1}))
    run_dir = task.run(job, show_progress=False)
    summary = Run(run_dir).summary()
    assert summary["stopped_early"] and summary["steps"] == 3
    assert summary["best"] == {"step": 1, "metric": "val_loss", "value": pytest.approx(summary["final_val_loss"])}
    evals = [r for r in Run(run_dir).metrics() if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [1, 2, 3]
    assert all(0 <= r["val_rouge_l"] <= 1 and "val_chrf" in r for r in evals)  # generated answers, scored
    assert summary["final_val_loss"] == pytest.approx(evals[0]["val_loss"])
    best = json.loads((Run(run_dir).checkpoints_dir / "best.json").read_text())
    assert best["checkpoint"] == "step-0000001" and (Run(run_dir).checkpoints_dir / "step-0000001").is_dir()
    # keep_checkpoints 1 pruned step 2 but not the best one
    assert sorted(p.name for p in (Run(run_dir).checkpoints_dir).glob("step-*")) == ["step-0000001", "step-0000003"]
    checkpoint = load_file(str(Run(run_dir).checkpoints_dir / "step-0000001" / "trainable.safetensors"))
    adapter = load_file(str(Run(run_dir).adapter_dir / "adapter_model.safetensors"))
    assert {k.replace(".default", ""): v for k, v in checkpoint.items()}.keys() == adapter.keys()
    for key, value in checkpoint.items():
        assert torch.equal(adapter[key.replace(".default", "")], value), key


# --- the judge -------------------------------------------------------------------------------------


@pytest.fixture
def judge_server():
    """A real HTTP server speaking OpenAI's chat completions: it grades 'tone' 5 when the graded
    answer holds an 'e' and 1 otherwise, 'policy' always 3, and records what it was asked."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            graded = body["messages"][-1]["content"].split("Answer to grade:\n", 1)[1].split("\n\nJSON scores", 1)[0]
            reply = json.dumps({"tone": 5 if "e" in graded else 1, "policy": 3})
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": f"Scores: {reply}"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    server.shutdown()


def test_the_judge_scores_both_models_and_is_marked_as_opinion(tiny_run, judge_server, monkeypatch):
    from tailor.evaluate.run import evaluate
    from tailor.spec import EvalSpec

    url, seen = judge_server
    monkeypatch.setenv("JUDGE_KEY", "secret")
    criteria = {"tone": "warm and brief", "policy": "never promises refunds outside the policy"}
    spec = EvalSpec(max_examples=4, max_new_tokens=8, retention=False, gate={"max_retention_drop": None},
                    judge={"endpoint": url, "model": "grader", "criteria": criteria, "api_key_env": "JUDGE_KEY"})
    summary = evaluate(tiny_run, spec=spec, say=lambda m: None)
    examples = [json.loads(l) for l in Run(tiny_run).eval_examples_file.read_text().splitlines()]
    expected = {n: sum(5 if "e" in ex[n] else 1 for ex in examples) / len(examples) for n in ("base", "tuned")}
    assert summary["judge"]["tuned"] == {"tone": pytest.approx(expected["tuned"]), "policy": 3.0}
    assert summary["judge"]["base"]["tone"] == pytest.approx(expected["base"])
    assert "judgement" in summary["judge"]["note"] and examples[0]["judge_tuned"]["policy"] == 3
    assert len(seen) == 2 * 4 and seen[0]["path"] == "/v1/chat/completions" and seen[0]["auth"] == "Bearer secret"
    assert (seen[0]["body"]["model"] == "grader"
            and "never promises refunds" in seen[0]["body"]["messages"][-1]["content"])
    assert "judgement, not a measurement" in Run(tiny_run).report_file.read_text()
    assert (summary["gate"]["passed"] in (True, False)
            and all("judge" not in c["name"] for c in summary["gate"]["checks"]))


def test_a_judge_that_fails_does_not_cost_the_evaluation(tiny_run):
    from tailor.evaluate.run import evaluate
    from tailor.spec import EvalSpec

    spec = EvalSpec(max_examples=2, max_new_tokens=4, retention=False,
                    judge={"endpoint": "http://127.0.0.1:9/v1", "model": "m", "criteria": {"tone": "warm"}})
    summary = evaluate(tiny_run, spec=spec, say=lambda m: None)
    assert "did not answer" in summary["judge"]["error"] and summary["tuned"]["rouge_l"] is not None


def test_train_says_when_the_gate_failed_but_exits_0(tmp_path, tiny_model_dir, make_job):
    from typer.testing import CliRunner

    from tailor.cli import app
    from tailor.data.prepare import prepare

    from conftest import make_conversations

    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps(c) + "\n" for c in make_conversations(40, seed=5)), encoding="utf-8")
    prepared = prepare([raw], tmp_path / "prepared", model=str(tiny_model_dir), num_proc=1, say=lambda m: None,
                       privacy={"enabled": False}, card={"perplexity_sample": 0, "html": False}, split={"test": 4})
    job = make_job("gated", data={"train": [str(prepared.out)]}, training={"max_steps": 1},
                   eval={"max_new_tokens": 4, "retention": False,
                         "gate": {"min_gain": 1.0, "max_retention_drop": None}})
    result = CliRunner().invoke(app, ["train", str(job), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "evaluation gate failed" in result.stderr and "exits with status 1" in result.stderr


def test_eval_on_a_plain_file_of_conversations(tiny_run, tmp_path):
    from typer.testing import CliRunner

    from tailor.cli import app

    from conftest import make_conversations

    holdout = tmp_path / "holdout.jsonl"
    holdout.write_text("".join(json.dumps(c) + "\n" for c in make_conversations(7, seed=11)), encoding="utf-8")
    result = CliRunner().invoke(app, ["eval", str(tiny_run), "--data", str(holdout), "--set", "eval.retention=false",
                                      "--set", "eval.gate.min_gain=null", "--set", "eval.max_new_tokens=4",
                                      "--set", "eval.max_examples=50"])
    assert result.exit_code == 0, result.output
    summary = Run(tiny_run).eval_summary()
    assert summary["data"] == {"sources": [str(holdout)], "examples": 7}
    assert summary["retention"] is None and summary["gate"]["checks"][0]["passed"] is None  # retention: skipped


def test_the_base_models_probe_is_computed_once_and_reused(tiny_model_dir, tmp_path, monkeypatch):
    from tailor.evaluate.probe import base_retention
    from tailor.models import load_model, load_tokenizer

    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path))
    model, tokenizer = load_model(str(tiny_model_dir), torch.float32), load_tokenizer(str(tiny_model_dir))
    first = base_retention(model, tokenizer, str(tiny_model_dir), batch_size=40, bf16=False)
    assert len(first["answers"]) == 120
    # the second time no model is needed: the numbers come from the cache
    assert base_retention(None, None, str(tiny_model_dir), batch_size=40, bf16=False) == first
    with pytest.raises(AttributeError):  # other settings are another entry: computed, so they need the model
        base_retention(None, None, str(tiny_model_dir), batch_size=20, bf16=False)
