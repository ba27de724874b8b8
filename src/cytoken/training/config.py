"""The typed training configuration (``cytoken train segmenter --config FILE.yaml``).

Unknown or missing keys are errors that name them (pydantic ``extra="forbid"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cytoken.models.config import SegmenterConfig
from cytoken.types import CytokenError

__all__ = ["DataSource", "LossWeights", "PhaseConfig", "TrainConfig", "load_train_config"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSource(_Strict):
    """One dataset in the training mix.

    Attributes:
        dataset: adapter name (``monuseg``, ``consep_patched``, ``folder``, …; see ``cytoken.io.datasets``).
        root: data folder.
        split: split to read training data from.
        weight: relative sampling weight of this source in each epoch.
        val_fraction: fraction of this source's groups (images, or source tiles) held out for validation.
        use_types: train the type head on this source's type maps (needs classes mapped onto the model's).
        class_map: maps this dataset's class names to the model's class names (default: same names).
        mpp: µm/px for adapters that need it (``folder``).
    """

    dataset: str
    root: Path
    split: str = "train"
    weight: float = Field(1.0, gt=0)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    use_types: bool = True
    class_map: dict[str, str] = Field(default_factory=dict)
    mpp: float | None = None


class LossWeights(_Strict):
    """Weights of each loss term (0 disables it).

    Attributes:
        nuclei_ce: cross-entropy (or focal-Tversky, see ``nuclei_loss``) on the nuclei map.
        nuclei_dice: Dice on the nuclei map.
        hv_mse: mean squared error of the HV maps.
        hv_msge: mean squared error of the HV maps' gradients inside nuclei (HoVer-Net's MSGE).
        type_ce: cross-entropy on the type map.
        type_dice: Dice on the type map.
        tissue_ce: cross-entropy of the tissue head.
    """

    nuclei_ce: float = 1.0
    nuclei_dice: float = 1.0
    hv_mse: float = 2.5
    hv_msge: float = 8.0
    type_ce: float = 0.5
    type_dice: float = 0.2
    tissue_ce: float = 0.1


class PhaseConfig(_Strict):
    """Phased fine-tuning (the UNI seed pipeline's two phases).

    Attributes:
        freeze_encoder_epochs: epochs of phase 1 with the encoder frozen (0 = train everything from the start).
        encoder_mode: phase 2: ``unfreeze`` the encoder, or add ``lora`` adapters (needs the ``peft`` package).
        encoder_lr: learning rate of encoder parameters in phase 2 (default: the main learning rate).
        lora_rank: LoRA rank in ``lora`` mode.
    """

    freeze_encoder_epochs: int = Field(0, ge=0)
    encoder_mode: Literal["unfreeze", "lora"] = "unfreeze"
    encoder_lr: float | None = Field(None, gt=0)
    lora_rank: int = Field(8, ge=1)


class TrainConfig(_Strict):
    """Everything a segmenter training run needs.

    Attributes:
        model: the segmenter to build (or to fine-tune, see ``init_weights``).
        init_weights: optional cytoken weights file to start from.
        data: training sources.
        out_dir: run folder (checkpoints, ``metrics.csv``, final weights).
        crop_size: training crop size in px.
        batch_size: crops per optimiser step and process (before accumulation).
        grad_accum: gradient accumulation steps.
        epochs: maximal epochs.
        steps_per_epoch: optimiser steps per epoch.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        schedule: ``constant``, ``exponential`` or ``cosine`` (after warm-up).
        gamma: decay per epoch of the exponential schedule.
        warmup_epochs: linear warm-up length.
        amp: mixed precision (bfloat16 on CPU, float16 on CUDA) when the device supports it.
        ema_decay: exponential moving average of the weights (None = off); validation and the final model use it.
        phases: phased fine-tuning.
        loss: loss weights.
        nuclei_loss: ``ce`` or ``focal_tversky`` for the nuclei map.
        class_weighted_sampling: oversample crops that contain rare classes.
        augment: switch augmentation on/off.
        val_every: validate every N epochs.
        early_stopping_metric: ``bpq``, ``dice`` or ``det_f1`` on the validation split.
        patience: epochs without improvement before stopping (0 = never).
        seed: global seed.
        num_workers: DataLoader worker processes.
        threads: torch intra-op threads (0 = torch default).
        device: ``cpu``, ``cuda``, ``mps`` or ``auto``.
    """

    model: SegmenterConfig = Field(default_factory=SegmenterConfig)
    init_weights: Path | None = None
    data: list[DataSource]
    out_dir: Path
    crop_size: int = Field(256, ge=32)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    epochs: int = Field(100, ge=1)
    steps_per_epoch: int = Field(100, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    schedule: Literal["constant", "exponential", "cosine"] = "cosine"
    gamma: float = Field(0.95, gt=0, le=1)
    warmup_epochs: int = Field(2, ge=0)
    amp: bool = False
    ema_decay: float | None = Field(None, gt=0, lt=1)
    phases: PhaseConfig = Field(default_factory=PhaseConfig)
    loss: LossWeights = Field(default_factory=LossWeights)
    nuclei_loss: Literal["ce", "focal_tversky"] = "ce"
    class_weighted_sampling: bool = False
    augment: bool = True
    val_every: int = Field(1, ge=1)
    early_stopping_metric: Literal["bpq", "dice", "det_f1"] = "bpq"
    patience: int = Field(0, ge=0)
    seed: int = 0
    num_workers: int = Field(0, ge=0)
    threads: int = Field(0, ge=0)
    device: Literal["cpu", "cuda", "mps", "auto"] = "cpu"

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if not self.data:
            raise ValueError("data: at least one source is needed")
        p = 16
        if self.crop_size % p:
            raise ValueError(f"crop_size {self.crop_size} must be a multiple of 16")
        return self


def load_train_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Read a YAML training config; errors name the unknown, missing or invalid keys."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise CytokenError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise CytokenError(f"{path} is not valid YAML: {exc}") from None
    raw.update(overrides or {})
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            kind = {"extra_forbidden": "unknown key", "missing": "missing key"}.get(err["type"], err["msg"])
            problems.append(f"  {loc}: {kind}")
        raise CytokenError(f"invalid training config {path}:\n" + "\n".join(problems)) from None
