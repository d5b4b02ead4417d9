"""`magral evaluate`: COCO mAP / AP50 / per-class AP of a checkpoint on one split of a dataset."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from magral_core.cli.progress import add_progress_flags, progress_enabled
from magral_core.cli.train import split_of
from magral_core.config import Config
from magral_core.datasets import load_dataset
from magral_core.errors import UserError
from magral_core.vision.checkpoint import load_checkpoint
from magral_core.vision.engine import predict, setup_torch, torch_device
from magral_core.vision.evaluation import evaluate_coco


def register(sub: Any) -> None:
    """Add the `evaluate` sub-command."""
    parser = sub.add_parser("evaluate", help="evaluate a detector checkpoint on a dataset split",
                            description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--checkpoint", required=True, type=Path, help="file written by `magral train`")
    parser.add_argument("--data", required=True, type=Path, help="dataset: COCO dir/json, VOC dir, LS export")
    parser.add_argument("--split", default="test", help="split to evaluate (default test)")
    parser.add_argument("--json", type=Path, default=None, help="also write the metrics to this JSON file")
    add_progress_flags(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, config: Config) -> int:
    model, info = load_checkpoint(args.checkpoint)
    if not args.data.exists():
        raise UserError(f"dataset {args.data} not found")
    dataset = load_dataset(args.data)
    if list(dataset.class_names) != list(info["class_names"]):
        raise UserError(f"{args.data}: classes {list(dataset.class_names)} differ from the checkpoint's "
                        f"{info['class_names']}")
    split = split_of(dataset, args.split)
    setup_torch(config.torch_threads)
    model.to(torch_device(config.device))
    detections = predict(model, split, score_threshold=config.score_threshold,
                         progress=progress_enabled(args.progress))
    evaluation = evaluate_coco(split, detections)
    if args.json is not None:
        args.json.write_text(json.dumps({"split": args.split, "images": len(split), **evaluation.as_dict()},
                                        indent=2))
    print(f"{info['detector']} on {args.split} ({len(split)} images): {evaluation.summary()}")
    return 0
