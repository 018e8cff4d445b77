"""Step 1: the training data, read into canonical Example records."""

from tailor.data.chat import read_chat_jsonl, read_many
from tailor.data.example import DataError, Example, check_example, check_messages
from tailor.data.formats import FORMATS, Reject, detect_record_format, read_source

__all__ = ["DataError", "Example", "FORMATS", "Reject", "check_example", "check_messages", "detect_record_format",
           "read_chat_jsonl", "read_many", "read_source"]
