"""Student responses from an OpenAI-compatible server, `student.concurrency` requests at a time.

Takes {row: chat messages} and calls `on_batch(rows, texts, finish_reasons)` from the calling
thread as responses arrive; `critic.student.responses` owns caching and resuming. The API key
is read from the environment at request time and never printed: every error text that leaves
this module has it scrubbed.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed

from critic.config import StudentConfig
from critic.redact import mask
from critic.student.base import OnBatch, StudentGenerationError

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}  # worth another try; any other 4xx is final
BACKOFF_S = 1.0  # wait before the first retry, doubled for each next one (capped at 30 s)


class _Skipped(Exception):
    """A request not (re)tried because the run is stopping; not a failure of its own."""


def chat_url(endpoint: str) -> str:
    """A base URL (http://host:8000/v1) or the full chat-completions URL -> the chat-completions URL."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/chat/completions") else f"{endpoint}/chat/completions"


def generate_with_endpoint(student: StudentConfig, messages: dict[int, list[dict]], on_batch: OnBatch) -> None:
    """Chat completions from an OpenAI-compatible server, `student.concurrency` requests at a time."""
    url = chat_url(student.endpoint)
    api_key = os.environ.get(student.api_key_env) or None
    stop = threading.Event()  # set when the run ends early: no request starts or retries after it

    def one(row: int) -> tuple[int, str, str]:
        body = {"model": student.model_name, "messages": messages[row], "max_tokens": student.max_new_tokens,
                "temperature": student.temperature, "top_p": student.top_p, "seed": student.seed + row}
        return (row, *_post_with_retries(url, body, api_key, student, stop))

    pool = ThreadPoolExecutor(max_workers=student.concurrency, thread_name_prefix="student-request")
    futures = [pool.submit(one, row) for row in messages]
    failure: StudentGenerationError | None = None
    try:
        for future in as_completed(futures):
            if future.cancelled():
                continue
            try:
                row, text, reason = future.result()
            except _Skipped:
                continue
            except StudentGenerationError as exc:
                if failure is None:  # stop starting requests; those in flight still finish and are kept
                    failure = exc
                    stop.set()
                    for other in futures:
                        other.cancel()
                continue
            on_batch([row], [text], [reason])
    finally:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
    if failure is not None:
        raise failure


def _post_with_retries(url: str, body: dict, api_key: str | None, student: StudentConfig,
                       stop: threading.Event) -> tuple[str, str]:
    """(text, finish_reason) of one chat completion; retries timeouts, resets and 5xx/429 with backoff."""
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    problem, attempts = "", 0
    for attempt in range(student.max_retries + 1):
        if stop.is_set() or (attempt and stop.wait(min(BACKOFF_S * 2 ** (attempt - 1), 30.0))):
            raise _Skipped()
        attempts += 1
        try:
            request = urllib.request.Request(url, data=data, headers=headers, method="POST")
            with urllib.request.urlopen(request, timeout=student.timeout_s) as response:
                choice = json.loads(response.read())["choices"][0]
            return choice["message"].get("content") or "", str(choice.get("finish_reason") or "stop")
        except urllib.error.HTTPError as exc:
            problem = f"HTTP {exc.code} {exc.reason}: {_error_body(exc)}"
            if exc.code not in RETRY_STATUS:
                break  # a bad request, model name or key: retrying cannot help
        except (urllib.error.URLError, OSError) as exc:  # refused, reset, timed out
            problem = f"{type(exc).__name__}: {getattr(exc, 'reason', None) or exc}"
        except (ValueError, LookupError, TypeError, AttributeError) as exc:
            problem = f"unexpected reply ({type(exc).__name__}: {exc})"
    stop.set()  # a final failure: no other request starts
    message = (f"request to {mask(url)} (model {student.model_name!r}) failed after {attempts} attempt(s), "
               f"timeout {student.timeout_s:g} s: {problem}")
    raise StudentGenerationError(message.replace(api_key, "***") if api_key else message)


def _error_body(exc: urllib.error.HTTPError) -> str:
    try:
        return exc.read(500).decode("utf-8", "replace").strip() or "(empty body)"
    except OSError:
        return "(unreadable body)"
    finally:
        exc.close()
