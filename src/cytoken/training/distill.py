"""Knowledge distillation: a teacher segmenter's maps as extra training targets (``TrainConfig.distill``).

The teacher runs in eval mode without gradients on the same augmented crops as the student, each model with its own
input normalisation. Terms (weights from :class:`~cytoken.training.config.DistillConfig`):

- ``distill_nuclei``: cross-entropy of the student's nuclei logits against the teacher's probabilities, both
  softened by the temperature T, times T² (Hinton et al. 2015), so the gradient scale does not depend on T;
- ``distill_hv``: mean squared error to the teacher's HV maps (clamped to [-1, 1], as at inference);
- ``distill_hv_msge``: HoVer-Net's gradient loss against the teacher's HV maps, inside the teacher's nuclei
  (probability > 0.5);
- ``distill_types``: the soft cross-entropy of ``distill_nuclei`` on the type maps;
- ``distill_tokens``: similarity-preserving distillation (Tung & Mori 2019) of the last-layer tokens, which are the
  cell embeddings: the mean squared difference between the two models' token-token cosine similarity matrices over
  the whole batch, each model's tokens centred on their batch mean first. It is zero whenever the student's tokens
  are a rotation, scaling and shift of the teacher's, so widths may differ and no projection is learned; what it
  keeps is the geometry a classifier on the embeddings sees.

A soft cross-entropy differs from the KL divergence only by the teacher's entropy, a constant for the student, so
both give the same gradients; the cross-entropy is what is logged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cytoken.models.segmenter import CellSegmenter, HoverOutput
from cytoken.models.store import load_model
from cytoken.training.config import DistillConfig, TrainConfig
from cytoken.training.losses import msge_loss
from cytoken.types import CytokenError

__all__ = ["distill_loss", "load_teacher"]


def load_teacher(config: TrainConfig, device: torch.device) -> CellSegmenter:
    """Load ``config.distill.teacher`` for ``config.model``: frozen, eval mode, on ``device``.

    Raises:
        CytokenError: unknown model or file, a teacher at another µm/px, or (with a ``types`` weight) other classes.
    """
    assert config.distill is not None
    cfg = config.distill
    teacher, _ = load_model(cfg.teacher)
    tcfg = teacher.config  # type: ignore[attr-defined]
    student = config.model
    if abs(tcfg.mpp - student.mpp) > 1e-6:
        raise CytokenError(
            f"distill.teacher {cfg.teacher} works at {tcfg.mpp} µm/px but the model being trained at {student.mpp}: "
            "both must see the crops at the same resolution"
        )
    if cfg.types and student.num_classes and tcfg.num_classes and tcfg.names != student.names:
        raise CytokenError(
            f"distill.teacher {cfg.teacher} has the classes {list(tcfg.names)}, the model being trained "
            f"{list(student.names)}: use the same class names in the same order, or set distill.types: 0"
        )
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.to(device).eval()


def _soft_ce(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    """Mean over pixels of -Σ_c softmax(teacher/t) log softmax(student/t), times t²."""
    target = (teacher_logits.float() / t).softmax(1)
    return -(target * F.log_softmax(student_logits.float() / t, dim=1)).sum(1).mean() * (t * t)


def token_similarity(tokens: torch.Tensor) -> torch.Tensor:
    """Cosine similarities between all tokens of a batch, (B, D, h, w) -> (B·h·w, B·h·w), tokens centred first."""
    z = tokens.float().flatten(2).transpose(1, 2).reshape(-1, tokens.shape[1])
    z = F.normalize(z - z.mean(0, keepdim=True), dim=1)
    return z @ z.T


def distill_loss(
    out: HoverOutput, teacher_out: HoverOutput, cfg: DistillConfig
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """The weighted distillation terms of one batch: (their sum or None when all are off, {term: value})."""
    terms: dict[str, torch.Tensor] = {}
    t = cfg.temperature
    if cfg.nuclei:
        terms["distill_nuclei"] = _soft_ce(out.nuclei_logits, teacher_out.nuclei_logits, t) * cfg.nuclei
    t_hv = teacher_out.hv.float().clamp(-1.0, 1.0)
    if cfg.hv:
        terms["distill_hv"] = F.mse_loss(out.hv.float(), t_hv) * cfg.hv
    if cfg.hv_msge:
        focus = teacher_out.nuclei_logits.float().softmax(1)[:, 1] > 0.5
        terms["distill_hv_msge"] = msge_loss(out.hv.float(), t_hv, focus) * cfg.hv_msge
    if cfg.types and out.type_logits is not None and teacher_out.type_logits is not None:
        terms["distill_types"] = _soft_ce(out.type_logits, teacher_out.type_logits, t) * cfg.types
    if cfg.tokens:
        if out.tokens.shape[-2:] != teacher_out.tokens.shape[-2:]:
            raise CytokenError(
                f"distill.tokens needs the same token grid in both models: the student's is "
                f"{tuple(out.tokens.shape[-2:])}, the teacher's {tuple(teacher_out.tokens.shape[-2:])} (another patch "
                "size?); set distill.tokens: 0"
            )
        sim = token_similarity(out.tokens)
        terms["distill_tokens"] = F.mse_loss(sim, token_similarity(teacher_out.tokens)) * cfg.tokens
    if not terms:
        return None, terms
    return torch.stack(list(terms.values())).sum(), terms
