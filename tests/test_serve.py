"""`tailor serve`, `tailor feedback` and `tailor export` on the tiny model: the official openai client
against a live server on 127.0.0.1, two adapters over one base, concurrent clients and feedback
writes, API keys, a feedback round trip that trains, and the export's parity check."""

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from tailor.feedback.export import export as export_feedback
from tailor.feedback.store import FeedbackStore
from tailor.models.decode import Engine, Request, Sampling, holdback
from tailor.models.generate import answer, load_run
from tailor.runs import Run
from tailor.serve.app import Limits
from tailor.serve.server import InThread, ServeError, ServeSettings, build, check_settings
from tailor.spec import load_job
from tailor.techniques import run as run_technique

from conftest import manifest_of

KEY = "sk-test-key"


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def qa(question: str, answer_: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer_}]}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir):
    """Two LoRA runs on the tiny base that learned different answers to the same questions."""
    import yaml

    folder = tmp_path_factory.mktemp("serve-runs")
    runs = {}
    for name, reply in (("lamps", "Glow on! The lamp"), ("boats", "Ahoy. Row the boat")):
        data = write_jsonl(folder / f"{name}.jsonl", [qa(f"question {i}?", reply) for i in range(16)])
        job = {"name": name, "model": {"base": str(tiny_model_dir), "dtype": "float32"},
               "data": {"train": [str(data)], "validation_fraction": 0.0},
               "adapter": {"kind": "lora", "rank": 8, "alpha": 16, "dropout": 0.0},
               "training": {"learning_rate": 1e-2, "max_steps": 40, "batch_size": 4, "max_seq_len": 128,
                            "log_every": 4, "save_every": 0, "warmup_ratio": 0.0, "threads": 1, "seed": 1},
               "eval": {"enabled": False}, "output": {"dir": str(folder / "runs")}}
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(job), encoding="utf-8")
        runs[name] = run_technique(load_job(path), show_progress=False)
    return runs


class LiveServer(InThread):
    """The app of `settings` on 127.0.0.1, a free port, in a thread of the test process."""

    def __init__(self, settings: ServeSettings):
        self.app, self.models, batcher = build(settings, say=lambda m: None)
        super().__init__(self.app, batcher)

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)


def settings(two_runs, tmp_path, **extra) -> ServeSettings:
    return ServeSettings(runs=[str(two_runs["lamps"]), f"sea={two_runs['boats']}"], dtype="float32",
                         db=f"sqlite:///{tmp_path / 'feedback.db'}",
                         limits=Limits(max_tokens=64, max_body_bytes=20_000),
                         **extra)


def reference(run_dir: Path, question: str, max_tokens: int = 24) -> str:
    model, tokenizer = load_run(run_dir, "float32")
    return answer(model, tokenizer, [[{"role": "user", "content": question}]], max_new_tokens=max_tokens)[0]


