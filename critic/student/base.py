"""What the student sources share: the batch callback and the error that stops a generation."""

from __future__ import annotations

from typing import Callable

from critic.config import SpecError

OnBatch = Callable[[list[int], list[str], list[str]], None]  # (rows, texts, finish reasons) as responses arrive


class StudentGenerationError(SpecError):
    """Generation stopped before every response was made; what was made is kept and a rerun resumes."""
