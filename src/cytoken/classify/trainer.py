"""Train the cell classifier on cached embeddings.

Two trainers share one recipe (initial weights, batch order and dropout masks all drawn from a generator
seeded by ``TrainConfig.seed``; AdamW; optional exponential decay per epoch; early stopping on validation
macro AUROC, keeping the best epoch's weights):

* :func:`train_classifier` trains one :class:`CellClassifier` with ``torch.optim.AdamW`` - the plain
  reference;
* :func:`train_many` trains many configurations in one vectorised pass: configurations that share hidden
  size, batch size, seed, dropout and class balancing are stacked into (K, ...) weight tensors, run through
  one matmul for all first layers and one block-diagonal matmul for all second layers per step, and updated
  by a per-model AdamW (each model its own lr, weight decay and schedule). Models that stop (early stopping,
  pruning) leave the stack, so the pass gets cheaper as it goes.

Given the same configuration both give the same weights up to float rounding (tested).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from cytoken.classify.config import TrainConfig
from cytoken.classify.evaluation import ClassificationReport, auroc_per_class, evaluate
from cytoken.classify.model import CellClassifier, init_parameters

__all__ = ["EpochCallback", "TrainedClassifier", "train_classifier", "train_many"]

Status = Literal["completed", "early_stopped", "pruned", "diverged"]
Precision = Literal["float32", "bfloat16"]
EpochCallback = Callable[[list[int], int, np.ndarray], "np.ndarray | None"]
"""``on_epoch(config_indices, epoch, val_aurocs) -> prune_mask``: called after every epoch (1-based) with the
models still training; return a boolean array (True = stop that model now, status "pruned") or None."""

_BETAS = (0.9, 0.999)
_EPS = 1e-8
_EVAL_CHUNK = 4096


@dataclass
class TrainedClassifier:
    """Result of one training run.

    Attributes:
        state_dict: weights of the best epoch (``fc1.weight``, ``fc1.bias``, ``fc2.weight``, ``fc2.bias``).
        config: the configuration trained.
        history: one dict per epoch: ``epoch`` (1-based), ``lr``, ``train_loss``, ``val_auroc``.
        best_epoch: epoch whose weights were kept (0 when no epoch gave a finite AUROC; then the last
            weights).
        val_auroc: validation macro AUROC of the kept weights.
        status: ``"completed"``, ``"early_stopped"``, ``"pruned"`` or ``"diverged"`` (non-finite loss).
        val_report: full validation metrics of the kept weights, when requested.
    """

    state_dict: dict[str, torch.Tensor]
    config: TrainConfig
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    val_auroc: float = float("nan")
    status: Status = "completed"
    val_report: ClassificationReport | None = None

    @property
    def embed_dim(self) -> int:
        """Input width D."""
        return int(self.state_dict["fc1.weight"].shape[1])

    @property
    def num_classes(self) -> int:
        """Number of output classes C."""
        return int(self.state_dict["fc2.weight"].shape[0])

    def module(self) -> CellClassifier:
        """The weights as a :class:`CellClassifier` in eval mode."""
        return CellClassifier.from_state_dict(self.state_dict, dropout=self.config.dropout).eval()

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Softmax probabilities (N, C) float32 for embeddings (N, D)."""
        xt = _as_float_tensor(x, "X")
        if xt.shape[1] != self.embed_dim:
            raise ValueError(f"embeddings have dimension {xt.shape[1]}, this classifier expects {self.embed_dim}")
        with torch.no_grad():
            return torch.softmax(self.module()(xt), dim=1).numpy()


# ------------------------------------------------------------ data


@dataclass
class _Data:
    x: torch.Tensor
    y: torch.Tensor
    xv: torch.Tensor
    yv: np.ndarray
    num_classes: int
    counts: torch.Tensor
    _x_bf16: torch.Tensor | None = None
    _xv_bf16: torch.Tensor | None = None

    def compute_x(self, bf16: bool) -> torch.Tensor:
        if not bf16:
            return self.x
        if self._x_bf16 is None:
            self._x_bf16 = self.x.to(torch.bfloat16)
        return self._x_bf16

    def compute_xv(self, bf16: bool) -> torch.Tensor:
        if not bf16:
            return self.xv
        if self._xv_bf16 is None:
            self._xv_bf16 = self.xv.to(torch.bfloat16)
        return self._xv_bf16

    def class_weights(self) -> torch.Tensor:
        return len(self.y) / (self.num_classes * self.counts.to(torch.float32))

    def sample_weights(self) -> torch.Tensor:
        return 1.0 / self.counts.to(torch.float64)[self.y]


