"""The typed training configuration (``cytoken train segmenter --config FILE.yaml``).

Unknown or missing keys are errors that name them (pydantic ``extra="forbid"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cytoken.io.yamlfile import read_yaml
from cytoken.models.config import SegmenterConfig
from cytoken.models.lora import LORA_TARGETS
from cytoken.types import CytokenError

__all__ = ["DataSource", "DistillConfig", "LossWeights", "PhaseConfig", "TrainConfig", "load_train_config"]


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
        split_seed: seed of that split. Default: the source's index in ``data``, whatever the run's ``seed``, so
            that runs with other seeds, and runs that continue another one (``init_weights``), hold out the same
            images. (It used to be the run's seed + the index, so a continuation with a new seed trained
            on its start's validation images; see the default model's card.) Set it to keep a split fixed across
            runs whose source lists differ, or to draw another split.
        use_types: train the type head on this source's type maps (needs classes mapped onto the model's).
        class_map: maps this dataset's class names to the model's class names (default: same names).
        mpp: µm/px for adapters that need it (``folder``).
    """

    dataset: str
    root: Path
    split: str = "train"
    weight: float = Field(1.0, gt=0)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    split_seed: int | None = None
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


class DistillConfig(_Strict):
    """Knowledge distillation: a trained *teacher* segmenter's maps on each training crop are extra targets.

    The teacher sees the same augmented crops as the student (each model with its own input normalisation) and runs
    without gradients. Typical uses: a small CPU model learning from a large one (e.g. a CellViT-SAM-H checkpoint on a
    GPU), or a model of another shape learning from the current default model. The terms add to the usual losses
    (``loss``), which still need the ground truth; set their weights to 0 to learn from the teacher alone.

    Attributes:
        teacher: a model name (``cytoken models``), a cytoken ``.safetensors`` file or a CellViT ``.pth``
            checkpoint. Its µm/px must equal the student's, and for ``types`` its class names too.
        nuclei: weight of the cross-entropy of the student's nuclei map against the teacher's probabilities
            (softened by ``temperature``, scaled by its square).
        hv: weight of the mean squared error to the teacher's HV maps.
        hv_msge: weight of the mean squared error to the teacher's HV gradients inside the teacher's nuclei.
        types: weight of the cross-entropy of the student's type map against the teacher's type probabilities
            (softened like ``nuclei``); 0 when either model has no type map.
        tokens: weight of a similarity-preserving term on the last-layer tokens (the cell embeddings): the mean
            squared difference between the student's and the teacher's token-token cosine similarities over the
            batch (each model's tokens centred first). It needs no projection, so the widths may differ, only the
            token grids must match. It keeps the geometry the embedded classifier relies on when the shape changes.
            Cost: one (B·h·w)² matrix per model and step, growing with the square of the tokens per batch (8 crops
            of 256² at 16 px: 2,048², 16 MB; 16 crops of 512²: 16,384², 1 GB).
        temperature: softmax temperature of the two soft cross-entropies (1 = the teacher's probabilities).
    """

    teacher: str
    nuclei: float = Field(1.0, ge=0)
    hv: float = Field(2.5, ge=0)
    hv_msge: float = Field(0.0, ge=0)
    types: float = Field(0.5, ge=0)
    tokens: float = Field(0.0, ge=0)
    temperature: float = Field(1.0, gt=0)


