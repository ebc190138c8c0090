"""Frozen-student responses for data files that have none: a local causal LM or an OpenAI-compatible server.

  responses.py  what to generate, the cache key and lineage, resuming (the entry point: `student_responses`)
  cache.py      parquet parts on disk, the file handed to the data pipeline, actor digests
  local.py      batched `generate` of a local model;  endpoint.py  chat completions from a server
"""

from critic.student.base import StudentGenerationError
from critic.student.responses import StudentResponses, needs_generation, student_responses, student_source

__all__ = ["StudentGenerationError", "StudentResponses", "needs_generation",
           "student_responses", "student_source"]
