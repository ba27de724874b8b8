"""Metrics for the cell classifier: rank-based AUROC, precision/recall/F1, confusion matrix and its plot.

Numpy only (matplotlib optional for :func:`plot_confusion`, with a Pillow fallback). Class indices are 0-based
here: index ``i`` is ``class_names[i]`` (CellSet class id ``i + 1``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "ClassificationReport",
    "auroc_per_class",
    "confusion_matrix",
    "evaluate",
    "macro_auroc",
    "plot_confusion",
]


def _average_ranks(a: np.ndarray) -> np.ndarray:
    """1-based ranks along the last axis of a 2-D array, ties getting their average rank."""
    r, n = a.shape
    order = np.argsort(a, axis=1, kind="stable")
    s = np.take_along_axis(a, order, axis=1)
    new = np.ones((r, n), bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]  # column 0 starts a group, so groups never span rows
    gid = np.cumsum(new.ravel()) - 1
    pos = np.tile(np.arange(n, dtype=np.float64), r)
    mean_pos = np.bincount(gid, weights=pos) / np.bincount(gid)
    ranks = np.empty((r, n), np.float64)
    np.put_along_axis(ranks, order, (mean_pos[gid] + 1.0).reshape(r, n), axis=1)
    return ranks


def auroc_per_class(y_true: np.ndarray | Sequence[int], scores: np.ndarray) -> np.ndarray:
    """One-vs-rest AUROC of each class, from ranks (Mann-Whitney U; ties count one half).

    Args:
        y_true: (N,) integer class indices 0..C-1.
        scores: (N, C) class scores (probabilities or logits), or (K, N, C) for K models at once.

    Returns:
        (C,) or (K, C) float64 AUROC; NaN for a class with no positive or no negative example.

    Example:
        >>> auroc_per_class([0, 1, 1], np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8]])).tolist()
        [1.0, 1.0]
    """
    y = np.asarray(y_true).reshape(-1)
    s = np.asarray(scores, dtype=np.float64)
    single = s.ndim == 2
    if single:
        s = s[None]
    if s.ndim != 3 or s.shape[1] != len(y):
        raise ValueError(f"scores must be (N, C) or (K, N, C) with N = len(y_true) = {len(y)}, got {np.shape(scores)}")
    k, n, c = s.shape
    ranks = _average_ranks(np.ascontiguousarray(s.transpose(0, 2, 1)).reshape(k * c, n)).reshape(k, c, n)
    pos = y[None, :] == np.arange(c)[:, None]  # (C, N)
    n_pos = pos.sum(1).astype(np.float64)
    n_neg = n - n_pos
    rank_sum = np.einsum("kcn,cn->kc", ranks, pos.astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    auc[:, (n_pos == 0) | (n_neg == 0)] = np.nan
    return auc[0] if single else auc


def macro_auroc(y_true: np.ndarray | Sequence[int], scores: np.ndarray) -> float | np.ndarray:
    """Macro one-vs-rest AUROC: the mean over classes with both positives and negatives.

    Matches ``sklearn.metrics.roc_auc_score(y, p, multi_class="ovr", average="macro")`` for probabilities that
    sum to one, and the plain binary AUROC when ``scores`` is 1-D (the positive class score, labels 0/1).

    Args:
        y_true: (N,) integer class indices.
        scores: (N,) binary scores, (N, C) class scores, or (K, N, C) for K models.

    Returns:
        A float, or (K,) array for stacked models; NaN when no class is defined.

    Example:
        >>> macro_auroc([0, 0, 1, 1], np.array([0.1, 0.4, 0.35, 0.8]))
        0.75
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        y = np.asarray(y_true).reshape(-1)
        return float(auroc_per_class((y > 0).astype(np.int64), np.stack([-s, s], axis=1))[1])
    per = auroc_per_class(y_true, s)
    with np.errstate(invalid="ignore"):
        defined = ~np.isnan(per)
        val = np.where(defined, per, 0.0).sum(-1) / np.maximum(defined.sum(-1), 1)
        val = np.where(defined.any(-1), val, np.nan)
    return float(val) if per.ndim == 1 else val


