"""YAML config files read strictly: a key given twice in one mapping is an error, not "the last one wins".

PyYAML's ``safe_load`` silently keeps the last of two equal keys, so a config with two ``model:`` sections (easy to
make by pasting) would train a model nobody asked for. cytoken's own config files (training configs,
``--hover-config``) are read with :func:`read_yaml`. Keys merged in with ``<<: *anchor`` may still be overridden.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

__all__ = ["DuplicateKeyError", "read_yaml"]


class DuplicateKeyError(yaml.YAMLError):
    """A mapping in a YAML document names the same key twice."""


class _StrictLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses duplicate mapping keys (with the line of the second one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:  # the keys written here; a key merged in with `<<: *anchor` may be overridden
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
        line = key_node.start_mark.line + 1
        if key in seen:
            raise DuplicateKeyError(f"key {key!r} appears twice (lines {seen[key]} and {line})")
        seen[key] = line
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: str | Path) -> Any:
    r"""Parse one YAML (or JSON) file, refusing duplicate keys.

    Args:
        path: the file.

    Returns:
        The document (``None`` for an empty file).

    Raises:
        FileNotFoundError / OSError: the file cannot be read.
        yaml.YAMLError: invalid YAML, or a key repeated within one mapping (:class:`DuplicateKeyError`).

    Example:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "c.yaml"
        >>> _ = f.write_text("base: &b {lr: 0.1, seed: 1}\nrun: {<<: *b, lr: 0.2}\n")
        >>> read_yaml(f)["run"]
        {'lr': 0.2, 'seed': 1}
        >>> _ = f.write_text("lr: 0.1\nseed: 1\nlr: 0.2\n")
        >>> read_yaml(f)
        Traceback (most recent call last):
        ...
        cytoken.io.yamlfile.DuplicateKeyError: key 'lr' appears twice (lines 1 and 3)
    """
    return yaml.load(Path(path).read_text(), Loader=_StrictLoader)  # a SafeLoader subclass