def test_openai_client_chat_streaming_completions_and_errors(two_runs, tmp_path, tiny_model_dir):
    with LiveServer(settings(two_runs, tmp_path)) as live:
        client = live.client()
        ids = [m.id for m in client.models.list().data]
        assert ids == [str(tiny_model_dir), "lamps", "sea"]

        messages = [{"role": "user", "content": "question 3?"}]
        chat = client.chat.completions.create(model="lamps", messages=messages, temperature=0, max_tokens=24)
        text = chat.choices[0].message.content
        assert text == reference(two_runs["lamps"], "question 3?")
        assert chat.id.startswith("chatcmpl-") and chat.usage.completion_tokens > 0
        assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

        # streamed: the deltas add up to the same answer, then a finish reason and the usage
        chunks = list(client.chat.completions.create(model="lamps", messages=messages, temperature=0, max_tokens=24,
                                                     stream=True, stream_options={"include_usage": True}))
        deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        assert "".join(deltas) == text and len([d for d in deltas if d]) > 3
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == chat.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens

        # a stop string ends the answer before it, also when streamed
        stopped = client.chat.completions.create(model="lamps", messages=messages, temperature=0, max_tokens=24,
                                                 stop=["lamp"])
        assert stopped.choices[0].message.content == text.split("lamp")[0]
        assert stopped.choices[0].finish_reason == "stop"
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="lamps", messages=messages, temperature=0, max_tokens=24, stop=["lamp"], stream=True))
        assert streamed == text.split("lamp")[0]

        # sampling with a seed repeats itself
        sampled = [client.chat.completions.create(model="sea", messages=messages, temperature=1.3, top_p=0.95,
                                                  seed=5, max_tokens=16).choices[0].message.content for _ in range(2)]
        assert sampled[0] == sampled[1]

        completion = client.completions.create(model="base", prompt="Once upon", max_tokens=8, temperature=0)
        assert completion.object == "text_completion" and completion.usage.completion_tokens <= 8

        # OpenAI-style errors, never a stack trace
        with pytest.raises(openai.NotFoundError) as missing:
            client.chat.completions.create(model="nope", messages=messages)
        assert missing.value.code == "model_not_found" and "lamps" in missing.value.message
        with pytest.raises(openai.BadRequestError, match="over this server's limit of 64"):
            client.chat.completions.create(model="lamps", messages=messages, max_tokens=65)
        with pytest.raises(openai.BadRequestError, match="unsupported parameter logit_bias"):
            client.chat.completions.create(model="lamps", messages=messages, logit_bias={"5": 1})
        with pytest.raises(openai.BadRequestError, match="messages"):
            client.chat.completions.create(model="lamps", messages=[{"role": "robot", "content": "hi"}])
        raw = httpx.post(live.url + "/v1/chat/completions", content=b"{not json", timeout=30,
                         headers={"content-type": "application/json"})
        assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
        big = httpx.post(live.url + "/v1/chat/completions", timeout=30,
                         json={"model": "lamps", "messages": [{"role": "user", "content": "x" * 30_000}]})
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
        assert "Traceback" not in raw.text + big.text

        metrics = httpx.get(live.url + "/metrics").text
        assert 'tailor_requests_total{path="/v1/chat/completions",status="200"}' in metrics
        assert 'tailor_tokens_total{kind="completion",model="lamps"}' in metrics
        assert httpx.get(live.url + "/health").json()["status"] == "ok"


def test_two_adapters_and_the_base_in_one_batch_give_their_own_answers(two_runs, tmp_path):
    questions = [f"question {i}?" for i in range(4)]
    expected = {name: [reference(two_runs[run], q) for q in questions] for name, run in (("lamps", "lamps"),
                                                                                         ("sea", "boats"))}
    assert expected["lamps"] != expected["sea"]
    boats = Path(two_runs["boats"])
    with LiveServer(settings(two_runs, tmp_path, admin_key="sk-admin", runs_dir=str(boats.parent.parent))) as live:
        client = live.client()
        sizes = []
        live.batcher.on_step = sizes.append
        jobs = [(name, i) for i in range(4) for name in ("lamps", "sea", "base")]
        with ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(lambda job: client.chat.completions.create(
                model=job[0], messages=[{"role": "user", "content": questions[job[1]]}], temperature=0,
                max_tokens=24).choices[0].message.content, jobs))
        for (name, i), text in zip(jobs, got):
            if name != "base":
                assert text == expected[name][i], (name, i)
        assert max(sizes) > 1  # requests really were decoded together
        # an adapter added while serving, without a restart
        added = httpx.post(live.url + "/v1/adapters", json={"run": f"boats/{boats.name}", "name": "boats2"},
                           headers={"Authorization": "Bearer sk-admin"}, timeout=60)
        assert added.status_code == 200 and added.json()["id"] == "boats2"
        again = client.chat.completions.create(model="boats2", messages=[{"role": "user", "content": questions[0]}],
                                               temperature=0, max_tokens=24)
        assert again.choices[0].message.content == expected["sea"][0]
        # the base is stored once: both adapters hang on one engine
        assert live.models.get("lamps").engine is live.models.get("sea").engine is live.models.get("base").engine


def test_api_keys_are_checked_and_required_beyond_loopback(two_runs, tmp_path):
    with pytest.raises(ServeError, match="--api-key"):
        check_settings(ServeSettings(host="0.0.0.0"))
    check_settings(ServeSettings(host="0.0.0.0", api_keys=(KEY,)))
    with LiveServer(settings(two_runs, tmp_path, api_keys=(KEY,))) as live:
        messages = [{"role": "user", "content": "hi"}]
        for key in ("none", "sk-wrong"):
            with pytest.raises(openai.AuthenticationError) as refused:
                live.client(key).chat.completions.create(model="lamps", messages=messages, max_tokens=2)
            assert refused.value.code == "invalid_api_key"
        assert httpx.get(live.url + "/v1/models").status_code == 401
        assert httpx.get(live.url + "/health").status_code == 200
        ok = live.client(KEY).chat.completions.create(model="lamps", messages=messages, max_tokens=2)
        assert ok.choices[0].message.role == "assistant"


