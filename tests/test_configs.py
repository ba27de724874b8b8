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


def test_config_files_refuse_repeated_keys_but_allow_merge_overrides(tmp_path: Path) -> None:
    import yaml

    from cytoken.io.yamlfile import DuplicateKeyError, read_yaml

    f = tmp_path / "c.yaml"
    f.write_text("base: &b {lr: 0.1, seed: 1}\nrun:\n  <<: *b\n  lr: 0.2\n")
    assert read_yaml(f)["run"] == {"lr": 0.2, "seed": 1}
    f.write_text("run:\n  lr: 0.1\n  nested: {a: 1, a: 2}\n")
    with pytest.raises(DuplicateKeyError, match=r"key 'a' appears twice \(lines 3 and 3\)"):
        read_yaml(f)
    assert issubclass(DuplicateKeyError, yaml.YAMLError)
    f.write_text("")
    assert read_yaml(f) is None
