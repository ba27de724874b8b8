"""Fast local hyper-parameter search for the cell classifier (Optuna; SQLite storage lets a search resume).

Trials are cheap because they are trained in batches: the search asks Optuna for ``batch_trials`` trials at
once (``study.ask()``), trains them in one vectorised pass (:func:`~cytoken.classify.trainer.train_many`) and
tells Optuna each result. Bad trials are stopped early by an asynchronous successive-halving rule (ASHA: at
epochs 1, 3, 9, 27 a trial continues only if its validation AUROC is in the top third of all trials that
reached that epoch) and good ones by early stopping on the validation macro AUROC.

Search space (CellViT++'s classifier sweep, made continuous): hidden ∈ {128, 256, 512}, lr ∈ [1e-5, 1e-2]
(log), weight_decay ∈ [1e-5, 1e-3] (log), schedule ∈ {constant, exponential}. Objective: the best validation
macro one-vs-rest AUROC over the epochs trained (the weights kept are those of that epoch).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from cytoken.classify.config import TrainConfig
from cytoken.classify.trainer import Precision, TrainedClassifier, _prepare, _train_prepared
from cytoken.types import CytokenError

if TYPE_CHECKING:  # pragma: no cover
    import optuna

__all__ = ["SearchResult", "bf16_is_fast", "search"]

log = logging.getLogger(__name__)

HIDDEN_CHOICES = (128, 256, 512)
LR_RANGE = (1e-5, 1e-2)
WEIGHT_DECAY_RANGE = (1e-5, 1e-3)
SCHEDULES = ("constant", "exponential")
_CURVE_ATTR = "val_auroc_curve"


def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise CytokenError(
            "the hyper-parameter search needs Optuna, which is not installed: pip install 'cytoken[automl]'"
        ) from None
    return optuna


@dataclass
class SearchResult:
    """Outcome of :func:`search`.

    Attributes:
        best_value: best validation macro AUROC in the study.
        best_params: its parameters (``hidden``, ``lr``, ``weight_decay``, ``schedule``).
        best_config: the :class:`TrainConfig` of the best trial.
        best_model: the best trial's trained classifier when that trial ran in this call, else None (retrain
            with :func:`~cytoken.classify.train_classifier` and ``best_config``).
        n_trials: finished trials in the study (complete + pruned), including earlier runs.
        n_complete: trials that ran to the end or stopped early.
        n_pruned: trials stopped by successive halving.
        n_new: trials finished by this call.
        wall_time_s: duration of this call.
        trials_per_s: ``n_new / wall_time_s``.
        study_name: Optuna study name.
        storage: storage URL, or None for in-memory.
        precision: matmul precision the trials ran in.
        trials: one dict per finished trial: number, state, value, params, epochs.
    """

    best_value: float
    best_params: dict[str, Any]
    best_config: TrainConfig
    best_model: TrainedClassifier | None
    n_trials: int
    n_complete: int
    n_pruned: int
    n_new: int
    wall_time_s: float
    trials_per_s: float
    study_name: str
    storage: str | None
    precision: Precision = "float32"
    trials: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without the model weights)."""
        return {
            "best_value": self.best_value,
            "best_params": self.best_params,
            "best_config": self.best_config.to_dict(),
            "n_trials": self.n_trials,
            "n_complete": self.n_complete,
            "n_pruned": self.n_pruned,
            "n_new": self.n_new,
            "wall_time_s": self.wall_time_s,
            "trials_per_s": self.trials_per_s,
            "study_name": self.study_name,
            "storage": self.storage,
            "precision": self.precision,
            "trials": self.trials,
        }


