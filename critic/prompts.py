"""Prompts as data files hold them: a plain string, or a verl-style list of {role, content} messages."""

from __future__ import annotations

import numpy as np

from critic.sections import DataError


def prompt_text(value) -> str:
    """A plain string prompt, or the text of a verl-style chat list."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, np.ndarray)) and all(isinstance(m, dict) for m in value):
        return "\n".join(str(m.get("content", "")) for m in value)
    raise DataError(f"prompt must be a string or a list of {{role, content}} messages, got {type(value).__name__}")


def prompt_messages(value) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return [{"role": str(m.get("role", "user")), "content": str(m.get("content", ""))} for m in value]
