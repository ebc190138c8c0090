"""verl itself, for the fidelity tests: its config folder for Hydra and its pure critic-path functions.

verl is a test-only extra (requirements-verl.txt, installed `--no-deps` by `make install`). Its package
`__init__` imports ray for the distributed driver, which these tests never use, so verl's modules are
imported under a bare `verl` package that skips that `__init__`; the modules themselves are verl's, unchanged.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import types
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _verl_spec():
    spec = importlib.util.find_spec("verl")
    if spec is None or not spec.submodule_search_locations:
        reason = "verl is not installed: `make install` (or pip install --no-deps -r requirements-verl.txt)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    return spec


def verl_version() -> str:
    _verl_spec()
    return importlib.metadata.version("verl")


def verl_config_dir() -> Path:
    """The installed verl's trainer/config folder (ppo_trainer.yaml and its defaults)."""
    return Path(next(iter(_verl_spec().submodule_search_locations))) / "trainer" / "config"


def import_verl(name: str) -> types.ModuleType:
    """verl module `name` (e.g. verl.workers.utils.padding) without running verl/__init__.py."""
    spec = _verl_spec()
    if "verl" not in sys.modules:
        package = types.ModuleType("verl")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec  # find_spec("verl") keeps answering
        sys.modules["verl"] = package
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        reason = f"{name} cannot be imported ({exc}); install requirements-verl.txt with --no-deps"
        print(f"SKIP: {reason}")
        pytest.skip(reason)


def compose(config_dir: Path, overrides: list[str]):
    """verl's `ppo_trainer` config composed by Hydra with `overrides`, as `python -m verl.trainer.main_ppo` does."""
    try:
        from hydra import compose as hydra_compose
        from hydra import initialize_config_dir
    except ImportError:
        reason = "hydra-core is not installed: pip install --no-deps -r requirements-verl.txt"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return hydra_compose(config_name="ppo_trainer", overrides=overrides)
