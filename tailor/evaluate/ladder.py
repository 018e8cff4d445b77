"""When the gate fails: the likely cause, and the next settings to try.

The ladder (docs/evaluation.md) reads which checks failed and the settings the run trained with
(its job.yaml, where `auto` values are already chosen), and changes as little as it can:

    forgetting (general questions or general text got worse past the gate)
        with replay off (training.replay): turn it on, nothing else
        the update was too strong for the data: half the learning rate, and a larger share of
        replayed general answers (training.replay, up to 0.5); once the rate has been halved
        twice from where it started, half the epochs too (one at least)
    no gain (the task metric did not rise enough), with no forgetting
        too few steps to learn the task: twice the epochs (up to 8), and a higher learning rate
        (x1.5) when there were fewer than 30 optimizer steps

`tailor train --until-gate-passes N` follows it, one run folder per attempt.
"""

from __future__ import annotations

from dataclasses import dataclass

from tailor.train.replay import ON_BY_DEFAULT, is_on

FORGETTING = ("general-question drop", "general-text perplexity rise")
NO_GAIN_PREFIX = "gain on "
MAX_REPLAY_SHARE = 0.5
MAX_EPOCHS = 8.0
FEW_STEPS = 30


@dataclass(frozen=True)
class NextStep:
    cause: str
    settings: dict[str, object]  # job key -> value, as --set takes them
    why: str

    def as_dict(self) -> dict:
        return {"cause": self.cause, "set": self.settings, "why": self.why}

    def overrides(self) -> list[str]:
        return overrides(self.settings)


def overrides(settings: dict[str, object]) -> list[str]:
    """Settings as `tailor train --set` takes them: key=value."""
    return [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items()]


def next_step(gate: dict, job: dict, steps: int | None, examples: int | None, start_lr: float | None = None) -> \
        NextStep | None:
    """The next rung for a failed gate; None when it passed or no check failed that the ladder knows.
    `job` is the run's job.yaml as a dict; `start_lr`, the first attempt's learning rate."""
    failed = [c["name"] for c in gate.get("checks", []) if c.get("passed") is False]
    if not failed:
        return None
    training = job.get("training") or {}
    lr, epochs = float(training.get("learning_rate", 2e-4)), float(training.get("epochs", 3.0))
    replay = training.get("replay") or {}
    share = float(replay.get("share", 0.2))
    technique = job.get("technique", "task")
    can_replay = technique in ON_BY_DEFAULT
    replays = can_replay and is_on(replay.get("enabled"), technique)
    data = f"{examples:,} training examples" if examples else "this data"
    if any(name in FORGETTING for name in failed) and can_replay and not replays:
        return NextStep(f"the model forgot general skills, and replay was off: nothing reminded it of them while "
                        f"{data} moved it", {"training.replay.enabled": True},
                        f"replay the base model's answers to general prompts ({share:.0%} of the training data)")
    if any(name in FORGETTING for name in failed):
        settings: dict[str, object] = {"training.learning_rate": lr / 2}
        why = [f"learning rate {lr:g} → {lr / 2:g}"]
        if replays and share < MAX_REPLAY_SHARE:
            new_share = round(min(MAX_REPLAY_SHARE, share + 0.15), 2)
            settings["training.replay.share"] = new_share
            why.append(f"replayed general answers {share:.0%} → {new_share:.0%} of the training data")
        if start_lr and lr <= start_lr / 4 + 1e-12 and epochs > 1:
            settings["training.epochs"] = max(1.0, epochs / 2)
            why.append(f"epochs {epochs:g} → {max(1.0, epochs / 2):g}")
        return NextStep(f"the model forgot general skills: learning rate {lr:g} for {epochs:g} epoch(s) moved it too "
                        f"far for {data}", settings, "; ".join(why))
    if any(name.startswith(NO_GAIN_PREFIX) for name in failed):
        settings = {"training.epochs": min(MAX_EPOCHS, epochs * 2)}
        why = [f"epochs {epochs:g} → {min(MAX_EPOCHS, epochs * 2):g}"]
        if steps is not None and steps < FEW_STEPS:
            settings["training.learning_rate"] = lr * 1.5
            why.append(f"learning rate {lr:g} → {lr * 1.5:g}")
        if epochs >= MAX_EPOCHS and "training.learning_rate" not in settings:
            return None
        return NextStep(f"the model did not learn the task well enough: {steps if steps is not None else '?'} "
                        f"optimizer step(s) over {epochs:g} epoch(s) of {data}", settings, "; ".join(why))
    return None
