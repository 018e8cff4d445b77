"""The canonical training record. Every reader turns its format into this; nothing downstream
knows where an example came from."""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    # [{"role": "system"|"user"|"assistant", "content": str, "weight": 0|1 (assistant only, optional)}]
    messages: list[dict]
    task: str | None = None
    meta: dict = field(default_factory=dict)  # source file and line, for messages that point back


class DataError(ValueError):
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
