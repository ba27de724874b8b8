"""A trained cell classifier saved as a folder (stardist-style).

The folder holds ``config.json``, ``weights.safetensors``, ``labels.json`` and ``metrics.json``.

The folder is built in a temporary sibling directory and renamed into place, so a reader never sees half a
bundle. Loading and :meth:`ClassifierBundle.predict_proba` are numpy-only (no torch needed to apply a
classifier); :meth:`ClassifierBundle.module` gives the torch :class:`~cytoken.classify.CellClassifier` when
wanted.

``config.json`` records the embedding width and the sha256 of the model whose tokens the classifier was
trained on; :func:`check_compatible` refuses a bundle used with other embeddings.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cytoken.types import CytokenError, default_colors

if TYPE_CHECKING:  # pragma: no cover
    from cytoken.classify.model import CellClassifier

__all__ = ["BUNDLE_FORMAT", "ClassifierBundle", "check_compatible", "load_bundle", "save_bundle"]

BUNDLE_FORMAT = "cytoken.cell_classifier"
BUNDLE_VERSION = 1
_KEYS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
_FILES = ("config.json", "weights.safetensors", "labels.json", "metrics.json")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class ClassifierBundle:
    """A loaded classifier folder.

    Attributes:
        path: the bundle folder.
        weights: float32 arrays ``fc1.weight`` (hidden, D), ``fc1.bias``, ``fc2.weight`` (C, hidden),
            ``fc2.bias``.
        class_names: names of output classes 0..C-1 (CellSet class ids 1..C).
        class_colors: RGB colour of each class.
        embedding_dim: input width D.
        embedding_model_sha256: sha256 of the model whose token embeddings the classifier expects.
        config: the whole ``config.json``.
        metrics: the whole ``metrics.json``.
    """

    path: Path
    weights: dict[str, np.ndarray]
    class_names: tuple[str, ...]
    class_colors: tuple[tuple[int, int, int], ...]
    embedding_dim: int
    embedding_model_sha256: str
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def hidden(self) -> int:
        """Hidden units."""
        return int(self.weights["fc1.weight"].shape[0])

    @property
    def num_classes(self) -> int:
        """Number of classes C."""
        return int(self.weights["fc2.weight"].shape[0])

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Softmax probabilities (N, C) float32 of embeddings (N, D), computed in numpy.

        Raises:
            CytokenError: when the embeddings' width differs from the bundle's.
        """
        a = np.asarray(x, np.float32)
        if a.ndim != 2 or a.shape[1] != self.embedding_dim:
            raise CytokenError(
                f"classifier bundle {self.path} expects (N, {self.embedding_dim}) embeddings, got shape {a.shape}"
            )
        w = self.weights
        hid = np.maximum(a @ w["fc1.weight"].T + w["fc1.bias"], 0.0)
        logits = hid @ w["fc2.weight"].T + w["fc2.bias"]
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    def predict_class_ids(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """CellSet class ids (1..C) and their probability for embeddings (N, D)."""
        p = self.predict_proba(x)
        idx = p.argmax(axis=1)
        return idx.astype(np.int64) + 1, p[np.arange(len(p)), idx]

    def module(self) -> CellClassifier:
        """The weights as a torch :class:`~cytoken.classify.CellClassifier` in eval mode."""
        import torch

        from cytoken.classify.model import CellClassifier

        state = {k: torch.from_numpy(np.array(v)) for k, v in self.weights.items()}
        return CellClassifier.from_state_dict(state).eval()


def _to_numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):
        v = v.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(v, dtype=np.float32))


def _state_of(classifier: Any) -> dict[str, np.ndarray]:
    sd = classifier if isinstance(classifier, Mapping) else classifier.state_dict
    if callable(sd):
        sd = sd()
    missing = [k for k in _KEYS if k not in sd]
    if missing:
        raise ValueError(f"classifier weights lack {missing}; expected keys {list(_KEYS)}")
    return {k: _to_numpy(sd[k]) for k in _KEYS}


def _check_sha(sha: str, what: str) -> str:
    if not isinstance(sha, str) or not _SHA256.match(sha):
        raise ValueError(f"{what} must be a sha256 (64 lower-case hex characters), got {sha!r}")
    return sha


