import os
from pathlib import Path

# `make test` runs the suite on several pytest-xdist workers (Makefile TEST_WORKERS). Each gets its share of the
# cores, for torch here and for the `sweep.py` processes its tests start: more threads than cores makes torch's
# OpenMP workers wait on each other, and tiny models gain nothing from a second thread anyway.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ["OMP_NUM_THREADS"] = str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # as `sweep.py` sets it

import pytest


@pytest.fixture(scope="session")
def tiny_cache_dir(tmp_path_factory) -> Path:
    """A data.cache_dir holding the tiny preset's tokenizer, trained once per test session (a few seconds)."""
    from critic.model import build_tiny_tokenizer

    path = tmp_path_factory.mktemp("critic-cache")
    build_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_cache_dir):
    from critic.model import build_tiny_tokenizer

    return build_tiny_tokenizer(tiny_cache_dir)


@pytest.fixture(scope="session")
def tiny_critic(tiny_cache_dir):
    """The tiny preset's initial critic (a real Qwen2 token-classification model); shared, so never train it."""
    from critic.config import ModelConfig
    from critic.model import load_base_critic

    return load_base_critic(ModelConfig(preset="tiny"), tiny_cache_dir)


@pytest.fixture(scope="module")
def postgres():
    """A real PostgreSQL server (benchmarks/servers.py) for one test module."""
    from benchmarks.servers import PostgresServer, postgres_bin

    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not installed; `.ci/run` installs them")
    server = PostgresServer(bin_dir).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Generation is many tiny steps: on shared CPU cores one thread is many times faster than several."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=[1, "all"], ids=["1thread", "allthreads"])
def torch_threads(request):
    """Run a numeric test at one torch thread and at all of them (tests/helpers.py THREAD_SETTINGS)."""
    import torch

    from tests.helpers import THREAD_SETTINGS

    threads = torch.get_num_threads()
    torch.set_num_threads(THREAD_SETTINGS[0] if request.param == 1 else THREAD_SETTINGS[1])
    yield torch.get_num_threads()
    torch.set_num_threads(threads)


# `make test` spreads the tests over pytest-xdist workers (`--dist loadgroup`), one test at a time, except that the
# tests sharing a module-scoped fixture (a server, a whole sweep) stay together on one worker so that it is built
# once. Work goes out in collection order (--no-loadscope-reorder), so the modules that run whole sweeps come first,
# longest first (`make test` prints the slowest tests: --durations), and the workers finish together.
LONG_FIRST = ("test_faults", "test_launchers", "test_scaleout", "test_confirm", "test_sweep", "test_bench_decision",
              "test_candidates", "test_distributed", "test_report", "test_cli_output", "test_diagnose")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))
    for item in items:
        fixtures = getattr(item, "_fixtureinfo", None)
        if fixtures and any(d.scope == "module" for defs in fixtures.name2fixturedefs.values() for d in defs):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
