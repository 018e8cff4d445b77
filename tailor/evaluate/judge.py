"""A judge model's opinion of answers, against a written rubric: style, tone, policy.

Any OpenAI-compatible chat endpoint can judge (a hosted API, a local vLLM or llama.cpp server,
`tailor serve`). Each answer is sent with the question, the reference answer and the rubric's
criteria; the judge returns a score from 1 to 5 per criterion as JSON. These are a model's
judgement, not measurements: the summary and the report say so, and the gate never reads them.
"""

from __future__ import annotations

import json
import os
import re

from tailor.errors import TailorError

SYSTEM = ("You grade answers written by a customer-facing assistant. For each criterion, give an integer "
          "score from 1 (fails it) to 5 (fully meets it). Reply with one JSON object mapping each criterion "
          "name to its score, and nothing else.")
NOTE = "scores from a judge model against the rubric: a model's judgement, not a measurement"


class JudgeError(TailorError, RuntimeError):
    """A judge that cannot be reached or does not answer in the expected form."""


def judge_prompt(criteria: dict[str, str], question: str, reference: str, answer: str) -> str:
    rubric = "\n".join(f"- {name}: {text}" for name, text in criteria.items())
    return (f"Criteria:\n{rubric}\n\nCustomer question:\n{question}\n\nA good reference answer:\n{reference}\n\n"
            f"Answer to grade:\n{answer}\n\nJSON scores for {', '.join(criteria)}:")


def parse_scores(reply: str, criteria: dict[str, str]) -> dict[str, int | None]:
    """The judge's JSON object (the first {...} in its reply); a missing or out-of-range score is None."""
    match = re.search(r"\{.*?\}", reply, re.DOTALL)
    try:
        raw = json.loads(match.group(0)) if match else {}
    except json.JSONDecodeError:
        raw = {}
    out = {}
    for name in criteria:
        value = raw.get(name)
        out[name] = int(value) if isinstance(value, (int, float)) and 1 <= value <= 5 else None
    return out


class Judge:
    def __init__(self, endpoint: str, model: str, criteria: dict[str, str], api_key_env: str | None = None,
                 timeout: float = 60.0):
        import httpx

        if not criteria:
            raise JudgeError("eval.judge.criteria is empty: name at least one, e.g. {tone: 'warm and brief'}")
        headers = {}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise JudgeError(f"eval.judge.api_key_env names ${api_key_env}, which is not set; export it, "
                                 "or leave api_key_env empty for an endpoint without a key")
            headers["Authorization"] = f"Bearer {key}"
        self.url = endpoint.rstrip("/") + "/chat/completions"
        self.model, self.criteria = model, criteria
        self.client = httpx.Client(headers=headers, timeout=timeout)

    def score(self, question: str, reference: str, answer: str) -> dict[str, int | None]:
        import httpx

        body = {"model": self.model, "temperature": 0, "max_tokens": 200,
                "messages": [{"role": "system", "content": SYSTEM},
                             {"role": "user", "content": judge_prompt(self.criteria, question, reference, answer)}]}
        try:
            response = self.client.post(self.url, json=body)
            response.raise_for_status()
            reply = response.json()["choices"][0]["message"]["content"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
            raise JudgeError(f"the judge at {self.url} did not answer ({e}); check eval.judge.endpoint and "
                             "eval.judge.model, or remove eval.judge") from e
        return parse_scores(reply or "", self.criteria)

    def close(self) -> None:
        self.client.close()


def judge_answers(judge: Judge, examples: list[dict]) -> dict:
    """Scores of base and tuned answers: per example (added to each example as judge_base and
    judge_tuned) and the mean per criterion."""
    means = {}
    for name in ("base", "tuned"):
        for ex in examples:
            ex[f"judge_{name}"] = judge.score(ex["question"], ex["reference"], ex[name])
        means[name] = {c: _mean([ex[f"judge_{name}"][c] for ex in examples]) for c in judge.criteria}
    return {"note": NOTE, "model": judge.model, "endpoint": judge.url, "criteria": judge.criteria,
            "examples": len(examples), "base": means["base"], "tuned": means["tuned"]}


def _mean(values: list) -> float | None:
    scored = [v for v in values if v is not None]
    return sum(scored) / len(scored) if scored else None