def save_bundle(
    path: str | os.PathLike[str],
    classifier: Any,
    *,
    class_names: Sequence[str],
    class_colors: Sequence[tuple[int, int, int]] | None = None,
    config: Any = None,
    metrics: Any = None,
    embedding_model_sha256: str,
    embedding_dim: int,
    overwrite: bool = False,
) -> Path:
    """Write a classifier folder atomically (built in a temporary sibling folder, then renamed).

    Args:
        path: the bundle folder to create.
        classifier: a :class:`~cytoken.classify.TrainedClassifier`, a
            :class:`~cytoken.classify.CellClassifier` or a state dict with keys ``fc1.weight``, ``fc1.bias``,
            ``fc2.weight``, ``fc2.bias``.
        class_names: names of output classes 0..C-1.
        class_colors: RGB colours (default: cytoken's palette).
        config: the :class:`~cytoken.classify.TrainConfig` (or a dict) used; default: the classifier's own.
        metrics: a :class:`~cytoken.classify.ClassificationReport` or dict; default: the classifier's
            validation report.
        embedding_model_sha256: sha256 of the model whose token embeddings were used.
        embedding_dim: width of those embeddings.
        overwrite: replace an existing bundle at ``path``.

    Returns:
        The bundle folder.

    Raises:
        CytokenError: when ``path`` exists and ``overwrite`` is False.
        ValueError: when the weights disagree with ``embedding_dim`` or the number of class names.

    Example:
        >>> import tempfile
        >>> rng = np.random.default_rng(0)
        >>> sd = {"fc1.weight": rng.normal(size=(8, 4)), "fc1.bias": np.zeros(8),
        ...       "fc2.weight": rng.normal(size=(2, 8)), "fc2.bias": np.zeros(2)}
        >>> p = save_bundle(Path(tempfile.mkdtemp()) / "clf", sd, class_names=["a", "b"],
        ...                 embedding_model_sha256="0" * 64, embedding_dim=4)
        >>> sorted(f.name for f in p.iterdir())
        ['config.json', 'labels.json', 'metrics.json', 'weights.safetensors']
    """
    from safetensors.numpy import save_file

    target = Path(path)
    weights = _state_of(classifier)
    _check_sha(embedding_model_sha256, "embedding_model_sha256")
    hidden, dim = weights["fc1.weight"].shape
    n_classes = weights["fc2.weight"].shape[0]
    if dim != embedding_dim:
        raise ValueError(f"classifier weights take {dim}-d input but embedding_dim is {embedding_dim}")
    names = [str(n) for n in class_names]
    if len(names) != n_classes:
        raise ValueError(f"{len(names)} class names for a classifier with {n_classes} outputs")
    colors = [tuple(int(c) for c in rgb) for rgb in (class_colors or default_colors(n_classes))]
    if len(colors) != n_classes or any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in colors):
        raise ValueError(f"class_colors must be {n_classes} RGB triples with values 0..255, got {class_colors!r}")
    if config is None:
        config = getattr(classifier, "config", None)
    if metrics is None:
        metrics = getattr(classifier, "val_report", None)
    train_cfg = config.to_dict() if hasattr(config, "to_dict") else (dict(config) if config is not None else None)
    metrics_d = metrics.to_dict() if hasattr(metrics, "to_dict") else (dict(metrics) if metrics is not None else {})
    cfg_json = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "arch": "CellClassifier",
        "embedding_dim": int(dim),
        "hidden_dim": int(hidden),
        "num_classes": int(n_classes),
        "embedding_model_sha256": embedding_model_sha256,
        "train_config": train_cfg,
    }
    labels_json = {"class_names": names, "class_colors": [list(c) for c in colors]}

    if target.exists() and not overwrite:
        raise CytokenError(f"classifier bundle {target} already exists; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        save_file(weights, str(tmp / "weights.safetensors"), metadata={"format": BUNDLE_FORMAT})
        for name, obj in (
            ("config.json", cfg_json),
            ("labels.json", labels_json),
            ("metrics.json", metrics_d),
        ):
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
        if target.exists():
            trash = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            os.replace(target, trash / "old")
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_bundle(
    path: str | os.PathLike[str], *, model_sha256: str | None = None, embedding_dim: int | None = None
) -> ClassifierBundle:
    """Read a classifier folder written by :func:`save_bundle`.

    Args:
        path: the bundle folder.
        model_sha256: if given, the sha256 of the embedding model the caller will use (checked).
        embedding_dim: if given, the embedding width the caller will use (checked).

    Returns:
        A :class:`ClassifierBundle`.

    Raises:
        CytokenError: for a missing/invalid folder or file, or an incompatible model or dimension.
    """
    from safetensors.numpy import load_file

    root = Path(path)
    if not root.is_dir():
        raise CytokenError(f"classifier bundle {root} is not a folder")
    missing = [f for f in _FILES if not (root / f).is_file()]
    if missing:
        raise CytokenError(f"classifier bundle {root} lacks {', '.join(missing)}")
    try:
        cfg = json.loads((root / "config.json").read_text(encoding="utf-8"))
        labels = json.loads((root / "labels.json").read_text(encoding="utf-8"))
        metrics = json.loads((root / "metrics.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CytokenError(f"classifier bundle {root}: invalid JSON ({e})") from None
    if cfg.get("format") != BUNDLE_FORMAT:
        raise CytokenError(f"{root / 'config.json'} is not a cytoken classifier bundle (format {cfg.get('format')!r})")
    if int(cfg.get("version", 0)) > BUNDLE_VERSION:
        raise CytokenError(
            f"classifier bundle {root} has format version {cfg['version']}; this cytoken reads up to {BUNDLE_VERSION}"
        )
    weights = {k: np.asarray(v, np.float32) for k, v in load_file(str(root / "weights.safetensors")).items()}
    missing_w = [k for k in _KEYS if k not in weights]
    if missing_w:
        raise CytokenError(f"classifier bundle {root}: weights.safetensors lacks {missing_w}")
    dim = int(cfg["embedding_dim"])
    if weights["fc1.weight"].shape[1] != dim or weights["fc2.weight"].shape[0] != len(labels["class_names"]):
        raise CytokenError(
            f"classifier bundle {root}: weights {weights['fc1.weight'].shape}/{weights['fc2.weight'].shape} "
            f"disagree with embedding_dim {dim} and {len(labels['class_names'])} class names"
        )
    bundle = ClassifierBundle(
        path=root,
        weights=weights,
        class_names=tuple(labels["class_names"]),
        class_colors=tuple(tuple(int(v) for v in c) for c in labels.get("class_colors", [])),  # type: ignore[misc]
        embedding_dim=dim,
        embedding_model_sha256=str(cfg["embedding_model_sha256"]),
        config=cfg,
        metrics=metrics,
    )
    if model_sha256 is not None or embedding_dim is not None:
        check_compatible(bundle, model_sha256, embedding_dim)
    return bundle


def check_compatible(
    bundle: ClassifierBundle, model_sha256: str | None, dim: int | None, *, source: str | None = None
) -> None:
    """Raise when a bundle was trained on embeddings of another model or width (None skips that check).

    Args:
        bundle: the classifier.
        model_sha256: sha256 of the model whose embeddings it is about to classify.
        dim: their width.
        source: where those embeddings come from (a file or folder), named in the message; default "the current
            model".

    Raises:
        CytokenError: naming the bundle path, the bundle's value, the caller's value and ``source``.

    Example:
        >>> b = ClassifierBundle(Path("clf"), {}, (), (), 384, "a" * 64)
        >>> check_compatible(b, "a" * 64, 1280, source="set.npz")
        Traceback (most recent call last):
        ...
        cytoken.types.CytokenError: classifier bundle clf expects 384-d embeddings, but set.npz holds 1280-d ones
    """
    if dim is not None and int(dim) != bundle.embedding_dim:
        has = f"the current model gives {int(dim)}-d" if source is None else f"{source} holds {int(dim)}-d ones"
        raise CytokenError(f"classifier bundle {bundle.path} expects {bundle.embedding_dim}-d embeddings, but {has}")
    if model_sha256 is not None and model_sha256 != bundle.embedding_model_sha256:
        of = "the current model has" if source is None else f"{source} holds embeddings of model"
        raise CytokenError(
            f"classifier bundle {bundle.path} was trained on embeddings of model sha256 "
            f"{bundle.embedding_model_sha256}, but {of} sha256 {model_sha256}; "
            "retrain the classifier on this model's embeddings"
        )