def test_concurrent_clients_and_feedback_lose_nothing_and_export_trains(two_runs, tmp_path):
    n_clients, per_client = 8, 4
    with LiveServer(settings(two_runs, tmp_path)) as live:
        client = live.client()

        def session(c: int) -> list[str]:
            ids = []
            for k in range(per_client):
                question = f"question {(c + k) % 6}?"
                done = client.chat.completions.create(model="lamps", messages=[{"role": "user", "content": question}],
                                                      temperature=0, max_tokens=6)
                ids.append(done.id)
                body = {"completion_id": done.id, "rating": "up" if k % 2 else "down"}
                if k % 2 == 0:
                    body["correction"] = f"Glow on! Corrected answer {c}-{k}."
                reply = httpx.post(live.url + "/v1/feedback", json=body, timeout=60)
                assert reply.status_code == 200, reply.text
            return ids

        with ThreadPoolExecutor(n_clients) as pool:
            ids = [i for chunk in pool.map(session, range(n_clients)) for i in chunk]
        assert len(set(ids)) == n_clients * per_client
        bad = httpx.post(live.url + "/v1/feedback", json={"completion_id": "chatcmpl-missing", "rating": 5}, timeout=30)
        assert bad.status_code == 404 and bad.json()["error"]["param"] == "completion_id"
        bad = httpx.post(live.url + "/v1/feedback", json={"completion_id": ids[0], "rating": 9}, timeout=30)
        assert bad.status_code == 400

    store = FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}")
    rows = store.rows()
    assert len(rows) == n_clients * per_client and {r["completion_id"] for r in rows} == set(ids)
    assert store.counts()["lamps"] == {"completions": 32, "feedback": 32, "mean_score": 0.5, "corrections": 16}

    exported = export_feedback(store, tmp_path / "feedback")
    assert exported.n_supervised == 32  # 16 corrections + 16 up-voted answers
    assert exported.n_pairs >= 16  # each correction against the answer it corrects, and up vs down per prompt
    pair = json.loads(exported.preferences.read_text().splitlines()[0])
    assert set(pair) == {"prompt", "chosen", "rejected"} and pair["prompt"][-1]["role"] == "user"
    from tailor.data import read_many

    pairs = read_many([str(exported.preferences)])  # the data step reads both files as they are
    assert len(pairs) == exported.n_pairs and all(p.chosen and p.rejected for p in pairs)
    assert len(read_many([str(exported.supervised)])) == 32

    # the continual-learning stage: the deployed adapter goes on training on what users corrected
    job = load_job(Run(two_runs["lamps"]).job_file, [f"data.train=[{exported.supervised}]", "training.max_steps=2",
                                                     f"model.from_run={two_runs['lamps']}", "name=lamps-feedback"])
    continued = run_technique(job, show_progress=False)
    manifest = manifest_of(continued)
    before = Run(two_runs["lamps"]).summary()
    assert manifest["start"]["from"] == str(two_runs["lamps"])
    assert manifest["start"]["trainable_sha256"] == before["end"]["trainable_sha256"]
    assert (Run(continued).adapter_dir).is_dir()


def test_export_merges_and_parity_catches_a_broken_template(two_runs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tailor.serve.export import export_run, parity

    folder = export_run(two_runs["lamps"], tmp_path / "merged", dtype="float32", say=lambda m: None)
    model = AutoModelForCausalLM.from_pretrained(folder)  # plain transformers: nothing of Tailor's needed
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert "peft" not in type(model).__module__ and tokenizer.chat_template
    eos = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])
    prompts = [[{"role": "user", "content": f"question {i}?"}] for i in range(3)]
    result = parity(two_runs["lamps"], folder, prompts, max_new_tokens=24)
    assert result["agree"] == 3, result

    # the bug users of other tools meet most: the chat template lost or replaced on export
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    template_file = folder / "chat_template.jinja"
    broken = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    if template_file.exists():
        template_file.write_text(broken)
    else:
        config["chat_template"] = broken
        config_file.write_text(json.dumps(config))
    result = parity(two_runs["lamps"], folder, prompts, max_new_tokens=24)
    assert result["agree"] == 0
    assert "chat template" in result["results"][0]["problems"][0]


