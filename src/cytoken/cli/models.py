"""``cytoken models``: list the known models with their licences; ``cytoken models convert`` CellViT checkpoints."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the command."""
    p = sub.add_parser("models", help="list models (name, licence, classes) or convert a CellViT checkpoint")
    msub = p.add_subparsers(dest="models_command", metavar="SUBCOMMAND")
    p.set_defaults(func=run_list)
    lp = msub.add_parser("list", help="list the models (default)")
    lp.set_defaults(func=run_list)
    cp = msub.add_parser("convert", help="convert an official CellViT/CellViT++ .pth checkpoint to a cytoken bundle")
    cp.add_argument("checkpoint", type=Path, help="official CellViT / CellViT++ checkpoint (.pth)")
    cp.add_argument("--out", required=True, type=Path, help="output folder")
    cp.set_defaults(func=run_convert)


def run_list(args: argparse.Namespace) -> int:
    """Print the manifest."""
    from cytoken.weights import list_models

    for e in list_models():
        have = "embedded" if e.path is not None and e.path.is_file() else "not installed"
        classes = ", ".join(e.class_names) or "-"
        version = f" {e.version}" if e.version else ""
        print(f"{e.name}{version}  [{have}]  {e.mpp} µm/px  classes: {classes}")
        print(f"    {e.description}")
        print(f"    licence: {e.licence}")
        if e.classifier_path is not None:
            state = "embedded" if (e.classifier_path / "weights.safetensors").is_file() else "not installed"
            print(f"    default cell classifier: {e.classifier} [{state}] (--classifier none: type head)")
        if e.metrics:
            print("    metrics:")
            for k, v in e.metrics.items():
                print(f"      {k}: {_metric(v)}")
        if e.card:
            print(f"    model card: {e.card}")
    return 0


def _metric(value: Any) -> str:
    """A manifest metric as text: numbers as given, per-class dicts as ``name value, ...``."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {_metric(v)}" for k, v in value.items())
    return str(value)


def run_convert(args: argparse.Namespace) -> int:
    """Convert a CellViT checkpoint."""
    from cytoken.models.cellvit import convert_cellvit_checkpoint

    out = convert_cellvit_checkpoint(args.checkpoint, args.out)
    print(f"wrote {out}")
    return 0
