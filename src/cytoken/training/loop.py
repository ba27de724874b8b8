"""The segmenter training loop: phased fine-tuning, EMA, AMP, atomic checkpoints, exact resume, DDP-ready.

Run as ``cytoken train segmenter --config FILE.yaml [--resume]``; scale out with
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
from cytoken.models.segmenter import CellSegmenter
from cytoken.models.store import load_segmenter, save_segmenter
from cytoken.training.config import TrainConfig
from cytoken.training.data import CropDataset, load_sources, validation_crops
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


def _set_encoder_trainable(model: CellSegmenter, trainable: bool) -> None:
    for p in model.encoder.parameters():
        p.requires_grad_(trainable)


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

    model = load_segmenter(config.init_weights) if config.init_weights else build_segmenter(config.model)
    if config.init_weights and model.config != config.model:  # type: ignore[attr-defined]
        raise CytokenError(
            f"init_weights {config.init_weights} hold a different architecture than config.model"
        )
    model.to(device)
    enc_params = list(model.encoder.parameters())
    enc_ids = {id(p) for p in enc_params}
    rest = [p for p in model.parameters() if id(p) not in enc_ids]
    enc_lr = config.phases.encoder_lr or config.lr
    opt = torch.optim.AdamW(
        [{"params": enc_params, "lr": enc_lr}, {"params": rest, "lr": config.lr}],
        weight_decay=config.weight_decay,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config))
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp and device.type == "cuda")
    ema = None
    if config.ema_decay:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
    if config.phases.encoder_mode == "lora":
        raise CytokenError("phases.encoder_mode 'lora' is not available yet in this version; use 'unfreeze'")

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
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        if ema is not None and ck.get("ema") is not None:
            ema.load_state_dict(ck["ema"])
        _set_rng_state(ck["rng"])
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
        frozen = epoch < config.phases.freeze_encoder_epochs
        _set_encoder_trainable(model, not frozen)
        data.set_epoch(epoch)
        loader = DataLoader(
            data,
            batch_size=config.batch_size,
            num_workers=config.num_workers,
            persistent_workers=False,
            worker_init_fn=_worker_init,
        )
        train_model.train()
        t0 = time.time()
        sums: dict[str, float] = {}
        bar = _progress(loader, progress and main, f"epoch {epoch + 1}/{config.epochs}")
        opt.zero_grad(set_to_none=True)
        for step, batch in enumerate(bar):
            batch = {k: v.to(device) for k, v in batch.items()}
            x = model.preprocess(batch["image"])
            with torch.autocast(device.type, dtype=amp_dtype, enabled=config.amp):
                out = train_model(x)
            loss, terms = hover_loss(out, batch, config.loss, nuclei_loss=config.nuclei_loss)
            if not torch.isfinite(loss):
                raise CytokenError(
                    f"non-finite loss {float(loss)} at epoch {epoch + 1}, step {step + 1} ({terms}); "
                    f"the last good checkpoint is kept at {last_path}"
                )
            scaler.scale(loss / config.grad_accum).backward()
            if (step + 1) % config.grad_accum == 0:
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update_parameters(model)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{sums['loss'] / (step + 1):.3f}")
        sched.step()
        n_steps = max(1, len(loader))
        row: dict = {
            "epoch": epoch + 1,
            "seconds": round(time.time() - t0, 1),
            "lr": opt.param_groups[1]["lr"],
        }
        row.update({k: round(v / n_steps, 5) for k, v in sums.items()})
        eval_model = ema.module if ema is not None else model
        improved = False
        if val and (epoch + 1) % config.val_every == 0 and main:
            metrics = validate(eval_model, val, device, mpp=config.model.mpp)
            row.update({f"val_{k}": round(v, 5) for k, v in metrics.items()})
            score = metrics[config.early_stopping_metric]
            if score > best:
                best, bad_epochs, improved = score, 0, True
            else:
                bad_epochs += 1
        history.append(row)
        if main:
            if improved or not val:
                save_segmenter(eval_model, out_dir / "best.safetensors")
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
        epochs_run=epoch + 1,
        best_metric=best,
        history=history,
        stopped_early=stopped_early,
    )


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
