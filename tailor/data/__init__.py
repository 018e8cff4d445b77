"""Step 1: the training data, read into canonical Example records."""

from tailor.data.chat import read_chat_jsonl, read_many
from tailor.data.example import DataError, Example, check_messages

__all__ = ["DataError", "Example", "check_messages", "read_chat_jsonl", "read_many"]
