import os
from pathlib import Path

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