def _as_float_tensor(a: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    arr = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) embedding array, got shape {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return torch.from_numpy(arr)


def _prepare(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    num_classes: int | None,
) -> _Data:
    x = _as_float_tensor(x_train, "X_train")
    xv = _as_float_tensor(x_val, "X_val")
    if x.shape[1] != xv.shape[1]:
        raise ValueError(f"X_train has dimension {x.shape[1]} but X_val has {xv.shape[1]}")
    y = np.asarray(y_train).reshape(-1)
    yv = np.asarray(y_val).reshape(-1)
    for name, lab, feats in (("y_train", y, x), ("y_val", yv, xv)):
        if len(lab) != len(feats):
            raise ValueError(f"{name} has {len(lab)} labels for {len(feats)} embeddings")
        if not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"{name} must hold integer class indices 0..C-1, got dtype {lab.dtype}")
    c = int(max(y.max(initial=-1), yv.max(initial=-1)) + 1) if num_classes is None else int(num_classes)
    if c < 2:
        raise ValueError(f"need at least 2 classes, got num_classes={c}")
    for name, lab in (("y_train", y), ("y_val", yv)):
        if len(lab) and (lab.min() < 0 or lab.max() >= c):
            raise ValueError(f"{name} must hold class indices 0..{c - 1}, got range {lab.min()}..{lab.max()}")
    counts = np.bincount(y, minlength=c)
    if (counts == 0).any():
        raise ValueError(f"classes {np.flatnonzero(counts == 0).tolist()} have no training example")
    if len(np.unique(yv)) < 2:
        raise ValueError("the validation set needs examples of at least 2 classes to compute AUROC")
    return _Data(x, torch.from_numpy(y.astype(np.int64)), xv, yv.astype(np.int64), c, torch.from_numpy(counts))


def _epoch_order(n: int, cfg: TrainConfig, g: torch.Generator, data: _Data) -> torch.Tensor:
    if cfg.class_balance == "sampler":
        return torch.multinomial(data.sample_weights(), n, replacement=True, generator=g)
    return torch.randperm(n, generator=g)


def _dropout_mask(b: int, h: int, p: float, g: torch.Generator) -> torch.Tensor | None:
    if p == 0:
        return None
    return (torch.rand(b, h, generator=g) >= p).to(torch.float32) / (1.0 - p)


# ------------------------------------------------------------ single model


def train_classifier(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    config: TrainConfig | None = None,
    *,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
) -> TrainedClassifier:
    """Train one :class:`CellClassifier` with ``torch.optim.AdamW``; keep the best validation epoch.

    Args:
        X_train: (N, D) training embeddings.
        y_train: (N,) class indices 0..C-1.
        X_val: (M, D) validation embeddings.
        y_val: (M,) class indices.
        config: hyper-parameters (default ``TrainConfig()``).
        num_classes: C (default: 1 + the largest label).
        class_names: names for the validation report.

    Returns:
        A :class:`TrainedClassifier` with the history and a validation :class:`ClassificationReport`.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> y = rng.integers(0, 2, 200); X = rng.normal(size=(200, 8)) + y[:, None] * 2.0
        >>> cfg = TrainConfig(hidden=16, lr=1e-2, epochs=5)
        >>> res = train_classifier(X[:150], y[:150], X[150:], y[150:], cfg)
        >>> res.val_auroc > 0.95
        True
    """
    cfg = config or TrainConfig()
    data = _prepare(X_train, y_train, X_val, y_val, num_classes)
    d, c = data.x.shape[1], data.num_classes
    g = torch.Generator().manual_seed(int(cfg.seed))
    model = CellClassifier(d, cfg.hidden, c, dropout=cfg.dropout)
    model.load_state_dict(init_parameters(d, cfg.hidden, c, g))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=_BETAS, eps=_EPS)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, cfg.gamma) if cfg.schedule == "exponential" else None
    weight = data.class_weights() if cfg.class_balance == "loss_weights" else None

    history: list[dict[str, float]] = []
    best, best_epoch, wait = -math.inf, 0, 0
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    status: Status = "completed"
    for epoch in range(1, cfg.epochs + 1):
        lr_now = opt.param_groups[0]["lr"]
        model.train()
        losses = []
        for idx in _epoch_order(len(data.y), cfg, g, data).split(cfg.batch_size):
            hid = model.act(model.fc1(data.x[idx]))
            mask = _dropout_mask(len(idx), cfg.hidden, cfg.dropout, g)
            logits = model.fc2(hid if mask is None else hid * mask)
            loss = F.cross_entropy(logits, data.y[idx], weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        if sched is not None:
            sched.step()
        train_loss = float(np.mean(losses))
        model.eval()
        with torch.no_grad():
            proba = torch.softmax(model(data.xv), dim=1).numpy()
        auc = _macro(auroc_per_class(data.yv, proba))
        history.append({"epoch": epoch, "lr": lr_now, "train_loss": train_loss, "val_auroc": auc})
        if not math.isfinite(train_loss):
            status = "diverged"
            break
        if math.isfinite(auc) and auc > best:
            best, best_epoch, wait = auc, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            wait += 1
            if cfg.patience is not None and wait >= cfg.patience and epoch < cfg.epochs:
                status = "early_stopped"
                break
    if best_epoch == 0:
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result = TrainedClassifier(best_state, cfg, history, best_epoch, best if best_epoch else math.nan, status)
    result.val_report = evaluate(data.yv, result.predict_proba(data.xv.numpy()), _names(class_names, c))
    return result


def _macro(per_class: np.ndarray) -> float:
    ok = ~np.isnan(per_class)
    return float(per_class[ok].mean()) if ok.any() else math.nan


def _names(class_names: Sequence[str] | None, c: int) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(c)]
    if len(class_names) != c:
        raise ValueError(f"{len(class_names)} class names for {c} classes")
    return list(class_names)


