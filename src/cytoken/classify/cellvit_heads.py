"""Official CellViT++ cell classifiers (``LinearClassifier`` checkpoints) as cytoken classifier bundles.

A CellViT++ classifier checkpoint is a ``torch.save`` dict with ``arch`` = ``"LinearClassifier"``, ``epoch``,
``model_state_dict`` (``fc1.weight`` [hidden, D], ``fc1.bias``, ``fc2.weight`` [C, hidden], ``fc2.bias``) and a
``config`` flattened with ``.`` separators. The official loader takes D from ``fc1.weight``, the hidden width from
``model.hidden_dim`` (default 100), C from ``data.num_classes`` and the class names from ``data.label_map.<i>``
(see ``shared/reference/cellvit-checkpoints/FACTS.md``, section 6). The network is the same as cytoken's
:class:`~cytoken.classify.CellClassifier` (``fc1`` → ReLU → dropout → ``fc2``, softmax applied by the caller), so a
checkpoint converts to a bundle one-to-one.

Missing label map: the released NuCLS classifiers (``nucls_main.pth``, ``nucls_super.pth``) store none (the official
loader fails on them with a ``KeyError``). Conversion then refuses by default with an error saying how to proceed:
pass ``class_names`` (in output order), or ``missing_labels="generic"`` for ``class_1`` … ``class_C`` with a warning.
Guessing names would silently mislabel every cell. When a file has a label map it is used as stored (e.g.
``midog.pth`` says ``Hard-Negative`` where the repository's labels.yaml says ``Non-Mitotic``).

The released classifiers expect CellViT-SAM-H tokens (1280-d); a bundle records the sha256 of the segmentation
model whose tokens it expects, so the caller must name that model (:func:`cytoken.weights.file_sha256` of the
converted CellViT-SAM-H file it will use).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from cytoken.classify.bundle import save_bundle
from cytoken.types import CytokenError

__all__ = ["CellViTClassifier", "convert_cellvit_classifier", "read_cellvit_classifier"]

ARCH = "LinearClassifier"
DEFAULT_HIDDEN = 100  # LinearClassifier's constructor default, used by the official loader when the key is absent
_KEYS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
_LABEL_KEY = re.compile(r"^data\.label_map\.(-?\d+)$")


@dataclass(frozen=True)
class CellViTClassifier:
    """A CellViT++ ``LinearClassifier`` checkpoint, read and checked.

    Attributes:
        path: the checkpoint file.
        state: ``fc1.weight``, ``fc1.bias``, ``fc2.weight``, ``fc2.bias`` (float32).
        embed_dim: input token width D.
        hidden_dim: hidden units.
        num_classes: output classes C.
        label_map: ``{class index: name}`` from ``data.label_map.<i>``, or None when the file stores none.
        config: the flattened training config.
        epoch: the stored epoch, if any.
    """

    path: Path
    state: dict[str, torch.Tensor]
    embed_dim: int
    hidden_dim: int
    num_classes: int
    label_map: dict[int, str] | None
    config: dict[str, Any]
    epoch: int | None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``fc2(relu(fc1(x)))`` for embeddings (N, D), as the official model computes in eval mode."""
        s = self.state
        return torch.relu(x @ s["fc1.weight"].T + s["fc1.bias"]) @ s["fc2.weight"].T + s["fc2.bias"]


def _flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def read_cellvit_classifier(path: str | Path) -> CellViTClassifier:
    """Read an official CellViT++ classifier checkpoint (``torch.load(weights_only=True)``) and check its layout.

    Raises:
        CytokenError: unreadable file, another ``arch``, missing or extra weights, or sizes that disagree with the
            config's ``model.hidden_dim`` / ``data.num_classes`` or with each other; a label map that does not
            name exactly classes 0..C-1.

    Example:
        >>> ck = read_cellvit_classifier("consep.pth")  # doctest: +SKIP
        >>> ck.embed_dim, ck.hidden_dim, ck.label_map  # doctest: +SKIP
        (1280, 128, {0: 'Other', 1: 'Inflammatory', 2: 'Epithelial', 3: 'Spindle-Shaped'})
    """
    path = Path(path)
    if not path.is_file():
        raise CytokenError(f"CellViT classifier checkpoint not found: {path}")
    try:
        ck = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CytokenError(f"cannot read {path} as a CellViT++ classifier: {type(exc).__name__}: {exc}") from None
    if not isinstance(ck, Mapping) or "model_state_dict" not in ck:
        found = sorted(ck)[:10] if isinstance(ck, Mapping) else type(ck).__name__
        raise CytokenError(f"{path} is not a CellViT++ checkpoint (expected arch, model_state_dict, config; found "
                           f"{found})")  # fmt: skip
    if ck.get("arch") != ARCH:
        raise CytokenError(f"{path} holds arch {ck.get('arch')!r}, not a CellViT++ {ARCH} (cell classifier)")
    sd = ck["model_state_dict"]
    if set(sd) != set(_KEYS):
        raise CytokenError(f"{path}: classifier weights must be exactly {list(_KEYS)}, found {sorted(sd)}")
    state = {k: torch.as_tensor(sd[k]).float() for k in _KEYS}
    cfg = _flatten(ck.get("config") or {})
    hidden, dim = state["fc1.weight"].shape
    n_classes = state["fc2.weight"].shape[0]
    shapes_ok = (
        state["fc1.weight"].ndim == 2
        and tuple(state["fc1.bias"].shape) == (hidden,)
        and tuple(state["fc2.weight"].shape) == (n_classes, hidden)
        and tuple(state["fc2.bias"].shape) == (n_classes,)
    )
    if not shapes_ok:
        raise CytokenError(f"{path}: inconsistent weight shapes { ({k: tuple(v.shape) for k, v in state.items()}) }")
    cfg_hidden = int(cfg.get("model.hidden_dim", DEFAULT_HIDDEN))
    if cfg_hidden != hidden:
        raise CytokenError(f"{path}: config model.hidden_dim={cfg_hidden} but fc1 has {hidden} units")
    if "data.num_classes" in cfg and int(cfg["data.num_classes"]) != n_classes:
        raise CytokenError(f"{path}: config data.num_classes={cfg['data.num_classes']} but fc2 has {n_classes} outputs")
    labels = {int(m.group(1)): str(v) for k, v in cfg.items() if (m := _LABEL_KEY.match(str(k)))}
    if labels and set(labels) != set(range(n_classes)):
        raise CytokenError(f"{path}: data.label_map names classes {sorted(labels)}, expected 0..{n_classes - 1}")
    epoch = ck.get("epoch")
    return CellViTClassifier(
        path=path,
        state=state,
        embed_dim=int(dim),
        hidden_dim=int(hidden),
        num_classes=int(n_classes),
        label_map=dict(sorted(labels.items())) or None,
        config=cfg,
        epoch=int(epoch) if isinstance(epoch, int) else None,
    )


