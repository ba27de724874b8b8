"""Low-rank adaptation (LoRA, Hu et al. 2021) of an encoder's attention and MLP linear layers.

``add_lora`` replaces chosen ``nn.Linear`` layers inside the transformer blocks by :class:`LoRALinear`, which keeps
the original ``weight``/``bias`` parameters *under their original names* and adds ``lora_A`` (r × in) and ``lora_B``
(out × r), so ``y = x Wᵀ + b + (α / r) · x Aᵀ Bᵀ``. ``B`` starts at zero, so the adapted model starts identical to the
frozen one. Only the LoRA tensors are saved (:func:`save_lora`, a small safetensors file with the layer list in its
metadata); :func:`load_lora` adds the layers named in the file and loads them strictly; :func:`merge_lora` folds
``(α / r) · B A`` into ``W`` and puts plain ``nn.Linear`` layers back for inference (state dict = the base layout);
:func:`merged_state_dict` gives those merged weights without changing the model (the trainer saves its merged
weight files that way while training goes on).

Why not ``peft``: it installs (with transformers, accelerate and tokenizers) and its ``inject_adapter_in_model``
works on these plain modules, but it renames the frozen weights (``attn.qkv.base_layer.weight``) so cytoken's strict
weight files and CellViT key maps no longer match while LoRA is attached, its suffix matching of ``proj`` also
catches the patch embedding's ``patch_embed.proj`` convolution, and importing it pulls in transformers (several
seconds of CPU at import). The layer here is ~40 lines (see docs/adapters.md).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cytoken.io.atomic import atomic_path
from cytoken.models.weights_io import WeightsError

__all__ = [
    "LORA_TARGETS",
    "LoRALinear",
    "add_lora",
    "load_lora",
    "lora_layers",
    "lora_state_dict",
    "merge_lora",
    "merged_state_dict",
    "save_lora",
]

# Linear layers LoRA may target: leaf name -> the block sub-module holding it (ViT: attn.qkv/proj, mlp.fc1/fc2;
# SAM: attn.qkv/proj, mlp.lin1/lin2). Only layers inside `blocks.N.<parent>` are matched (never patch_embed.proj).
LORA_TARGETS = {"qkv": "attn", "proj": "attn", "fc1": "mlp", "fc2": "mlp", "lin1": "mlp", "lin2": "mlp"}
LORA_FORMAT = "cytoken.lora"


class LoRALinear(nn.Linear):
    """A linear layer with a trainable low-rank update; ``weight`` and ``bias`` are the wrapped layer's own tensors.

    Args:
        base: the layer to adapt (its parameters are shared, not copied).
        rank: r, the rank of the update.
        alpha: scaling numerator: the update is multiplied by ``alpha / rank``.
        dropout: dropout on the LoRA branch input (training only).

    Example:
        >>> lin = nn.Linear(8, 4)
        >>> lora = LoRALinear(lin, rank=2, alpha=4.0)
        >>> x = torch.randn(3, 8)
        >>> bool(torch.equal(lora(x), lin(x)))  # B starts at zero
        True
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        nn.Module.__init__(self)  # no nn.Linear.__init__: reuse the base parameters instead of allocating new ones
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
        if not alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {alpha!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)  # the base's Parameter, or None
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base projection plus the scaled low-rank update."""
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + self.scaling * update

    def merged_weight(self) -> torch.Tensor:
        """``W + (α / r) · B A`` as a new tensor (computed in float32, returned in ``W``'s dtype; no autograd).

        Example:
            >>> lora = LoRALinear(nn.Linear(8, 4), rank=2, alpha=4.0)
            >>> bool(torch.equal(lora.merged_weight(), lora.weight))  # B is still zero
            True
        """
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
            return (self.weight.float() + delta).to(self.weight.dtype)

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``W + (α / r) · B A`` (and the same bias and ``requires_grad``)."""
        with torch.device(self.weight.device):
            lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            lin.weight = nn.Parameter(self.merged_weight())
            if self.bias is not None:
                lin.bias = self.bias
        lin.weight.requires_grad_(self.weight.requires_grad)
        return lin

    def extra_repr(self) -> str:
        """Sizes, rank and alpha (shown in ``print(model)``)."""
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def _targets(targets: str | Iterable[str]) -> tuple[str, ...]:
    names = (targets,) if isinstance(targets, str) else tuple(targets)
    bad = [t for t in names if t not in LORA_TARGETS]
    if not names or bad:
        raise ValueError(f"LoRA targets {list(names)!r}: allowed are {sorted(LORA_TARGETS)}")
    return names


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRA layers of ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _freeze(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith((".lora_A", ".lora_B")))


def add_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    targets: str | Sequence[str] = ("qkv", "proj"),
    *,
    dropout: float = 0.0,
    freeze: bool = True,
) -> list[str]:
    """Wrap the targeted linear layers of every transformer block of ``model`` with :class:`LoRALinear`.

    Args:
        model: an encoder (or a segmenter: its ``encoder.blocks`` are matched the same way).
        rank: r.
        alpha: the update is scaled by ``alpha / rank``.
        targets: leaf names among ``qkv``, ``proj`` (attention), ``fc1``, ``fc2`` (ViT MLP), ``lin1``, ``lin2``
            (SAM MLP); only layers at ``blocks.N.attn.<leaf>`` / ``blocks.N.mlp.<leaf>`` are wrapped.
        dropout: dropout on the LoRA branch input.
        freeze: set ``requires_grad=False`` on every parameter of ``model`` except the LoRA tensors (pass the
            encoder, not the segmenter, to keep the decoder trainable).

    Returns:
        The names of the wrapped layers.

    Raises:
        ValueError: unknown targets, a layer that already has LoRA, or no matching layer at all.

    Example:
        >>> from cytoken.models import build_encoder
        >>> enc = build_encoder("vit_tiny_test")
        >>> add_lora(enc, rank=4, alpha=8, targets=["qkv"])
        ['blocks.0.attn.qkv', 'blocks.1.attn.qkv']
        >>> sorted({p.requires_grad for n, p in enc.named_parameters() if "lora_" not in n})
        [False]
    """
    wanted = _targets(targets)
    names = []
    for name, module in list(model.named_modules()):
        parts = name.split(".")
        if len(parts) < 4 or parts[-1] not in wanted or parts[-2] != LORA_TARGETS[parts[-1]]:
            continue
        if parts[-4] != "blocks" or not parts[-3].isdigit():
            continue
        if isinstance(module, LoRALinear):
            raise ValueError(f"layer {name} already has LoRA; merge_lora() first or use it as it is")
        if type(module) is not nn.Linear:
            continue
        _set(model, name, LoRALinear(module, rank, alpha, dropout))
        names.append(name)
    if not names:
        raise ValueError(
            f"no linear layer of {type(model).__name__} matches LoRA targets {list(wanted)} "
            "(expected blocks.N.attn.qkv/proj or blocks.N.mlp.fc1/fc2/lin1/lin2)"
        )
    if freeze:
        _freeze(model)
    return names


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors (``<layer>.lora_A``, ``<layer>.lora_B``) of ``model``, detached on the CPU.

    Example:
        >>> from cytoken.models import build_encoder
        >>> enc = build_encoder("vit_tiny_test")
        >>> _ = add_lora(enc, rank=2, targets="proj")
        >>> sorted(lora_state_dict(enc))[:2]
        ['blocks.0.attn.proj.lora_A', 'blocks.0.attn.proj.lora_B']
    """
    return {
        k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))
    }


def save_lora(model: nn.Module, path: str | Path, *, meta: dict[str, str] | None = None) -> Path:
    """Write the LoRA tensors of ``model`` to a safetensors file (atomically), frozen weights excluded.

    The metadata records every LoRA layer's name, rank and alpha, so :func:`load_lora` can rebuild them.

    Raises:
        ValueError: when ``model`` has no LoRA layer.
    """
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers to save (call add_lora first)")
    spec = {n: {"rank": m.rank, "alpha": m.alpha} for n, m in layers.items()}
    metadata = {"format": LORA_FORMAT, "layers": json.dumps(spec), **{k: str(v) for k, v in (meta or {}).items()}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(lora_state_dict(model), str(tmp), metadata=metadata)
    return path


def load_lora(model: nn.Module, path: str | Path, *, freeze: bool = True) -> list[str]:
    """Load a file written by :func:`save_lora` into ``model``, adding the LoRA layers it names when missing.

    Loading is strict: every LoRA tensor of the model must be in the file with the same shape, and nothing else.

    Args:
        model: the same architecture the LoRA was trained on (with or without LoRA layers already).
        path: the ``.safetensors`` file.
        freeze: freeze every non-LoRA parameter (as :func:`add_lora`).

    Returns:
        The names of the LoRA layers.

    Raises:
        WeightsError: unreadable file, not a LoRA file, a named layer that is not a linear layer of ``model``, or
            missing / unexpected / mis-shaped tensors.
    """
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open has no __iter__)
    except Exception as exc:
        raise WeightsError(f"cannot read LoRA weights from {path}: {type(exc).__name__}: {exc}") from None
    if meta.get("format") != LORA_FORMAT or "layers" not in meta:
        raise WeightsError(f"{path} is not a cytoken LoRA file (metadata format {meta.get('format')!r})")
    spec: dict[str, dict] = json.loads(meta["layers"])
    modules = dict(model.named_modules())
    for name, s in spec.items():
        m = modules.get(name)
        if isinstance(m, LoRALinear):
            if m.lora_A.shape[0] != int(s["rank"]):
                raise WeightsError(f"LoRA layer {name}: model rank {m.lora_A.shape[0]} vs file rank {s['rank']}")
            continue
        if type(m) is not nn.Linear:
            raise WeightsError(f"{path} has LoRA for {name!r}, which is not a linear layer of {type(model).__name__}")
        _set(model, name, LoRALinear(m, int(s["rank"]), float(s["alpha"])))
    own = {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]  # fmt: skip
    if missing or unexpected or shapes:
        raise WeightsError(
            f"LoRA file {path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches {shapes[:3]}"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)
    if freeze:
        _freeze(model)
    return list(spec)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict :func:`merge_lora` would leave ``model`` with, without changing ``model``.

    LoRA tensors are left out and every adapted layer's ``weight`` is its merged weight (the same arithmetic as
    :func:`merge_lora`), so the result loads strictly into the architecture without LoRA. Tensors stay on their
    device, detached; those of layers without LoRA are the model's own (no copy).

    Example:
        >>> from cytoken.models import build_encoder
        >>> enc = build_encoder("vit_tiny_test")
        >>> plain_keys = set(enc.state_dict())
        >>> _ = add_lora(enc, rank=2)
        >>> set(merged_state_dict(enc)) == plain_keys, len(lora_layers(enc))
        (True, 4)
    """
    layers = lora_layers(model)
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith((".lora_A", ".lora_B")) or k in ("lora_A", "lora_B"):
            continue
        layer, _, leaf = k.rpartition(".")
        out[k] = layers[layer].merged_weight() if leaf == "weight" and layer in layers else v.detach()
    return out


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight and put plain ``nn.Linear`` layers back (in place).

    The merged model computes the same function (up to float rounding) without the extra matmuls, and its state dict
    has the base layout again (loadable into a model without LoRA).

    Returns:
        ``model`` (for chaining).

    Example:
        >>> from cytoken.models import build_encoder
        >>> enc = build_encoder("vit_tiny_test")
        >>> _ = add_lora(enc, rank=2)
        >>> merge_lora(enc) is enc, lora_layers(enc)
        (True, {})
    """
    for name, m in list(lora_layers(model).items()):
        _set(model, name, m.merged())
    return model