# --- the decoding engine without HTTP ------------------------------------------------------------


def test_engine_greedy_equals_generate_and_batched_rows_leave_when_done(tiny_model_dir):
    from tailor.models.load import load_model, load_tokenizer

    model, tokenizer = load_model(str(tiny_model_dir), torch.float32), load_tokenizer(str(tiny_model_dir))
    engine = Engine(model, tokenizer)
    prompts = [engine.chat_prompt([{"role": "user", "content": q}]) for q in ("hi", "a much longer question here")]
    batch = [Request(p, Sampling(max_tokens=n, temperature=0.0)) for p, n in zip(prompts, (3, 12))]
    engine.run(batch)
    for r, n in zip(batch, (3, 12)):
        expected = model.generate(torch.tensor([r.prompt_ids]), max_new_tokens=n, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)[0, len(r.prompt_ids):].tolist()
        assert r.token_ids == expected[:len(r.token_ids)] and r.finish_reason in ("length", "stop")
    assert len(batch[0].token_ids) == 3 and batch[0].finish_reason == "length"
    # a client that goes away frees its row
    pieces = []
    gone = Request(prompts[0], Sampling(max_tokens=50, temperature=0.0), on_text=pieces.append)
    gone.on_text = lambda t: (pieces.append(t), setattr(gone, "cancelled", True))
    engine.run([gone])
    assert gone.finish_reason == "cancelled" and len(gone.token_ids) <= 2


def test_stream_holds_back_what_may_become_a_stop_string():
    assert holdback("the answer is ##", ("###",)) == 2
    assert holdback("the answer is #", ("###", "END")) == 1
    assert holdback("the answer", ("###",)) == 0
    assert holdback("caf\ufffd", ()) == 1


FAKE_VLLM = '''
calls = []


class SamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class LLM:
    def __init__(self, model, **kwargs):
        calls.append(("init", model, kwargs))
        self.llm_engine = type("E", (), {"model_config": type("C", (), {"max_model_len": 512})()})()

    def generate(self, prompts, params, lora_request=None, use_tqdm=True):
        calls.append(("generate", prompts, [p.kwargs for p in params], lora_request))
        eos = params[0].kwargs["stop_token_ids"][0]
        out = []
        for prompt, lora in zip(prompts, lora_request):
            text = "from " + (lora.lora_name if lora else "base")
            best = type("O", (), {"token_ids": prompt["prompt_token_ids"][-2:] + [eos], "text": text,
                                  "finish_reason": "stop"})()
            out.append(type("R", (), {"outputs": [best]})())
        return out
'''
FAKE_REQUEST = '''
class LoRARequest:
    def __init__(self, lora_name, lora_int_id, lora_path):
        self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path
'''


def test_the_vllm_engine_gets_each_requests_adapter_and_sampling(two_runs, tmp_path, monkeypatch, tiny_model_dir):
    # vLLM needs a CUDA GPU; a stand-in with its API checks what Tailor hands it
    (tmp_path / "vllm" / "lora").mkdir(parents=True)
    (tmp_path / "vllm" / "__init__.py").write_text(FAKE_VLLM)
    (tmp_path / "vllm" / "lora" / "__init__.py").write_text("")
    (tmp_path / "vllm" / "lora" / "request.py").write_text(FAKE_REQUEST)
    monkeypatch.syspath_prepend(str(tmp_path))
    import vllm

    with LiveServer(settings(two_runs, tmp_path, engine="vllm")) as live:
        client = live.client()
        messages = [{"role": "user", "content": "question 1?"}]
        reply = client.chat.completions.create(model="sea", messages=messages, temperature=0.5, top_p=0.9, seed=3,
                                               stop=["##"], max_tokens=7)
        assert reply.choices[0].message.content == "from sea" and reply.usage.completion_tokens == 2
        assert client.chat.completions.create(model="base", messages=messages).choices[0].message.content == "from base"
    init, generate = vllm.calls[0], vllm.calls[1]
    assert init[1] == str(tiny_model_dir) and init[2]["enable_lora"] is True
    prompt_ids = live.models.get("sea").engine.chat_prompt(messages)
    assert generate[1] == [{"prompt_token_ids": prompt_ids}]
    assert generate[2][0] | {"stop_token_ids": None} == {"max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 3,
                                                         "stop": ["##"], "stop_token_ids": None}
    assert generate[3][0].lora_name == "sea" and generate[3][0].lora_path == str(Run(two_runs["boats"]).adapter_dir)
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        del sys.modules[name]  # the stand-in must not outlive this test


