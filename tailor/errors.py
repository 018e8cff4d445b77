"""The one base of every error a user can meet and fix: bad input, a missing model, a run folder
that is not one. The CLI catches it once (tailor/cli.py) and prints its message, which names the
input, the problem and the fix; anything else is a bug and keeps its traceback."""

from __future__ import annotations


class TailorError(Exception):
    """An expected failure: its message is for the user, `exit_code` is the command's exit status."""

    exit_code = 2