# ------------------------------------------------------------ many models


class _Stack:
    """K models of one hidden size trained in lock-step (shared seed, batches and dropout masks)."""

    def __init__(
        self, data: _Data, configs: list[TrainConfig], indices: list[int], precision: Precision = "float32"
    ) -> None:
        cfg = configs[0]
        self.bf16 = precision == "bfloat16"
        self.cfg, self.indices, self.data = cfg, list(indices), data
        k, d, c = len(configs), data.x.shape[1], data.num_classes
        self.g = torch.Generator().manual_seed(int(cfg.seed))
        init = init_parameters(d, cfg.hidden, c, self.g)
        self.params = [init[n].unsqueeze(0).repeat(k, *([1] * init[n].ndim)) for n in _KEYS]
        for p in self.params:
            p.requires_grad_(True)
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.best = [p.detach().clone() for p in self.params]
        self.lr0 = torch.tensor([x.lr for x in configs], dtype=torch.float32)
        self.wd = torch.tensor([x.weight_decay for x in configs], dtype=torch.float32)
        self.gamma = torch.tensor([x.gamma if x.schedule == "exponential" else 1.0 for x in configs])
        self.configs = list(configs)
        self.best_auc = np.full(k, -np.inf)
        self.best_epoch = np.zeros(k, np.int64)
        self.wait = np.zeros(k, np.int64)
        self.history: list[list[dict[str, float]]] = [[] for _ in range(k)]
        self.step = 0
        self.weight = data.class_weights() if cfg.class_balance == "loss_weights" else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Logits (B, K, C) of all K models; ``x`` is already in the compute dtype."""
        w1, b1, w2, b2 = self.params
        k, h, d = w1.shape
        dt = x.dtype
        hid = torch.relu(torch.addmm(b1.reshape(1, k * h).to(dt), x, w1.reshape(k * h, d).t().to(dt)))
        if mask is not None:
            hid = (hid.view(len(x), k, h) * mask.to(dt)[:, None, :]).view(len(x), k * h)
        # second layer of all models as one matmul with a block-diagonal (K*C, K*H) weight: no strided copies
        logits = hid @ torch.block_diag(*w2.to(dt).unbind(0)).t()
        return logits.float().view(len(x), k, -1) + b2

    def train_epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        lr = self.lr0 * self.gamma ** (epoch - 1)
        k = len(self.configs)
        loss_sum = torch.zeros(k)
        n_batches = 0
        x_all = self.data.compute_x(self.bf16)
        for idx in _epoch_order(len(self.data.y), self.cfg, self.g, self.data).split(self.cfg.batch_size):
            yb = self.data.y[idx]
            mask = _dropout_mask(len(idx), self.cfg.hidden, self.cfg.dropout, self.g)
            logits = self.forward(x_all[idx], mask)  # (B, K, C)
            flat = logits.reshape(-1, logits.shape[-1])  # row b * K + k
            ce = F.cross_entropy(flat, yb.repeat_interleave(k), reduction="none").view(-1, k)
            if self.weight is None:
                per_model = ce.mean(0)
            else:
                wy = self.weight[yb]
                per_model = (ce * wy[:, None]).sum(0) / wy.sum()
            for p in self.params:
                p.grad = None
            per_model.sum().backward()
            self._adamw(lr)
            loss_sum += per_model.detach()
            n_batches += 1
        return lr.numpy().astype(np.float64), (loss_sum / max(n_batches, 1)).numpy().astype(np.float64)

    @torch.no_grad()
    def _adamw(self, lr: torch.Tensor) -> None:
        self.step += 1
        b1, b2 = _BETAS
        bc1 = 1 - b1**self.step
        bc2_sqrt = math.sqrt(1 - b2**self.step)
        for p, m, v in zip(self.params, self.m, self.v):
            shape = (-1,) + (1,) * (p.ndim - 1)
            lr_v = lr.view(shape)
            grad = p.grad
            p.mul_(1 - lr_v * self.wd.view(shape))
            m.mul_(b1).add_(grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            denom = (v.sqrt() / bc2_sqrt).add_(_EPS)
            p.sub_((lr_v / bc1) * m / denom)

    @torch.no_grad()
    def val_proba(self) -> np.ndarray:
        """Validation probabilities (K, M, C)."""
        out = [
            torch.softmax(self.forward(x, None), dim=2).transpose(0, 1)
            for x in self.data.compute_xv(self.bf16).split(_EVAL_CHUNK)
        ]
        return torch.cat(out, dim=1).numpy()

    def keep(self, keep: np.ndarray) -> None:
        sel = torch.from_numpy(np.flatnonzero(keep))
        self.params = [p.detach()[sel].clone().requires_grad_(True) for p in self.params]
        self.m = [t[sel] for t in self.m]
        self.v = [t[sel] for t in self.v]
        self.best = [t[sel] for t in self.best]
        self.lr0, self.wd, self.gamma = self.lr0[sel], self.wd[sel], self.gamma[sel]
        idx = np.flatnonzero(keep)
        self.configs = [self.configs[i] for i in idx]
        self.indices = [self.indices[i] for i in idx]
        self.history = [self.history[i] for i in idx]
        self.best_auc, self.best_epoch, self.wait = self.best_auc[idx], self.best_epoch[idx], self.wait[idx]


_KEYS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


def _group_key(cfg: TrainConfig) -> tuple[object, ...]:
    return (cfg.hidden, cfg.batch_size, cfg.seed, cfg.dropout, cfg.class_balance)


def train_many(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    configs: Sequence[TrainConfig],
    *,
    num_classes: int | None = None,
    on_epoch: EpochCallback | None = None,
    with_report: bool = False,
    class_names: Sequence[str] | None = None,
    max_models_per_pass: int = 16,
    precision: Precision = "float32",
) -> list[TrainedClassifier]:
    """Train many configurations at once, vectorised over models (the engine of the hyper-parameter search).

    Configurations with the same ``(hidden, batch_size, seed, dropout, class_balance)`` share one pass: the
    same initial weights, batches and dropout masks (common random numbers, so their differences come from lr,
    weight decay and schedule only), each with its own AdamW state. ``epochs`` and ``patience`` may differ per
    model.

    Args:
        X_train: (N, D) training embeddings.
        y_train: (N,) class indices 0..C-1.
        X_val: (M, D) validation embeddings.
        y_val: (M,) class indices.
        configs: the configurations to train.
        num_classes: C (default: 1 + the largest label).
        on_epoch: optional pruning hook, see :data:`EpochCallback`; indices refer to ``configs``.
        with_report: also compute a validation :class:`ClassificationReport` for each result.
        class_names: names for the reports.
        max_models_per_pass: largest stack trained in one pass (bounds memory and the block-diagonal second
            layer, whose cost grows with its square).
        precision: ``"float32"``, or ``"bfloat16"`` to run the matmuls in bfloat16 (weights, AdamW state, loss
            and softmax stay float32). About 3x faster on CPUs with AMX/AVX512-BF16 (slow where bfloat16 is
            emulated); the numbers differ slightly from float32.

    Returns:
        One :class:`TrainedClassifier` per configuration, in the order of ``configs``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> y = rng.integers(0, 2, 200); X = rng.normal(size=(200, 8)) + y[:, None] * 2.0
        >>> cfgs = [TrainConfig(hidden=16, lr=lr, epochs=3) for lr in (1e-3, 1e-2)]
        >>> [r.status for r in train_many(X[:150], y[:150], X[150:], y[150:], cfgs)]
        ['completed', 'completed']
    """
    if not configs:
        return []
    if precision not in ("float32", "bfloat16"):
        raise ValueError(f"precision must be 'float32' or 'bfloat16', got {precision!r}")
    if max_models_per_pass < 1:
        raise ValueError(f"max_models_per_pass must be >= 1, got {max_models_per_pass}")
    data = _prepare(X_train, y_train, X_val, y_val, num_classes)
    return _train_prepared(data, configs, on_epoch, with_report, class_names, max_models_per_pass, precision)


def _train_prepared(
    data: _Data,
    configs: Sequence[TrainConfig],
    on_epoch: EpochCallback | None,
    with_report: bool,
    class_names: Sequence[str] | None,
    max_models_per_pass: int,
    precision: Precision,
) -> list[TrainedClassifier]:
    names = _names(class_names, data.num_classes)
    groups: dict[tuple[object, ...], list[int]] = defaultdict(list)
    for i, cfg in enumerate(configs):
        groups[_group_key(cfg)].append(i)
    results: list[TrainedClassifier | None] = [None] * len(configs)
    for members in groups.values():
        for start in range(0, len(members), max_models_per_pass):
            chunk = members[start : start + max_models_per_pass]
            stack = _Stack(data, [configs[i] for i in chunk], chunk, precision)
            for res_i, res in _run_stack(stack, on_epoch):
                if with_report:
                    res.val_report = evaluate(data.yv, res.predict_proba(data.xv.numpy()), names)
                results[res_i] = res
    return [r for r in results if r is not None]


def _run_stack(stack: _Stack, on_epoch: EpochCallback | None) -> list[tuple[int, TrainedClassifier]]:
    out: list[tuple[int, TrainedClassifier]] = []
    max_epochs = max(c.epochs for c in stack.configs)
    for epoch in range(1, max_epochs + 1):
        lr, loss = stack.train_epoch(epoch)
        auc = np.array([_macro(a) for a in auroc_per_class(stack.data.yv, stack.val_proba())])
        k = len(stack.configs)
        status: list[Status | None] = [None] * k
        improved = np.isfinite(auc) & (auc > stack.best_auc)
        stack.best_auc[improved] = auc[improved]
        stack.best_epoch[improved] = epoch
        stack.wait[improved] = 0
        stack.wait[~improved] += 1
        sel = torch.from_numpy(np.flatnonzero(improved))
        for b, p in zip(stack.best, stack.params):
            b[sel] = p.detach()[sel]
        for j, cfg in enumerate(stack.configs):
            stack.history[j].append(
                {"epoch": epoch, "lr": float(lr[j]), "train_loss": float(loss[j]), "val_auroc": float(auc[j])}
            )
            if not math.isfinite(loss[j]):
                status[j] = "diverged"
            elif epoch >= cfg.epochs:
                status[j] = "completed"
            elif cfg.patience is not None and stack.wait[j] >= cfg.patience:
                status[j] = "early_stopped"
        if on_epoch is not None:
            alive = [j for j in range(k) if status[j] is None]
            if alive:
                prune = on_epoch([stack.indices[j] for j in alive], epoch, auc[alive])
                if prune is not None:
                    for j, flag in zip(alive, np.asarray(prune, bool).reshape(-1)):
                        if flag:
                            status[j] = "pruned"
        done = np.array([s is not None for s in status])
        for j in np.flatnonzero(done):
            has_best = stack.best_epoch[j] > 0
            src = stack.best if has_best else [p.detach() for p in stack.params]
            state = {n: t[j].clone() for n, t in zip(_KEYS, src)}
            res = TrainedClassifier(
                state_dict=state,
                config=stack.configs[j],
                history=stack.history[j],
                best_epoch=int(stack.best_epoch[j]),
                val_auroc=float(stack.best_auc[j]) if has_best else math.nan,
                status=status[j],  # type: ignore[arg-type]
            )
            out.append((stack.indices[j], res))
        if done.all():
            break
        if done.any():
            stack.keep(~done)
    return out
