"""``cytoken train segmenter --config FILE.yaml [--resume]``."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the command."""
    p = sub.add_parser("train", help="train models")
    tsub = p.add_subparsers(dest="train_command", metavar="WHAT")
    tsub.required = True
    sp = tsub.add_parser("segmenter", help="train a cell segmenter from a YAML config (see configs/)")
    sp.add_argument("--config", required=True, type=Path, help="YAML training config (TrainConfig)")
    sp.add_argument("--resume", action="store_true", help="continue from OUT_DIR/last.pt exactly")
    sp.add_argument("--out-dir", type=Path, default=None, help="override out_dir of the config")
    sp.add_argument("--quiet", action="store_true", help="no progress bars")
    sp.set_defaults(func=run_segmenter)


def run_segmenter(args: argparse.Namespace) -> int:
    """Train."""
    from cytoken.training.config import load_train_config
    from cytoken.training.loop import train_segmenter

    overrides = {"out_dir": str(args.out_dir)} if args.out_dir else None
    config = load_train_config(args.config, overrides)
    result = train_segmenter(config, resume=args.resume, progress=not args.quiet)
    print(f"trained {result.epochs_run} epochs; best {config.early_stopping_metric} {result.best_metric:.4f}; "
          f"weights: {result.best_weights}; checkpoint: {result.last_checkpoint}")  # fmt: skip
    return 0