def test_prompts_are_logged_only_when_asked_and_then_anonymized(two_runs, tmp_path, caplog):
    privacy = tmp_path / "data.yaml"
    privacy.write_text("privacy:\n  ner: false\n", encoding="utf-8")  # patterns only: no spaCy model to load
    secret = "write to maria.keller@gmail.com"
    caplog.set_level("INFO", logger="tailor.serve")
    for log_prompts in (False, True):
        with LiveServer(settings(two_runs, tmp_path, log_prompts=log_prompts, privacy=str(privacy))) as live:
            live.client().chat.completions.create(model="lamps", messages=[{"role": "user", "content": secret}],
                                                  max_tokens=4)
        logged = [r.getMessage() for r in caplog.records if r.name == "tailor.serve"]
        assert not any("maria.keller" in line for line in logged)
        assert len(logged) == (1 if log_prompts else 0)
    assert "write to <EMAIL_ADDRESS>" in logged[0] or "write to <EMAIL>" in logged[0], logged[0]


def test_requests_that_join_a_running_batch_get_the_answers_they_get_alone(tiny_model_dir):
    from tailor.models.load import load_model, load_tokenizer

    engine = Engine(load_model(str(tiny_model_dir), torch.float32), load_tokenizer(str(tiny_model_dir)))
    prompts = [engine.chat_prompt([{"role": "user", "content": q}]) for q in ("hi", "a longer one, this", "mid")]
    alone = []
    for p in prompts:
        request = Request(p, Sampling(max_tokens=10, temperature=0.0))
        engine.run([request])
        alone.append(request.token_ids)
    first, *later = [Request(p, Sampling(max_tokens=n, temperature=0.0)) for p, n in zip(prompts, (4, 10, 10))]
    calls, steps = [], []
    engine.on_step = steps.append

    def more(k: int) -> list[Request]:  # one joins at the 2nd token, one after the first has finished
        calls.append(k)
        return [later.pop(0)] if len(calls) in (2, 7) and later else []

    joined = [first] + list(later)
    widths = []
    run_forward = engine._forward
    engine._forward = lambda requests, **inputs: (widths.append(inputs["attention_mask"].shape[1]),
                                                  run_forward(requests, **inputs))[1]
    engine.run([first], more=more, max_batch=4)
    assert [r.token_ids for r in joined] == [alone[0][:4], alone[1], alone[2]]
    assert max(steps) == 2 and all(r.finish_reason == "length" for r in joined)
    # the columns only the finished rows used are dropped: at the end the cache is as long as the
    # last row (its prompt and the 9 tokens fed back), not as the longer prompt that left before it
    assert len(prompts[1]) > len(prompts[2]) and widths[-1] == len(prompts[2]) + 9


def test_from_run_must_be_a_finished_run_of_the_same_base(two_runs, tmp_path):
    from tailor.train.adapters import AdapterError

    other = Run(tmp_path / "other-run")
    other.path.mkdir()
    lamps = Run(two_runs["lamps"]).manifest()
    other.write_manifest(lamps.model_copy(
        update={"model": lamps.model.model_copy(update={"source": "org/another-model"})}))
    other.mark_done()
    job = Run(two_runs["lamps"]).job_file
    with pytest.raises(AdapterError, match="trained org/another-model, but this job's model.base is"):
        run_technique(load_job(job, [f"model.from_run={other.path}", "training.max_steps=1"]), show_progress=False)
    with pytest.raises(AdapterError, match="not a finished run folder"):
        run_technique(load_job(job, [f"model.from_run={tmp_path}", "training.max_steps=1"]), show_progress=False)


def test_the_prompt_log_anonymizer_uses_the_privacy_sections_spacy_model(tmp_path):
    """serve builds its log anonymizer from the same `privacy:` section as prepare, spaCy model included."""
    pytest.importorskip("presidio_analyzer")
    from tailor.data.privacy import PrivacyError
    from tailor.serve.server import _prompt_logger

    privacy = tmp_path / "data.yaml"
    privacy.write_text("privacy:\n  spacy_model: no_such_spacy_pkg\n", encoding="utf-8")
    with pytest.raises(PrivacyError, match=r"no_such_spacy_pkg.*spacy_model"):
        _prompt_logger(ServeSettings(log_prompts=True, privacy=str(privacy)))