class PhaseConfig(_Strict):
    """Phased fine-tuning (the UNI seed pipeline's two phases).

    Phase 1 (epochs ``< freeze_encoder_epochs``) trains decoder and heads with the encoder frozen. Phase 2 then
    either unfreezes the whole encoder (``unfreeze``) or trains LoRA adapters (:mod:`cytoken.models.lora`) on the
    linear layers of its transformer blocks while the encoder's own weights stay frozen (``lora``). In both modes
    the trained encoder parameters form their own optimiser group with learning rate ``encoder_lr``.

    ``lora`` mode adds the adapters when the run starts, not when phase 2 begins: ``lora_B`` starts at zero, so the
    model computes exactly what it would without them, and during phase 1 they do not require gradients (no
    optimiser update, no weight decay). The optimiser, EMA, checkpoints (``last.pt`` holds the adapters and their
    optimiser state) and DDP thus see one fixed set of parameters for the whole run, and ``--resume`` continues
    exactly in either phase. Phase 2 trains the LoRA tensors and, when the encoder carries one, the CellVTA adapter
    (``encoder_kwargs.adapter``, new weights as well); every other encoder weight, widened multi-channel input
    convolutions included, is never updated. Outputs: ``final.safetensors`` / ``best.safetensors`` hold the merged
    model (plain weights, ``load_segmenter`` needs no LoRA code), ``lora_adapters.safetensors`` /
    ``best_lora_adapters.safetensors`` the same (EMA) adapters alone, for ``load_lora(model.encoder, path)`` on a
    model with the frozen foundation weights. The adapters alone do not hold the trained decoder and heads.

    Attributes:
        freeze_encoder_epochs: epochs of phase 1 with the encoder frozen (0 = phase 2 from the start).
        encoder_mode: phase 2: ``unfreeze`` the encoder, or train ``lora`` adapters on it.
        encoder_lr: learning rate of the encoder parameters phase 2 trains (all of them with ``unfreeze``, the
            adapters with ``lora``); default: the main learning rate ``lr``. The schedule applies to it as well.
        lora_rank: LoRA rank r (``lora`` mode only, as all ``lora_*`` keys).
        lora_alpha: LoRA scaling numerator: the update of a weight is ``(lora_alpha / lora_rank) · B A``.
        lora_dropout: dropout on the input of the LoRA branch while training.
        lora_targets: linear layers of every transformer block that get adapters: ``qkv`` and ``proj``
            (attention), ``fc1`` and ``fc2`` (ViT MLP), ``lin1`` and ``lin2`` (SAM MLP).
    """

    freeze_encoder_epochs: int = Field(0, ge=0)
    encoder_mode: Literal["unfreeze", "lora"] = "unfreeze"
    encoder_lr: float | None = Field(None, gt=0)
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_targets: list[str] = Field(default_factory=lambda: ["qkv", "proj"])

    @field_validator("lora_targets")
    @classmethod
    def _known_targets(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if t not in LORA_TARGETS]
        if not v or bad:
            raise ValueError(f"lora_targets {v!r}: allowed are {sorted(LORA_TARGETS)} (at least one)")
        if len(set(v)) != len(v):
            raise ValueError(f"lora_targets {v!r} names a layer twice")
        return v


