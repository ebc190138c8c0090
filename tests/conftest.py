import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bare `helpers`, `sweep_helpers`, `pg` imports

import pytest  # noqa: E402


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