def confusion_matrix(
    y_true: np.ndarray | Sequence[int], y_pred: np.ndarray | Sequence[int], num_classes: int
) -> np.ndarray:
    """(C, C) counts, rows = true class, columns = predicted class.

    Example:
        >>> confusion_matrix([0, 1, 1], [0, 0, 1], 2).tolist()
        [[1, 0], [1, 1]]
    """
    t = np.asarray(y_true, np.int64).reshape(-1)
    p = np.asarray(y_pred, np.int64).reshape(-1)
    if len(t) != len(p):
        raise ValueError(f"y_true has {len(t)} entries but y_pred has {len(p)}")
    for name, a in (("y_true", t), ("y_pred", p)):
        if len(a) and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} must hold class indices 0..{num_classes - 1}, got range {a.min()}..{a.max()}")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


@dataclass(frozen=True)
class ClassificationReport:
    """Per-class and summary metrics of a classifier on one labelled set.

    Attributes:
        class_names: names of classes 0..C-1.
        precision: (C,) precision (0 where the class was never predicted).
        recall: (C,) recall (0 where the class has no example).
        f1: (C,) F1.
        support: (C,) number of true examples.
        auroc: (C,) one-vs-rest AUROC (NaN where undefined).
        macro_f1: unweighted mean F1.
        weighted_f1: support-weighted mean F1.
        accuracy: fraction correct.
        macro_auroc: mean of the defined per-class AUROCs.
        confusion: (C, C) counts, rows true, columns predicted.
    """

    class_names: tuple[str, ...]
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray
    auroc: np.ndarray
    macro_f1: float
    weighted_f1: float
    accuracy: float
    macro_auroc: float
    confusion: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN written as None)."""

        def clean(v: float) -> float | None:
            return None if not np.isfinite(v) else float(v)

        return {
            "accuracy": clean(self.accuracy),
            "macro_f1": clean(self.macro_f1),
            "weighted_f1": clean(self.weighted_f1),
            "macro_auroc": clean(self.macro_auroc),
            "per_class": {
                name: {
                    "precision": clean(self.precision[i]),
                    "recall": clean(self.recall[i]),
                    "f1": clean(self.f1[i]),
                    "support": int(self.support[i]),
                    "auroc": clean(self.auroc[i]),
                }
                for i, name in enumerate(self.class_names)
            },
            "confusion": self.confusion.tolist(),
            "class_names": list(self.class_names),
        }


def evaluate(
    y_true: np.ndarray | Sequence[int], proba: np.ndarray, class_names: Sequence[str] | None = None
) -> ClassificationReport:
    """Precision/recall/F1 per class, macro and weighted F1, accuracy, AUROC and the confusion matrix.

    Args:
        y_true: (N,) class indices 0..C-1.
        proba: (N, C) class probabilities (the prediction is their argmax).
        class_names: names of the C classes (default ``"0".."C-1"``).

    Returns:
        A :class:`ClassificationReport`.

    Example:
        >>> r = evaluate([0, 1, 1], np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]]), ["a", "b"])
        >>> round(r.macro_f1, 3), r.confusion.tolist()
        (0.667, [[1, 0], [1, 1]])
    """
    p = np.asarray(proba, np.float64)
    if p.ndim != 2:
        raise ValueError(f"proba must be (N, C), got shape {p.shape}")
    c = p.shape[1]
    names = tuple(class_names) if class_names is not None else tuple(str(i) for i in range(c))
    if len(names) != c:
        raise ValueError(f"{len(names)} class names for {c} probability columns")
    y = np.asarray(y_true, np.int64).reshape(-1)
    cm = confusion_matrix(y, p.argmax(1), c)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(1)
    predicted = cm.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    n = max(int(support.sum()), 1)
    return ClassificationReport(
        class_names=names,
        precision=precision,
        recall=recall,
        f1=f1,
        support=support,
        auroc=auroc_per_class(y, p),
        macro_f1=float(f1.mean()),
        weighted_f1=float((f1 * support).sum() / n),
        accuracy=float(tp.sum() / n),
        macro_auroc=float(macro_auroc(y, p)),
        confusion=cm,
    )


def plot_confusion(
    matrix: np.ndarray,
    names: Sequence[str],
    path: str | os.PathLike[str],
    *,
    normalize: bool = True,
    backend: Literal["auto", "matplotlib", "pil"] = "auto",
) -> Path:
    """Write a confusion matrix as a PNG (rows true, columns predicted; colour = row-normalised fraction).

    Uses matplotlib when installed (``backend="auto"``), otherwise a plain Pillow rendering.

    Args:
        matrix: (C, C) counts.
        names: class names.
        path: output ``.png`` path.
        normalize: colour and annotate by the fraction of each true class instead of raw counts.
        backend: ``"auto"``, ``"matplotlib"`` or ``"pil"``.

    Returns:
        The written path.

    Example:
        >>> import tempfile
        >>> p = plot_confusion(np.array([[3, 1], [0, 4]]), ["a", "b"], Path(tempfile.mkdtemp()) / "cm.png")
        >>> p.exists()
        True
    """
    m = np.asarray(matrix, np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(names):
        raise ValueError(f"matrix must be (C, C) with C = len(names) = {len(names)}, got {m.shape}")
    if backend not in ("auto", "matplotlib", "pil"):
        raise ValueError(f"backend must be 'auto', 'matplotlib' or 'pil', got {backend!r}")
    frac = m / np.maximum(m.sum(1, keepdims=True), 1)
    shown = frac if normalize else m
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if backend in ("auto", "matplotlib"):
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            if backend == "matplotlib":
                raise ImportError(
                    "plot_confusion(backend='matplotlib') needs matplotlib: pip install matplotlib"
                ) from None
        else:
            c = len(names)
            fig, ax = plt.subplots(figsize=(1.0 + 0.6 * c, 1.0 + 0.6 * c))
            ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
            ax.set_xticks(range(c), names, rotation=45, ha="right")
            ax.set_yticks(range(c), names)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
            for i in range(c):
                for j in range(c):
                    txt = f"{shown[i, j]:.2f}" if normalize else str(int(m[i, j]))
                    ax.text(j, i, txt, ha="center", va="center", color="white" if frac[i, j] > 0.5 else "black")
            fig.tight_layout()
            fig.savefig(out, dpi=100)
            plt.close(fig)
            return out
    _plot_confusion_pil(m, frac, shown, list(names), out, normalize)
    return out


def _plot_confusion_pil(
    m: np.ndarray, frac: np.ndarray, shown: np.ndarray, names: list[str], out: Path, normalize: bool
) -> None:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    c = len(names)
    cell = 56
    label_w = 8 + 7 * max(len(n) for n in names)
    left, top = label_w + 20, label_w + 20
    img = Image.new("RGB", (left + c * cell + 10, top + c * cell + 10), "white")
    draw = ImageDraw.Draw(img)
    for i in range(c):
        for j in range(c):
            f = float(frac[i, j])
            col = (int(255 - 225 * f), int(255 - 155 * f), int(255 - 60 * f))
            x0, y0 = left + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=col, outline=(200, 200, 200))
            txt = f"{shown[i, j]:.2f}" if normalize else str(int(m[i, j]))
            draw.text((x0 + 8, y0 + cell // 2 - 5), txt, fill="white" if f > 0.5 else "black", font=font)
        draw.text((8, top + i * cell + cell // 2 - 5), names[i], fill="black", font=font)
        # column names, written horizontally then rotated upright
        lab = Image.new("RGB", (label_w, 14), "white")
        ImageDraw.Draw(lab).text((2, 1), names[i], fill="black", font=font)
        lab = lab.rotate(90, expand=True)
        img.paste(lab, (left + i * cell + cell // 2 - 7, top - label_w - 4))
    draw.text((left, 4), "true (rows) vs predicted (columns)", fill="black", font=font)
    img.save(out, format="PNG")
