"""A real browser on the real MLflow UI: `sweep.py ui` on a free port, headless Chromium's rendered DOM.

Chromium comes from the distribution (`apt-get install chromium`; .ci/run installs it). The page is
rendered with a virtual-time budget, so the charts' data requests finish before the DOM is dumped, in a
window tall enough that MLflow's lazily drawn charts (only those in view are drawn) are all in view.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from benchmarks.servers import free_port

ROOT = Path(__file__).resolve().parents[1]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@contextlib.contextmanager
def mlflow_ui(store_args: list[str], cwd: Path):
    """`sweep.py ui` on 127.0.0.1:<free port>; yields its base URL; stopped on exit."""
    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "sweep.py"), "ui", *store_args, "--port", str(port)],
                              cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError(f"the MLflow UI did not start on {base}") from None
                time.sleep(0.5)
        yield base
    finally:
        server.terminate()  # `sweep.py ui` stops MLflow's whole process group (its job consumers included)
        server.wait(timeout=60)


def rendered_dom(url: str, expect: tuple[str, ...] = (), attempts: int = 3) -> str:
    """The DOM after Chromium ran the page; rendered again (with more time) until it holds every `expect` string.

    The virtual-time budget runs ahead of real time while the page waits for the server, so on a loaded machine
    the charts' data may not have arrived within one budget: a longer retry sees them.
    """
    dom = ""
    for attempt in range(1, attempts + 1):
        out = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1600,9000",
                              f"--virtual-time-budget={30000 * attempt}", "--dump-dom", url],
                             capture_output=True, text=True, timeout=300)
        dom = out.stdout
        if all(text in dom for text in expect):
            break
    return dom
