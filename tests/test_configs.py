"""The example training configs shipped in ``configs/`` are valid: every key known, every value in range."""

from pathlib import Path

import pytest

from cytoken.training.config import load_train_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_example_configs() -> None:
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_loads(path: Path) -> None:
    cfg = load_train_config(path)
    assert cfg.data and cfg.epochs >= 1
