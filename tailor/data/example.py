"""The canonical training record. Every reader turns its format into this; nothing downstream
knows where an example came from."""

from __future__ import annotations

from dataclasses import dataclass, field

from tailor.errors import TailorError

ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One record in one of three kinds:

    chat        `messages` is a whole conversation that ends with something to learn from
    preference  `messages` is the prompt (ending with a user turn); `chosen` and `rejected` are the
                preferred and the dispreferred assistant turn(s) that continue it
    text        `text` is a plain document (continued pre-training); `messages` is empty
    """

    # [{"role": "system"|"user"|"assistant", "content": str, "weight": 0|1 (assistant only, optional)}]
    messages: list[dict]
    task: str | None = None
    meta: dict = field(default_factory=dict)  # {"source": file, "line": line/row/record number}
    chosen: list[dict] | None = None
    rejected: list[dict] | None = None
    text: str | None = None

    @property
    def kind(self) -> str:
        if self.text is not None:
            return "text"
        return "preference" if self.chosen is not None else "chat"


class DataError(TailorError, ValueError):
    """Input data that cannot be used; the message lists file:line, the problem and the fix."""

    def __init__(self, problems: list[str], total: int | None = None):
        self.problems = problems
        shown = problems[:20]
        more = f"\n  … and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        head = f"{total if total is not None else len(problems)} problem(s) in the training data:"
        super().__init__(head + "\n" + "\n".join(f"  {p}" for p in shown) + more)


def check_messages(messages) -> str | None:
    """What is wrong with a conversation, or None. The wording is the error users see."""
    if not isinstance(messages, list) or not messages:
        return f"'messages' must be a non-empty list of {{role, content}}; got {type(messages).__name__}"
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            return f"{where} must be an object {{role, content}}; got {type(msg).__name__}"
        unknown = set(msg) - {"role", "content", "weight", "name"}
        if unknown:
            return f"{where} has unknown key(s) {sorted(unknown)}; allowed: role, content, weight, name"
        role = msg.get("role")
        if role not in ROLES:
            return f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}"
        content = msg.get("content")
        if not isinstance(content, str):
            return f"{where}.content must be a string; got {type(content).__name__}"
        if not content.strip():
            return f"{where}.content is empty; remove the turn or fill it in"
        if role == "system" and i != 0:
            return f"{where}: a system message may only come first"
        if "weight" in msg and (role != "assistant" or msg["weight"] not in (0, 1)):
            return f"{where}.weight must be 0 or 1 and only on assistant turns; got {msg['weight']!r}"
    roles = [m["role"] for m in messages if m["role"] != "system"]
    for a, b in zip(roles, roles[1:]):
        if a == b:
            return f"two {a} turns in a row; turns must alternate user/assistant"
    if not roles or roles[0] != "user":
        return "the conversation must start with a user turn (after an optional system message)"
    if not any(m["role"] == "assistant" and m.get("weight", 1) for m in messages):
        return "no assistant turn to learn from; add the answer as a {\"role\": \"assistant\"} message"
    return None


def check_example(ex: Example) -> str | None:
    """What is wrong with a record of any kind, or None."""
    if ex.task is not None and (not isinstance(ex.task, str) or not ex.task.strip()):
        return f"'task' must be a non-empty string; got {ex.task!r}"
    if ex.kind == "text":
        if not isinstance(ex.text, str):
            return f"'text' must be a string; got {type(ex.text).__name__}"
        return None if ex.text.strip() else "'text' is empty"
    if ex.kind == "chat":
        return check_messages(ex.messages)
    prompt_problem = _check_prompt(ex.messages)
    if prompt_problem:
        return prompt_problem
    for name, answer in (("chosen", ex.chosen), ("rejected", ex.rejected)):
        problem = _check_answer(name, answer)
        if problem:
            return problem
    if ex.chosen == ex.rejected:
        return "'chosen' and 'rejected' are the same answer; a preference pair needs two different ones"
    return None


def _check_prompt(messages) -> str | None:
    """A preference prompt: a conversation that ends with the user's turn."""
    if not isinstance(messages, list) or not messages:
        return "'prompt' must be a non-empty string or list of {role, content}"
    closed = messages + [{"role": "assistant", "content": "x"}]
    problem = check_messages(closed)
    if problem:
        return "prompt: " + problem
    return None


def _check_answer(name: str, answer) -> str | None:
    if not isinstance(answer, list) or not answer:
        return f"'{name}' must be a non-empty string or list of assistant messages"
    for i, msg in enumerate(answer):
        if not isinstance(msg, dict) or msg.get("role") != "assistant":
            return f"{name}[{i}] must be an assistant message {{role: assistant, content}}"
        if not isinstance(msg.get("content"), str) or not msg["content"].strip():
            return f"{name}[{i}].content must be a non-empty string"
    return None
