"""HoVer-Net / CellViT losses: nuclei CE (or focal-Tversky) + Dice, HV MSE + MSGE, type CE + Dice, tissue CE."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cytoken.training.config import LossWeights

__all__ = ["dice_loss", "focal_tversky_loss", "hover_loss", "msge_loss"]


def dice_loss(
    prob: torch.Tensor, target_onehot: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Soft Dice loss averaged over channels: 1 - 2|P∩T| / (|P| + |T|), on (B, C, H, W) tensors."""
    if valid is not None:
        prob = prob * valid[:, None]
        target_onehot = target_onehot * valid[:, None]
    inter = (prob * target_onehot).sum(dim=(0, 2, 3))
    denom = prob.sum(dim=(0, 2, 3)) + target_onehot.sum(dim=(0, 2, 3))
    return (1.0 - (2.0 * inter + 1e-6) / (denom + 1e-6)).mean()


def focal_tversky_loss(
    prob: torch.Tensor, target: torch.Tensor, alpha: float = 0.7, beta: float = 0.3, gamma: float = 0.75
) -> torch.Tensor:
    """Focal-Tversky loss (Abraham & Khan 2019) on the foreground probability (B, H, W) vs a 0/1 target."""
    tp = (prob * target).sum()
    fn = ((1 - prob) * target).sum()
    fp = (prob * (1 - target)).sum()
    tversky = (tp + 1e-6) / (tp + alpha * fn + beta * fp + 1e-6)
    return (1.0 - tversky) ** gamma


_SOBEL = None


def _sobel_kernels(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """5×5 Sobel-like derivative kernels (HoVer-Net's MSGE), normalised."""
    r = torch.arange(-2, 3, dtype=dtype, device=device)
    h, v = torch.meshgrid(r, r, indexing="xy")  # h varies along x (columns), v along y (rows)
    kx = h / (h * h + v * v + 1e-15)
    ky = v / (h * h + v * v + 1e-15)
    return kx[None, None], ky[None, None]


def msge_loss(pred: torch.Tensor, target: torch.Tensor, focus: torch.Tensor) -> torch.Tensor:
    """Mean squared error of HV gradients inside nuclei: d/dx of the horizontal map, d/dy of the vertical map."""
    kx, ky = _sobel_kernels(pred.device, pred.dtype)
    gp = torch.cat([F.conv2d(pred[:, :1], kx, padding=2), F.conv2d(pred[:, 1:], ky, padding=2)], 1)
    gt = torch.cat([F.conv2d(target[:, :1], kx, padding=2), F.conv2d(target[:, 1:], ky, padding=2)], 1)
    f = focus[:, None].to(pred.dtype).expand_as(gp)
    return ((gp - gt) ** 2 * f).sum() / (f.sum() + 1e-8)


def hover_loss(
    out: object,
    batch: dict[str, torch.Tensor],
    weights: LossWeights,
    *,
    nuclei_loss: str = "ce",
    tissue_target: torch.Tensor | None = None,
    type_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of all terms for a :class:`~cytoken.models.segmenter.HoverOutput` and a target batch.

    Args:
        out: the model output.
        batch: targets: ``nuclei`` (B, H, W), ``hv`` (B, 2, H, W), ``types`` (B, H, W; -1 = ignore).
        weights: loss weights (zero weights skip their terms).
        nuclei_loss: ``ce`` or ``focal_tversky``.
        tissue_target: optional (B,) tissue class ids.
        type_weights: optional (C + 1,) per-class weights of the type cross-entropy (background first).

    Returns:
        (total loss, {term: value}) — terms with zero weight or no labels are skipped.
    """
    terms: dict[str, torch.Tensor] = {}
    nuclei = batch["nuclei"]
    logits = out.nuclei_logits.float()  # type: ignore[attr-defined]
    prob = logits.softmax(1)
    if weights.nuclei_ce:
        if nuclei_loss == "focal_tversky":
            terms["nuclei_ft"] = focal_tversky_loss(prob[:, 1], nuclei.float()) * weights.nuclei_ce
        else:
            terms["nuclei_ce"] = F.cross_entropy(logits, nuclei) * weights.nuclei_ce
    if weights.nuclei_dice:
        onehot = F.one_hot(nuclei, 2).permute(0, 3, 1, 2).float()
        terms["nuclei_dice"] = dice_loss(prob, onehot) * weights.nuclei_dice
    hv = out.hv.float()  # type: ignore[attr-defined]
    if weights.hv_mse:
        terms["hv_mse"] = F.mse_loss(hv, batch["hv"]) * weights.hv_mse
    if weights.hv_msge:
        terms["hv_msge"] = msge_loss(hv, batch["hv"], nuclei > 0) * weights.hv_msge
    type_logits = out.type_logits  # type: ignore[attr-defined]
    types = batch["types"]
    valid = types >= 0
    if type_logits is not None and bool(valid.any()):
        tl = type_logits.float()
        if weights.type_ce:
            terms["type_ce"] = F.cross_entropy(tl, types, weight=type_weights, ignore_index=-1) * weights.type_ce
        if weights.type_dice:
            c = tl.shape[1]
            onehot = F.one_hot(types.clamp(min=0), c).permute(0, 3, 1, 2).float()
            terms["type_dice"] = dice_loss(tl.softmax(1), onehot, valid.float()) * weights.type_dice
    tissue = out.tissue_logits  # type: ignore[attr-defined]
    if tissue is not None and tissue_target is not None and weights.tissue_ce:
        terms["tissue_ce"] = F.cross_entropy(tissue.float(), tissue_target) * weights.tissue_ce
    if not terms:  # every weight is 0 (e.g. distillation alone, see TrainConfig.distill): a zero that keeps the graph
        return logits.sum() * 0.0, {}
    total = torch.stack(list(terms.values())).sum()
    return total, {k: float(v.detach()) for k, v in terms.items()}
