"""The segmenter training loop: phased fine-tuning, EMA, AMP, atomic checkpoints, exact resume, DDP-ready.

Phase 1 trains decoder and heads with the encoder frozen; phase 2 unfreezes the encoder or trains LoRA adapters on it
(see :class:`~cytoken.training.config.PhaseConfig`). Run as ``cytoken train segmenter --config FILE.yaml [--resume]``;
scale out with
``torchrun --nproc_per_node N -m cytoken.cli.main train segmenter ...`` (gloo on CPU, NCCL on GPUs).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from cytoken.io.atomic import atomic_path, atomic_write_text
from cytoken.models.config import build_segmenter
from cytoken.models.device import resolve_device
from cytoken.models.lora import add_lora, lora_layers, merged_state_dict, save_lora
from cytoken.models.segmenter import CellSegmenter
from cytoken.models.store import load_segmenter, save_segmenter
from cytoken.models.weights_io import load_state_dict_strict
from cytoken.training.budget import CpuBudget
from cytoken.training.config import TrainConfig
from cytoken.training.data import CropDataset, balanced_type_weights, load_sources, validation_crops
from cytoken.training.distill import distill_loss, load_teacher
from cytoken.training.losses import hover_loss
from cytoken.training.validate import validate
from cytoken.types import CytokenError

__all__ = ["TrainResult", "train_segmenter"]


@dataclass
class TrainResult:
    """Outcome of a run: where the weights are and what happened."""

    out_dir: Path
    best_weights: Path | None
    last_checkpoint: Path
    epochs_run: int
    best_metric: float
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False


def _atomic_torch_save(obj: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _lr_lambda(config: TrainConfig):
    def f(epoch: int) -> float:
        if epoch < config.warmup_epochs:
            return (epoch + 1) / (config.warmup_epochs + 1)
        e = epoch - config.warmup_epochs
        if config.schedule == "exponential":
            return config.gamma**e
        if config.schedule == "cosine":
            span = max(1, config.epochs - config.warmup_epochs)
            return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(e, span) / span))
        return 1.0

    return f


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _set_trainable(params: list[torch.nn.Parameter], trainable: bool) -> None:
    for p in params:
        p.requires_grad_(trainable)


def _add_lora(model: CellSegmenter, config: TrainConfig) -> None:
    """Add the (zero-initialised) LoRA adapters of ``lora`` mode; every other encoder weight is frozen for good."""
    ph = config.phases
    try:
        add_lora(model.encoder, ph.lora_rank, ph.lora_alpha, ph.lora_targets, dropout=ph.lora_dropout, freeze=True)
    except ValueError as exc:
        raise CytokenError(f"phases.encoder_mode 'lora' on encoder {config.model.encoder!r}: {exc}") from None


def _phase2_params(model: CellSegmenter, lora: bool) -> list[torch.nn.Parameter]:
    """The encoder parameters phase 2 trains: all (``unfreeze``), or LoRA tensors + a CellVTA adapter (``lora``)."""
    if not lora:
        return list(model.encoder.parameters())
    return [
        p for n, p in model.encoder.named_parameters() if n.endswith((".lora_A", ".lora_B")) or n.startswith("adapter.")
    ]


def _select_trainable(model: CellSegmenter, prefixes: list[str]) -> list[torch.nn.Module]:
    """``TrainConfig.trainable``: freeze every parameter outside the prefixes; return the trained modules."""
    if not prefixes:
        return []
    hit = lambda name: any(name == p or name.startswith(p + ".") for p in prefixes)  # noqa: E731
    n = 0
    for name, param in model.named_parameters():
        param.requires_grad_(hit(name))
        n += hit(name)
    if n == 0:
        raise CytokenError(f"trainable {prefixes} matches no parameter of the model (e.g. heads.types, decoder)")
    return [m for name, m in model.named_modules() if name and hit(name)]


def _freeze_norm_stats(encoder: torch.nn.Module) -> None:
    """Batch norms whose parameters are frozen keep their running statistics (e.g. a conv stem under LoRA)."""
    for m in encoder.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


def _save_weights(model: CellSegmenter, path: Path) -> None:
    """``save_segmenter``; a model with LoRA is saved merged (plain weights that load without any LoRA code)."""
    if not lora_layers(model):
        save_segmenter(model, path)
        return
    config = model.config  # type: ignore[attr-defined]
    kwargs = {k: v for k, v in config.encoder_kwargs.items() if k != "pretrained"}  # weights come from `model`
    with torch.device("meta"):
        plain = build_segmenter(config.model_copy(update={"encoder_kwargs": kwargs}))
    load_state_dict_strict(plain, merged_state_dict(model), what="merged LoRA segmenter", assign=True)
    plain.config = config  # type: ignore[assignment]
    save_segmenter(plain, path)


def _save_adapters(model: CellSegmenter, path: Path, config: TrainConfig, epoch: int) -> None:
    meta = {"encoder": config.model.encoder, "pretrained": str(config.model.encoder_kwargs.get("pretrained", "")),
            "epoch": str(epoch + 1)}  # fmt: skip
    save_lora(model.encoder, path, meta=meta)


def train_segmenter(
    config: TrainConfig, *, resume: bool = False, progress: bool = True, stop_after_epochs: int | None = None
) -> TrainResult:
    """Train (or resume training) a segmenter.

    Args:
        config: the run configuration.
        resume: continue from ``out_dir/last.pt`` exactly (same weights, optimiser, schedule, RNG and data order).
        progress: show a progress bar (rank 0).
        stop_after_epochs: stop after this many epochs of this call (used to test kill-and-resume).

    Returns:
        A :class:`TrainResult`.
    """
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = resolve_device(config.device)
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if distributed else 0
    dist.get_world_size() if distributed else 1
    main = rank == 0
    if config.threads:
        torch.set_num_threads(config.threads)
    out_dir = Path(config.out_dir)
    last_path = out_dir / "last.pt"
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.json", config.model_dump_json(indent=2))
    _seed_all(config.seed)

    sources = load_sources(config)
    val = validation_crops(sources, config.crop_size)
    per_rank_items = config.steps_per_epoch * config.batch_size * config.grad_accum
    data = CropDataset(sources, config, length=per_rank_items, rank=rank)
    type_weights = _type_weights(config, sources, device)

    model = _initial_model(config, main)
    teacher = None if config.distill is None else load_teacher(config, device)
    # lora mode: the adapters exist from the start (B = 0: same outputs) and train only in phase 2, so optimiser,
    # EMA, checkpoints and DDP see the same parameters in both phases
    lora = config.phases.encoder_mode == "lora"
    if lora:
        _add_lora(model, config)
    model.to(device)
    enc_params = _phase2_params(model, lora)
    _set_trainable(enc_params, True)  # DDP only syncs parameters that require grad when it is built
    chosen = _select_trainable(model, config.trainable)
    enc_ids = {id(p) for p in model.encoder.parameters()}
    rest = [p for p in model.parameters() if id(p) not in enc_ids]
    enc_lr = config.phases.encoder_lr or config.lr
    opt = torch.optim.AdamW(
        [{"params": enc_params, "lr": enc_lr}, {"params": rest, "lr": config.lr}],
        weight_decay=config.weight_decay,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config))
    budget = None
    if config.cpu_budget_minutes:
        budget = CpuBudget(config.cpu_budget_minutes, config.warmup_epochs * config.steps_per_epoch,
                           distributed=distributed)  # fmt: skip
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp and device.type == "cuda")
    ema = None
    if config.ema_decay:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)

    start_epoch, best, bad_epochs, history = 0, -math.inf, 0, []
    if resume:
        if not last_path.is_file():
            raise CytokenError(f"--resume: no checkpoint at {last_path}")
        ck = torch.load(last_path, map_location=device, weights_only=False)
        saved_model = ck["config"]["model"]
        if saved_model != json.loads(config.model.model_dump_json()):
            raise CytokenError(
                f"--resume: the checkpoint {last_path} was trained with a different model architecture; "
                "use a new out_dir or the same model config"
            )
        saved_phases = ck["config"].get("phases", {})
        if lora and any(saved_phases.get(k) != v for k, v in _lora_shape(config).items()):
            raise CytokenError(
                f"--resume: the checkpoint {last_path} was trained with other LoRA settings ({saved_phases}); "
                "use a new out_dir or the same phases"
            )
        if not lora and saved_phases.get("encoder_mode") == "lora":
            raise CytokenError(f"--resume: the checkpoint {last_path} has LoRA adapters; keep encoder_mode: lora")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        if ema is not None and ck.get("ema") is not None:
            ema.load_state_dict(ck["ema"])
        _set_rng_state(ck["rng"])
        if budget is not None and ck.get("budget"):
            budget.load_state_dict(ck["budget"])
        start_epoch, best, bad_epochs, history = (
            ck["epoch"] + 1,
            ck["best_metric"],
            ck["bad_epochs"],
            ck["history"],
        )

    train_model: torch.nn.Module = model
    if distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    stopped_early = False
    epochs_this_call = 0
    epoch = start_epoch - 1
    for epoch in range(start_epoch, config.epochs):
        if budget is not None and budget.exhausted:
            break
        frozen = epoch < config.phases.freeze_encoder_epochs
        _set_trainable(enc_params, not frozen)
        _select_trainable(model, config.trainable)
        data.set_epoch(epoch)
        loader = DataLoader(
            data,
            batch_size=config.batch_size,
            num_workers=config.num_workers,
            persistent_workers=False,
            worker_init_fn=_worker_init,
        )
        train_model.train()
        if lora:
            _freeze_norm_stats(model.encoder)
        if chosen:
            model.eval()
            for module in chosen:
                module.train()
        t0 = time.time()
        sums: dict[str, float] = {}
        bar = _progress(loader, progress and main, f"epoch {epoch + 1}/{config.epochs}")
        opt.zero_grad(set_to_none=True)
        if budget is not None:
            budget.start()
        n_steps = labelled_steps = 0
        for step, batch in enumerate(bar):
            batch = {k: v.to(device) for k, v in batch.items()}
            x = model.preprocess(batch["image"])
            with torch.autocast(device.type, dtype=amp_dtype, enabled=config.amp):
                out = train_model(x)
            loss, terms = hover_loss(out, batch, config.loss, nuclei_loss=config.nuclei_loss, type_weights=type_weights)
            if teacher is not None:
                with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=config.amp):
                    teacher_out = teacher(teacher.preprocess(batch["image"]))
                kd, kd_terms = distill_loss(out, teacher_out, config.distill)  # type: ignore[arg-type]
                if kd is not None:
                    loss = loss + kd
                    terms.update({k: float(v.detach()) for k, v in kd_terms.items()})
            labelled_steps += bool(terms)  # a batch may lack some labels; a whole epoch must not
            if not torch.isfinite(loss):
                raise CytokenError(
                    f"non-finite loss {float(loss)} at epoch {epoch + 1}, step {step + 1} ({terms}); "
                    f"the last good checkpoint is kept at {last_path}"
                )
            scaler.scale(loss / config.grad_accum).backward()
            n_steps = step + 1
            if (step + 1) % config.grad_accum == 0:
                opt_step = epoch * config.steps_per_epoch + (step + 1) // config.grad_accum - 1
                if budget is not None:  # the schedule follows the budget (set before the step it applies to)
                    f = budget.lr_factor(opt_step, config.schedule, config.gamma, config.steps_per_epoch)
                    for group, base_lr in zip(opt.param_groups, sched.base_lrs, strict=True):
                        group["lr"] = base_lr * f
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update_parameters(model)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            if budget is not None and (step + 1) % config.grad_accum == 0:
                budget.tick(opt_step + 1)
            if hasattr(bar, "set_postfix"):
                extra = {} if budget is None else {"cpu_budget": f"{min(1, budget.used / budget.seconds):.0%}"}
                bar.set_postfix(loss=f"{sums['loss'] / (step + 1):.3f}", **extra)
            if budget is not None and budget.exhausted:
                break  # the budget is spent: this epoch ends early and is the last
        if n_steps and not labelled_steps:
            raise CytokenError(
                f"no loss term applied in epoch {epoch + 1}: the loss weights that are not 0 need labels these data "
                "do not have (e.g. only type weights, but no source with use_types)"
            )
        if budget is None:
            sched.step()
        row: dict = {
            "epoch": epoch + 1,
            "seconds": round(time.time() - t0, 1),
            "lr": opt.param_groups[1]["lr"],
        }
        if budget is not None:
            row.update({"steps": n_steps // config.grad_accum, "cpu_s": round(budget.used, 1)})
        row.update({k: round(v / max(1, n_steps), 5) for k, v in sums.items()})
        eval_model = ema.module if ema is not None else model
        improved = False
        budget_spent = budget is not None and budget.exhausted  # a budget run validates after its last step
        if val and main and ((epoch + 1) % config.val_every == 0 or budget_spent):
            metrics = validate(eval_model, val, device, mpp=config.model.mpp)
            row.update({f"val_{k}": round(v, 5) for k, v in metrics.items()})
            score = metrics.get(config.early_stopping_metric, -math.inf)
            if score > best:
                best, bad_epochs, improved = score, 0, True
            else:
                bad_epochs += 1
        history.append(row)
        if main:
            # final.safetensors: the latest (EMA) weights; best.safetensors: the best validated ones (or the
            # latest while no validation has run). lora mode: both merged, and the adapters also saved alone
            _save_weights(eval_model, out_dir / "final.safetensors")
            if lora:
                _save_adapters(eval_model, out_dir / "lora_adapters.safetensors", config, epoch)
            if improved or best == -math.inf:
                _save_weights(eval_model, out_dir / "best.safetensors")
                if lora:
                    _save_adapters(eval_model, out_dir / "best_lora_adapters.safetensors", config, epoch)
            ck = {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(),
                "ema": None if ema is None else ema.state_dict(),
                "rng": _rng_state(),
                "epoch": epoch,
                "best_metric": best,
                "bad_epochs": bad_epochs,
                "history": history,
                "budget": None if budget is None else budget.state_dict(),
                "config": json.loads(config.model_dump_json()),
            }
            _atomic_torch_save(ck, last_path)
            _write_csv(history, out_dir / "metrics.csv")
            _tensorboard(out_dir, row)
            print(json.dumps(row), flush=True)
        epochs_this_call += 1  # noqa: SIM113 - counts epochs of this call, not of the run
        if config.patience and bad_epochs >= config.patience:
            stopped_early = True
            break
        if stop_after_epochs is not None and epochs_this_call >= stop_after_epochs:
            break
    if distributed:
        dist.barrier()
    best_path = out_dir / "best.safetensors"
    return TrainResult(
        out_dir=out_dir,
        best_weights=best_path if best_path.is_file() else None,
        last_checkpoint=last_path,
        epochs_run=history[-1]["epoch"] if history else start_epoch,
        best_metric=best,
        history=history,
        stopped_early=stopped_early,
    )


def _lora_shape(config: TrainConfig) -> dict:
    """The phase settings that decide which LoRA tensors exist and what they compute (a resume keeps them)."""
    ph = config.phases
    return {"encoder_mode": ph.encoder_mode, "lora_rank": ph.lora_rank, "lora_alpha": ph.lora_alpha,
            "lora_targets": list(ph.lora_targets)}  # fmt: skip


def _initial_model(config: TrainConfig, verbose: bool) -> CellSegmenter:
    """The model to train: built from ``config.model``, or started from ``init_weights`` (strictly or partially)."""
    if not config.init_weights:
        return build_segmenter(config.model)
    start = load_segmenter(config.init_weights)
    if start.config == config.model:  # type: ignore[attr-defined]
        return start
    if config.init_strict:
        raise CytokenError(
            f"init_weights {config.init_weights} hold a different architecture than config.model; set "
            "init_strict: false to load the tensors that fit and start the others fresh"
        )
    model = build_segmenter(config.model)
    own, theirs = model.state_dict(), start.state_dict()
    fits = {k: v for k, v in theirs.items() if k in own and own[k].shape == v.shape}
    left_out = sorted(set(theirs) - set(fits))
    if left_out and config.init_skip_mismatched:
        if verbose:
            print(f"init_weights: {len(left_out)} tensors left out (no place of that shape): "
                  f"{', '.join(left_out[:8])}{' ...' if len(left_out) > 8 else ''}", flush=True)  # fmt: skip
    elif left_out:
        raise CytokenError(
            f"init_weights {config.init_weights}: {len(left_out)} tensors do not fit config.model "
            f"(first: {', '.join(left_out[:5])}); only added modules may differ (init_skip_mismatched: true leaves "
            "such tensors out)"
        )
    model.load_state_dict(fits, strict=False)
    fresh = sorted(set(own) - set(fits))
    if verbose and fresh:
        print(f"init_weights: {len(fits)} tensors loaded, {len(fresh)} new: {', '.join(fresh[:8])}", flush=True)
    return model


def _type_weights(config: TrainConfig, sources: list, device: torch.device) -> torch.Tensor | None:
    if config.type_class_weights == "none" or not config.model.num_classes:
        return None
    if config.type_class_weights == "balanced":
        w = balanced_type_weights(sources, config.model.num_classes)
    else:
        w = np.asarray(config.type_class_weights, np.float64)
    return torch.as_tensor(w, dtype=torch.float32, device=device)


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False, dynamic_ncols=True)


def _write_csv(history: list[dict], path: Path) -> None:
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    atomic_write_text(path, buf.getvalue())


def _tensorboard(out_dir: Path, row: dict) -> None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: CSV only
        return
    with SummaryWriter(str(out_dir / "tb")) as w:
        for k, v in row.items():
            if k != "epoch" and isinstance(v, int | float):
                w.add_scalar(k, v, row["epoch"])