class TrainConfig(_Strict):
    """Everything a segmenter training run needs.

    Attributes:
        model: the segmenter to build (or to fine-tune, see ``init_weights``).
        init_weights: optional cytoken weights file to start from.
        init_strict: require ``init_weights`` to hold exactly ``model``'s architecture; ``false`` loads every tensor
            that fits and starts the others fresh (e.g. a head added for fine-tuning), listing them.
        init_skip_mismatched: with ``init_strict: false``, also leave out tensors of ``init_weights`` that have no
            place of that shape in ``model`` (e.g. the encoder and the decoder's first layers when the encoder
            width changes) instead of refusing them; they are listed. Off by default, because it hides a wrong
            ``init_weights`` file.
        distill: optional knowledge distillation from a teacher segmenter (see :class:`DistillConfig`).
        data: training sources.
        out_dir: run folder (checkpoints, ``metrics.csv``, final weights).
        crop_size: training crop size in px.
        batch_size: crops per optimiser step and process (before accumulation).
        grad_accum: gradient accumulation steps.
        epochs: maximal epochs.
        cpu_budget_minutes: train for this many CPU-minutes of the training process instead of a number of epochs
            (``epochs`` stays an upper bound): training stops after the optimiser step that uses the budget up, and
            the schedule after warm-up spans the budget (see :mod:`cytoken.training.budget`). None = off.
        steps_per_epoch: optimiser steps per epoch.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        schedule: ``constant``, ``exponential`` or ``cosine`` (after warm-up).
        gamma: decay per epoch of the exponential schedule.
        warmup_epochs: linear warm-up length.
        amp: mixed precision (bfloat16 on CPU, float16 on CUDA) when the device supports it.
        ema_decay: exponential moving average of the weights (None = off); validation and the final model use it.
        phases: phased fine-tuning: frozen encoder, then the encoder unfrozen or LoRA adapters (see
            :class:`PhaseConfig`).
        loss: loss weights.
        nuclei_loss: ``ce`` or ``focal_tversky`` for the nuclei map.
        class_weighted_sampling: oversample crops that contain rare classes.
        trainable: train only the parameters whose names start with one of these prefixes (e.g.
            ``[heads.types, heads.token_types]`` to train the type heads of a finished segmenter); the frozen rest
            runs in inference mode (no dropout/drop-path, fixed batch-norm statistics). Empty = train everything.
            Not combinable with ``phases``.
        type_class_weights: weights of the type cross-entropy per class (background first, C + 1 values), or
            ``balanced`` for median-frequency balancing from the training sources' type maps, or ``none``.
        augment: switch augmentation on/off.
        val_every: validate every N epochs.
        early_stopping_metric: ``bpq``, ``dice``, ``det_f1`` or ``type_f1`` on the validation split.
        patience: epochs without improvement before stopping (0 = never).
        seed: global seed.
        num_workers: DataLoader worker processes.
        threads: torch intra-op threads (0 = torch default).
        device: ``cpu``, ``cuda``, ``mps`` or ``auto``.
    """

    model: SegmenterConfig = Field(default_factory=SegmenterConfig)
    init_weights: Path | None = None
    init_strict: bool = True
    init_skip_mismatched: bool = False
    distill: DistillConfig | None = None
    data: list[DataSource]
    out_dir: Path
    crop_size: int = Field(256, ge=32)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    epochs: int = Field(100, ge=1)
    cpu_budget_minutes: float | None = Field(None, gt=0)
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
    trainable: list[str] = Field(default_factory=list)
    type_class_weights: Literal["none", "balanced"] | list[float] = "none"
    augment: bool = True
    val_every: int = Field(1, ge=1)
    early_stopping_metric: Literal["bpq", "dice", "det_f1", "type_f1"] = "bpq"
    patience: int = Field(0, ge=0)
    seed: int = 0
    num_workers: int = Field(0, ge=0)
    threads: int = Field(0, ge=0)
    device: Literal["cpu", "cuda", "mps", "auto"] = "cpu"

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if not self.data:
            raise ValueError("data: at least one source is needed")
        if self.trainable and (self.phases.freeze_encoder_epochs or self.phases.encoder_mode != "unfreeze"):
            raise ValueError("trainable selects the trained parameters itself; leave phases at their defaults")
        if isinstance(self.type_class_weights, list):
            if len(self.type_class_weights) != self.model.num_classes + 1:
                raise ValueError(
                    f"type_class_weights needs {self.model.num_classes + 1} values (background + "
                    f"{self.model.num_classes} classes), got {len(self.type_class_weights)}"
                )
            if any(w < 0 for w in self.type_class_weights):
                raise ValueError("type_class_weights must not be negative")
        kd = self.distill
        distilled = kd is not None and any((kd.nuclei, kd.hv, kd.hv_msge, kd.types, kd.tokens))
        if not any(self.loss.model_dump().values()) and not distilled:
            raise ValueError("every loss weight is 0 (loss and distill): nothing would be trained")
        if self.init_skip_mismatched and self.init_strict:
            raise ValueError("init_skip_mismatched needs init_strict: false")
        p = 16
        if self.crop_size % p:
            raise ValueError(f"crop_size {self.crop_size} must be a multiple of 16")
        return self


def load_train_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Read a YAML training config; errors name the unknown, missing or invalid keys."""
    path = Path(path)
    try:
        raw = read_yaml(path) or {}
    except FileNotFoundError:
        raise CytokenError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise CytokenError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        kind = type(raw).__name__
        raise CytokenError(f"invalid training config {path}: expected a mapping of config keys, got {kind}")
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