def _class_names(
    ck: CellViTClassifier, class_names: Sequence[str] | None, missing_labels: Literal["error", "generic"]
) -> tuple[list[str], str]:
    if class_names is not None:
        names = [str(n) for n in class_names]
        if len(names) != ck.num_classes:
            raise ValueError(f"{len(names)} class_names for a classifier with {ck.num_classes} outputs ({ck.path})")
        return names, "class_names argument"
    if ck.label_map is not None:
        return [ck.label_map[i] for i in range(ck.num_classes)], "checkpoint data.label_map"
    if missing_labels == "generic":
        warnings.warn(
            f"{ck.path} stores no label map; its {ck.num_classes} classes are named class_1 … class_{ck.num_classes}",
            UserWarning,
            stacklevel=3,
        )
        return [f"class_{i}" for i in range(1, ck.num_classes + 1)], "generic (no label map in checkpoint)"
    if missing_labels != "error":
        raise ValueError(f"missing_labels must be 'error' or 'generic', got {missing_labels!r}")
    raise CytokenError(
        f"{ck.path} stores no label map (no data.label_map.* in its config; the released NuCLS classifiers are like "
        f"this), so its {ck.num_classes} outputs have no names. Pass class_names=[...] ({ck.num_classes} names in "
        "output order) or missing_labels='generic' (class_1 …, with a warning)"
    )


def convert_cellvit_classifier(
    path: str | Path,
    out_dir: str | Path,
    *,
    embedding_model_sha256: str,
    class_names: Sequence[str] | None = None,
    missing_labels: Literal["error", "generic"] = "error",
    class_colors: Sequence[tuple[int, int, int]] | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert an official CellViT++ classifier checkpoint to a cytoken classifier bundle folder.

    Args:
        path: the ``.pth`` checkpoint.
        out_dir: the bundle folder to write.
        embedding_model_sha256: sha256 of the segmentation model whose tokens the classifier will receive (for the
            released classifiers: the CellViT-SAM-H model file you use, e.g. ``cytoken.weights.file_sha256(p)``).
        class_names: names of the C outputs in order (override the stored label map; required when there is none,
            unless ``missing_labels="generic"``).
        missing_labels: ``"error"`` (default) or ``"generic"`` when the file has no label map and no
            ``class_names`` are given.
        class_colors: RGB colours of the classes (default palette).
        overwrite: replace an existing bundle.

    Returns:
        The bundle folder (load it with :func:`~cytoken.classify.load_bundle`).

    Raises:
        CytokenError: bad checkpoint (see :func:`read_cellvit_classifier`) or no label map with
            ``missing_labels="error"``.

    Example:
        >>> sha = "0" * 64  # the sha256 of the CellViT-SAM-H model file whose tokens you will classify
        >>> b = convert_cellvit_classifier("consep.pth", "consep", embedding_model_sha256=sha)  # doctest: +SKIP
        >>> load_bundle(b).class_names  # doctest: +SKIP
        ('Other', 'Inflammatory', 'Epithelial', 'Spindle-Shaped')
    """
    from cytoken.weights import file_sha256

    ck = read_cellvit_classifier(path)
    names, source = _class_names(ck, class_names, missing_labels)
    provenance = {
        "source": f"CellViT++ {ARCH} checkpoint",
        "file": ck.path.name,
        "file_sha256": file_sha256(ck.path),
        "epoch": ck.epoch,
        "dataset": ck.config.get("data.dataset"),
        "network_name": ck.config.get("data.network_name"),
        "hidden_dim": ck.hidden_dim,
        "class_names_from": source,
    }
    return save_bundle(
        out_dir,
        ck.state,
        class_names=names,
        class_colors=class_colors,
        config=provenance,
        metrics={},
        embedding_model_sha256=embedding_model_sha256,
        embedding_dim=ck.embed_dim,
        overwrite=overwrite,
    )