class _Asha:
    """Asynchronous successive halving over epochs: at each rung keep the top ``1/eta`` of values seen."""

    def __init__(self, max_epochs: int, min_epochs: int = 1, eta: int = 3) -> None:
        self.eta = eta
        rungs, r = [], min_epochs
        while r < max_epochs:
            rungs.append(r)
            r *= eta
        self.values: dict[int, list[float]] = {r: [] for r in rungs}

    def add_curve(self, curve: Sequence[float]) -> None:
        for r, vals in self.values.items():
            if len(curve) >= r:
                vals.append(_finite(curve[r - 1]))

    def __call__(self, indices: list[int], epoch: int, aucs: np.ndarray) -> np.ndarray | None:
        vals = self.values.get(epoch)
        if vals is None:
            return None
        cur = [_finite(a) for a in aucs]
        vals.extend(cur)
        if len(vals) < self.eta:
            return None
        threshold = sorted(vals, reverse=True)[max(1, len(vals) // self.eta) - 1]
        return np.array(cur) < threshold


def bf16_is_fast() -> bool:
    """Whether this CPU runs bfloat16 matmuls natively (oneDNN with AVX512-BF16 or AMX); False when unsure."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _finite(v: float) -> float:
    return float(v) if math.isfinite(v) else -math.inf


def _storage_url(storage: str | Path | None) -> str | None:
    if storage is None:
        return None
    s = str(storage)
    if "://" in s:
        return s
    path = Path(s).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _make_sampler(optuna: Any, sampler: str, seed: int) -> Any:
    if sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True, n_startup_trials=10)
    if sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"sampler must be 'tpe' or 'random', got {sampler!r}")


def _distributions(optuna: Any) -> dict[str, Any]:
    d = optuna.distributions
    return {
        "hidden": d.CategoricalDistribution(list(HIDDEN_CHOICES)),
        "lr": d.FloatDistribution(*LR_RANGE, log=True),
        "weight_decay": d.FloatDistribution(*WEIGHT_DECAY_RANGE, log=True),
        "schedule": d.CategoricalDistribution(list(SCHEDULES)),
    }


def _config_of(base: TrainConfig, params: dict[str, Any]) -> TrainConfig:
    return replace(
        base,
        hidden=int(params["hidden"]),
        lr=float(params["lr"]),
        weight_decay=float(params["weight_decay"]),
        schedule=params["schedule"],
    )


def search(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    n_trials: int = 100,
    *,
    sampler: Literal["tpe", "random"] = "tpe",
    storage: str | Path | None = None,
    study_name: str = "cytoken-classifier",
    seed: int = 0,
    base_config: TrainConfig | None = None,
    batch_trials: int = 16,
    prune: bool = True,
    num_classes: int | None = None,
    num_threads: int | None = None,
    precision: Literal["auto", "float32", "bfloat16"] = "auto",
) -> SearchResult:
    """Search hidden size, lr, weight decay and lr schedule for the best validation macro AUROC.

    ``n_trials`` is the number of finished trials the study should hold: re-running the same call with the
    same SQLite ``storage`` and ``study_name`` after an interruption runs only the missing trials. Trials left
    "running" by an interrupted run are marked failed. Do not run two searches on one study at the same time.

    All trials share ``base_config``'s seed, so every trial of a given hidden size starts from the same
    weights and sees the same batches (common random numbers): differences in the objective come from the
    hyper-parameters.

    Args:
        X_train: (N, D) training embeddings.
        y_train: (N,) class indices 0..C-1.
        X_val: (M, D) validation embeddings (split by image/slide, not by cell).
        y_val: (M,) class indices.
        n_trials: total finished trials wanted in the study.
        sampler: ``"tpe"`` (Optuna's TPE, constant-liar for batched asks) or ``"random"``.
        storage: SQLite file path (or any Optuna storage URL) to persist the study; None keeps it in memory.
        study_name: study name inside the storage.
        seed: sampler seed.
        base_config: settings not searched (epochs, batch size, patience, class balance, dropout, seed,
            gamma). Default: ``TrainConfig(batch_size=1024, patience=5)``.
        batch_trials: trials asked for and trained together in one vectorised pass.
        prune: stop unpromising trials by successive halving (eta 3, rungs at epochs 1, 3, 9, 27).
        num_classes: C (default: 1 + the largest label).
        num_threads: torch threads during the search (restored afterwards); None leaves the setting alone.
        precision: ``"float32"`` or ``"bfloat16"`` matmuls (see :func:`~cytoken.classify.train_many`);
            ``"auto"`` picks bfloat16 where the CPU has native bfloat16 support (AMX / AVX512-BF16) and
            float32 elsewhere. It only affects the search; retrain the chosen configuration with
            ``train_classifier`` (float32).

    Returns:
        A :class:`SearchResult`.

    Raises:
        CytokenError: when Optuna is not installed (``pip install 'cytoken[automl]'``).

    Note:
        On a machine whose cores are shared with other busy processes, set ``OMP_WAIT_POLICY=PASSIVE`` in the
        environment before Python starts: spinning OpenMP threads made one 16-trial batch take over 200 s
        instead of 37 s on a loaded 2-core machine.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> y = rng.integers(0, 2, 300); X = rng.normal(size=(300, 8)) + y[:, None]
        >>> res = search(X[:200], y[:200], X[200:], y[200:], n_trials=4, base_config=TrainConfig(epochs=3))
        >>> res.n_trials, res.best_value > 0.7
        (4, True)
    """
    optuna = _import_optuna()
    if int(n_trials) != n_trials or n_trials < 1:
        raise ValueError(f"n_trials must be a positive integer, got {n_trials!r}")
    if int(batch_trials) != batch_trials or batch_trials < 1:
        raise ValueError(f"batch_trials must be a positive integer, got {batch_trials!r}")
    if precision not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"precision must be 'auto', 'float32' or 'bfloat16', got {precision!r}")
    prec: Precision = ("bfloat16" if bf16_is_fast() else "float32") if precision == "auto" else precision
    base = base_config or TrainConfig(batch_size=1024, patience=5)
    url = _storage_url(storage)
    t0 = time.perf_counter()
    old_threads = torch.get_num_threads()
    old_verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    try:
        study = optuna.create_study(
            study_name=study_name,
            storage=url,
            sampler=_make_sampler(optuna, sampler, seed),
            direction="maximize",
            load_if_exists=True,
        )
        best_model, n_new = _run(
            study,
            optuna,
            base,
            X_train,
            y_train,
            X_val,
            y_val,
            n_trials,
            batch_trials,
            prune,
            num_classes,
            prec,
        )
    finally:
        optuna.logging.set_verbosity(old_verbosity)
        torch.set_num_threads(old_threads)
    wall = time.perf_counter() - t0
    return _result(study, optuna, base, best_model, n_new, wall, study_name, url, prec)


def _run(
    study: optuna.Study,
    optuna: Any,
    base: TrainConfig,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    n_trials: int,
    batch_trials: int,
    prune: bool,
    num_classes: int | None,
    precision: Precision,
) -> tuple[TrainedClassifier | None, int]:
    states = optuna.trial.TrialState
    data = _prepare(x_train, y_train, x_val, y_val, num_classes)  # validate and convert once
    max_models_per_pass = max(1, batch_trials)
    asha = _Asha(base.epochs) if prune else None
    n_finished = 0
    for t in study.get_trials(deepcopy=False):
        if t.state == states.RUNNING:
            log.warning("marking trial %d, left running by an interrupted search, as failed", t.number)
            study.tell(t.number, state=states.FAIL)
        elif t.state in (states.COMPLETE, states.PRUNED):
            n_finished += 1
            if asha is not None:
                asha.add_curve(t.user_attrs.get(_CURVE_ATTR, []))
    dists = _distributions(optuna)
    best: TrainedClassifier | None = None
    best_number = -1
    n_new = 0
    failed_batches = 0
    while n_finished < n_trials:
        if failed_batches >= 3:
            raise CytokenError(
                "hyper-parameter search: 3 batches in a row had no finished trial (every run diverged); "
                "check the embeddings for extreme values"
            )
        k = min(batch_trials, n_trials - n_finished)
        trials = [study.ask(dists) for _ in range(k)]
        configs = [_config_of(base, t.params) for t in trials]
        n_new_before = n_new
        results = _train_prepared(data, configs, asha, False, None, max_models_per_pass, precision)
        for trial, res in zip(trials, results):
            curve = [h["val_auroc"] for h in res.history]
            trial.set_user_attr(_CURVE_ATTR, [v if math.isfinite(v) else None for v in curve])
            trial.set_user_attr("epochs", len(res.history))
            trial.set_user_attr("status", res.status)
            if res.status == "pruned":
                trial.report(_finite(curve[-1]) if curve else -math.inf, len(curve))
                study.tell(trial, state=states.PRUNED)
            elif math.isfinite(res.val_auroc):
                study.tell(trial, res.val_auroc)
                if best is None or res.val_auroc > best.val_auroc:
                    best, best_number = res, trial.number
            else:
                study.tell(trial, state=states.FAIL)
                continue
            n_finished += 1
            n_new += 1
        failed_batches = failed_batches + 1 if n_new == n_new_before else 0
        log.info("search: %d/%d trials finished", n_finished, n_trials)
    try:
        keep = best if best is not None and study.best_trial.number == best_number else None
    except ValueError:  # no complete trial at all
        keep = None
    return keep, n_new


def _result(
    study: optuna.Study,
    optuna: Any,
    base: TrainConfig,
    best_model: TrainedClassifier | None,
    n_new: int,
    wall: float,
    study_name: str,
    url: str | None,
    precision: Precision,
) -> SearchResult:
    states = optuna.trial.TrialState
    finished = [t for t in study.get_trials(deepcopy=False) if t.state in (states.COMPLETE, states.PRUNED)]
    complete = [t for t in finished if t.state == states.COMPLETE]
    if not complete:
        raise CytokenError(
            f"hyper-parameter search {study_name!r}: no trial completed (all pruned or diverged); "
            "check the labels and embeddings"
        )
    bt = study.best_trial
    return SearchResult(
        best_value=float(bt.value),
        best_params=dict(bt.params),
        best_config=_config_of(base, bt.params),
        best_model=best_model,
        n_trials=len(finished),
        n_complete=len(complete),
        n_pruned=len(finished) - len(complete),
        n_new=n_new,
        wall_time_s=wall,
        trials_per_s=n_new / wall if wall > 0 else math.nan,
        study_name=study_name,
        storage=url,
        precision=precision,
        trials=[
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "params": dict(t.params),
                "epochs": t.user_attrs.get("epochs"),
            }
            for t in finished
        ],
    )
