"""Fine-tune or not: the verdict, every reason for and against it, and what would change it.

The cases are the ones a business meets (docs/advise.md lists them): fine-tuning pays for industry
jargon, a language or dialect, a brand voice, compliance and moderation, accuracy on a narrow task,
and in long-lived production; it does not pay for broad general use, early exploration, quick
market tests and short pilots, without the data, the budget, the time or the people, or when the
base model already does the job. A blocking reason makes the verdict "not yet" whatever speaks
for fine-tuning; otherwise the reasons are weighed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tailor.advise.answers import Answers
from tailor.advise.estimate import fmt_duration
from tailor.advise.profile import DataProfile

# Fewest training examples worth fine-tuning for, by use case: a tone or format is learnt from
# dozens; a classification needs each class a few dozen times; jargon and a language need breadth.
MIN_EXAMPLES = {"voice": 50, "moderation": 200, "accuracy": 200, "compliance": 200, "jargon": 300,
                "localization": 500, "general": 1000}
BASE_SCORE_HIGH, BASE_SCORE_GOOD = 0.85, 0.70
LOW_PERPLEXITY = 3.0  # the base model already predicts the answers nearly word for word

FOR_CASES = {
    "jargon": ("industry jargon", "the model must understand and write your field's own terms, which a general "
               "model knows only loosely"),
    "localization": ("language localization", "the model must work in {languages}, with the region's usage"),
    "voice": ("custom responses", "every answer should sound like your brand: its tone, format and length"),
    "compliance": ("regulatory compliance", "answers must follow your rules, and a model you tune and host yourself "
                   "keeps the data in house"),
    "moderation": ("content moderation", "the model must apply your policy to user content consistently"),
    "accuracy": ("improving accuracy", "one well-defined task where a specialized model beats a general one"),
}


@dataclass(frozen=True)
class Reason:
    side: Literal["for", "against"]
    case: str  # the business case, in a few words
    text: str
    blocking: bool = False


@dataclass
class Verdict:
    decision: Literal["fine-tune", "not yet", "no"]
    reasons: list[Reason] = field(default_factory=list)
    instead: list[str] = field(default_factory=list)  # what to do now instead of (or before) fine-tuning
    would_change: list[str] = field(default_factory=list)  # evidence that would turn the answer

    @property
    def headline(self) -> str:
        if self.decision == "fine-tune":
            return "Fine-tune: " + "; ".join(r.case for r in self.reasons if r.side == "for")
        blockers = [r.case for r in self.reasons if r.side == "against" and r.blocking] or \
                   [r.case for r in self.reasons if r.side == "against"]
        return ("Not yet: " if self.decision == "not yet" else "No: ") + "; ".join(blockers)


@dataclass(frozen=True)
class Feasibility:
    """The cheapest plan that fits, from the estimator (None: no model fits the hardware at all)."""

    model: str | None  # the first-ranked model
    seconds: float | None = None  # training the cheapest model of the use case's size
    usd: float | None = None
    hardware: str = ""
    plan_model: str | None = None  # that model
    offline: str | None = None  # why the machine that trains cannot download (None: it can)


def decide(a: Answers, data: DataProfile, plan: Feasibility) -> Verdict:
    v = Verdict("fine-tune")
    _use_case(a, v)
    _stage(a, v)
    _data(a, data, v)
    _base_already_good(a, data, v)
    _resources(a, plan, v)
    against = [r for r in v.reasons if r.side == "against"]
    in_favour = [r for r in v.reasons if r.side == "for"]
    if a.use_case == "general" and not data.preference_pairs:
        v.decision = "no"
    elif any(r.blocking for r in against) or len(against) > len(in_favour):
        v.decision = "not yet"
    if v.decision != "fine-tune" and not v.instead:
        v.instead.append("prompt a good instruct model with a few of your best examples, and keep collecting data")
    if v.decision == "fine-tune" and a.data.base_score is None:
        v.would_change.append(f"the base model scoring {BASE_SCORE_HIGH:.2f} or more on a validation sample of your "
                              "task (data.base_score): then tuning would add little")
    return v


def _use_case(a: Answers, v: Verdict) -> None:
    if a.use_case == "general":
        v.reasons.append(Reason("against", "broad general use",
                                "a general assistant needs no specialization: today's instruct models already do "
                                "this, and fine-tuning would cost time and money for little gain", blocking=True))
        v.instead.append("use an instruct model as it is (the ranking below still shows which fits), with a system "
                         "prompt; add retrieval over your documents if it must know your facts")
        v.would_change.append("a specialized need: your jargon, a language, a voice or one task it does badly today")
        return
    case, text = FOR_CASES[a.use_case]
    v.reasons.append(Reason("for", case, text.format(languages=", ".join(a.languages))))


def _stage(a: Answers, v: Verdict) -> None:
    if a.stage == "production":
        v.reasons.append(Reason("for", "long-lived use", "in production the cost of tuning is paid once and the "
                                "model serves for months; it can be tuned again as feedback comes in"))
    elif a.stage == "exploration":
        v.reasons.append(Reason("against", "early-stage exploration", "while you are still finding where AI helps, a "
                                "tuned model fixes a choice too early", blocking=True))
        v.instead.append("try the use cases with prompting first; write down the answers you wish it gave")
        v.would_change.append("a chosen use case with a few hundred examples of good answers")
    elif a.stage == "market-test":
        v.reasons.append(Reason("against", "quick market test", "to learn whether customers want the idea, an "
                                "off-the-shelf model with a good prompt is faster and cheaper", blocking=True))
        v.instead.append("launch the test on a prompted instruct model; log what users ask (tailor serve records it)")
        v.would_change.append("the test succeeds and the product moves to production")
    elif a.stage == "pilot":
        v.reasons.append(Reason("against", "short pilot", "a pilot with a short life rarely repays the data work "
                                "and training; prompting shows whether the idea works", blocking=True))
        v.instead.append("run the pilot with prompting (and retrieval, if it needs your documents)")
        v.would_change.append("the pilot turns into a production service, or prompting falls short on a measurable "
                              "task")


def _data(a: Answers, data: DataProfile, v: Verdict) -> None:
    have = data.examples + data.validation_examples + data.test_examples
    need = MIN_EXAMPLES[a.use_case]
    if have < need:
        v.reasons.append(Reason("against", "too little data", f"{have} examples; {a.use_case} needs at least {need} "
                                "to learn from, and some to test on", blocking=True))
        v.instead.append(f"collect at least {need - have} more examples (serving a prompted model with tailor serve "
                         "and its feedback export gathers them)")
        v.would_change.append(f"{need}+ reviewed examples")
    elif have < 2 * need:
        v.reasons.append(Reason("against", "small data", f"{have} examples is enough for a format or tone, not for "
                                "new knowledge; expect modest gains and test them"))
    else:
        v.reasons.append(Reason("for", "enough data", f"{have:,} examples ({data.examples:,} to train on, the rest "
                                f"to validate and test), above the {need} that {a.use_case} needs"))
    if data.distinctive_share is not None and data.distinctive_share >= 0.1:
        v.reasons.append(Reason("for", "relevant data", f"{data.distinctive_share:.0%} of its words are far more "
                                "frequent than in general English: it carries the domain"))
    if data.base_perplexity is not None and data.base_perplexity >= 20:
        v.reasons.append(Reason("for", "room to learn", f"the base model finds your answers surprising (perplexity "
                                f"{data.base_perplexity:.0f} on a sample): tuning has something to teach"))


def _base_already_good(a: Answers, data: DataProfile, v: Verdict) -> None:
    score = a.data.base_score
    if score is not None and score >= BASE_SCORE_HIGH:
        v.reasons.append(Reason("against", "the base model already does it", f"it scores {score:.2f} on your "
                                "validation sample; tuning can add little", blocking=True))
        v.instead.append("use the base model; improve the prompt where it fails")
        v.would_change.append(f"a validation score below {BASE_SCORE_GOOD:.2f}, or failures prompting cannot fix")
    elif score is not None and score >= BASE_SCORE_GOOD:
        v.reasons.append(Reason("against", "the base model is close", f"it scores {score:.2f} on your validation "
                                "sample; expect small gains"))
    elif score is not None:
        v.reasons.append(Reason("for", "the base model falls short", f"it scores {score:.2f} on your validation "
                                "sample"))
    if data.base_perplexity is not None and data.base_perplexity < LOW_PERPLEXITY:
        v.reasons.append(Reason("against", "answers already predictable", f"the base model predicts your answers "
                                f"well (perplexity {data.base_perplexity:.1f}): little for tuning to teach"))


def _resources(a: Answers, plan: Feasibility, v: Verdict) -> None:
    if plan.model is None and plan.offline and plan.plan_model:
        v.reasons.append(Reason("against", "offline", f"no model that fits is here already, and {plan.offline}",
                                blocking=True))
        from tailor.models.catalog import find_model

        v.instead.append(f"on a machine with network, `hf download {find_model(plan.plan_model).hub_id}`; copy "
                         "its Hugging Face cache (~/.cache/huggingface/hub) here, or its folder (--model PATH)")
        v.would_change.append("network access, or the model's files copied here")
        return
    if plan.model is None:
        v.reasons.append(Reason("against", "no model fits", f"no catalog model meets the licence, language and "
                                f"memory needs on {plan.hardware}", blocking=True))
        v.instead.append("choose bigger hardware (--gpu), or relax the language or licence needs")
        v.would_change.append("hardware with more memory")
        return
    if a.budget_usd is not None and plan.usd is not None and plan.usd > a.budget_usd:
        v.reasons.append(Reason("against", "budget", f"the cheapest plan at the size {a.use_case} needs "
                                f"({plan.plan_model} on {plan.hardware}) costs about "
                                f"${plan.usd:,.2f}, above the ${a.budget_usd:,.2f} budget", blocking=True))
        v.would_change.append(f"a budget of ${plan.usd * 1.3:,.0f} (with a 30 % margin), or less data per epoch")
    if a.deadline_hours is not None and plan.seconds is not None and plan.seconds > a.deadline_hours * 3600:
        v.reasons.append(Reason("against", "deadline", f"training {plan.plan_model}, the quickest at the size "
                                f"{a.use_case} needs, takes about "
                                f"{fmt_duration(plan.seconds)} on {plan.hardware}, past the {a.deadline_hours:g} h "
                                "deadline", blocking=True))
        v.would_change.append("faster hardware or a later deadline")
    if a.expertise == "none":
        v.reasons.append(Reason("against", "no in-house expertise", "someone must read the evaluation, judge the "
                                "gate's verdict and own the model once it serves; a team without machine-learning "
                                "experience should not start there", blocking=True))
        v.instead.append("start with prompting while someone in the team learns (tailor quickstart shows every "
                         "step), or bring in an expert or a managed fine-tuning service")
        v.would_change.append("a team member who owns the model, or an outside expert")
    elif a.expertise == "expert":
        v.reasons.append(Reason("for", "in-house expertise", "your team can tune, evaluate and maintain the model"))
