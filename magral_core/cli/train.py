"""`magral train`: train a registered detector on one split of a dataset, evaluate it on another.

Writes `<out>/detector.pt` (a self-describing checkpoint) and `<out>/metrics.json`, and prints one summary
line with the validation mAP and AP50.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from magral_core.atomic import atomic_open
from magral_core.cli.progress import add_progress_flags, bar, progress_enabled
from magral_core.config import Config
from magral_core.datasets import load_dataset
from magral_core.errors import UserError
from magral_core.structures import DetectionDataset
from magral_core.vision.checkpoint import save_checkpoint
from magral_core.vision.detectors import DETECTORS, build_detector
from magral_core.vision.engine import (
    DecodedImageCache,
    chosen_image_size,
    fit_detector,
    predict,
    setup_torch,
)
from magral_core.vision.evaluation import evaluate_coco

CHECKPOINT_NAME = "detector.pt"
METRICS_NAME = "metrics.json"


def register(sub: Any) -> None:
    """Add the `train` sub-command."""
    parser = sub.add_parser("train", help="train a detector on a dataset split and evaluate it",
                            description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data", required=True, type=Path, help="dataset: COCO dir/json, VOC dir, LS export")
    parser.add_argument("--train-split", default="train", help="split to train on (default train)")
    parser.add_argument("--val-split", default="val", help="split to evaluate on; '' to skip (default val)")
    parser.add_argument("--detector", default=None, choices=sorted(DETECTORS),
                        help="registered detector (default: config MAGRAL_DETECTOR)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default: config MAGRAL_EPOCHS)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default: config)")
    parser.add_argument("--learning-rate", type=float, default=None, help="peak SGD rate (default: config)")
    parser.add_argument("--image-size", type=int, default=None, help="longest side in px (default: config)")
    parser.add_argument("--schedule", default=None, choices=("epochs", "budget"),
                        help="training length rule (default: config MAGRAL_SCHEDULE); 'budget' carves a "
                             "seeded validation part out of the train split to stop by")
    parser.add_argument("--out", required=True, type=Path, help="output directory (created)")
    add_progress_flags(parser)
    parser.set_defaults(handler=run)


def split_of(dataset: DetectionDataset, name: str) -> DetectionDataset:
    """`dataset.split(name)`, with a UserError naming the known splits."""
    try:
        return dataset.split(name)
    except KeyError:
        raise UserError(f"{dataset.root}: no images in split {name!r}; found splits "
                        f"{sorted(dataset.splits())}") from None


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise UserError(f"--{name} must be > 0, found {value}")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as indented JSON to `path` through a temporary sibling and a rename."""
    with atomic_open(path, "w") as handle:
        json.dump(data, handle, indent=2)


def run(args: argparse.Namespace, config: Config) -> int:
    detector = args.detector or config.detector
    epochs = args.epochs if args.epochs is not None else config.epochs
    batch_size = args.batch_size if args.batch_size is not None else config.batch_size
    learning_rate = args.learning_rate if args.learning_rate is not None else config.learning_rate
    image_size = args.image_size if args.image_size is not None else config.image_size
    for name, value in (("epochs", epochs), ("batch-size", batch_size), ("learning-rate", learning_rate),
                        ("image-size", image_size)):
        _positive(name, value)
    if detector not in DETECTORS:
        raise UserError(f"unknown detector {detector!r}; registered: {sorted(DETECTORS)}")
    if not args.data.exists():
        raise UserError(f"dataset {args.data} not found")
    dataset = load_dataset(args.data)
    train = split_of(dataset, args.train_split)
    val = split_of(dataset, args.val_split) if args.val_split else None
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output directory {args.out}: {exc.strerror}") from None

    setup_torch(config.torch_threads)
    progress = progress_enabled(args.progress)
    config = config.replace(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                            image_size=image_size, schedule=args.schedule or config.schedule)
    fit, part = train, None
    if config.schedule == "budget":  # the simulator's carve: the stopping rule never reads --val-split
        from magral_core.method.proxy import split_validation

        fit_at, part_at = split_validation(np.arange(len(train)), config.seed)
        fit, part = train.subset(fit_at.tolist()), train.subset(part_at.tolist())
    image_size = chosen_image_size(fit, config)
    model = build_detector(detector, num_classes=dataset.num_classes, image_size=image_size,
                           weights_dir=config.weights_dir, seed=config.seed)
    with bar(epochs if config.schedule == "epochs" else None, desc="training", unit="epoch",
             enabled=progress) as epochs_bar:

        def on_epoch(_epoch: int, loss: float) -> None:
            epochs_bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            epochs_bar.update(1)

        # The engine's inner bar counts the batches of the running epoch.
        report = fit_detector(model, fit, config, val=part, progress=progress,
                              cache=DecodedImageCache(fit, image_size), on_epoch=on_epoch)
    metrics: dict[str, Any] = {
        "detector": detector, "train_split": args.train_split, "train_images": len(fit),
        "schedule": config.schedule, "epochs": report.epochs, "steps": report.iterations,
        "best_step": report.best_step, "validation_part_map": report.val_scores,
        "batch_size": batch_size, "learning_rate": learning_rate, "image_size": image_size,
        "seed": config.seed, "train_seconds": report.seconds, "epoch_losses": report.epoch_losses,
    }
    summary = f"trained {detector} on {len(fit)} images ({report.iterations} steps) in {report.seconds:.0f} s"
    if val is not None:
        start = time.perf_counter()
        evaluation = evaluate_coco(val, predict(model, val, score_threshold=config.score_threshold,
                                                progress=progress))
        metrics.update(val_split=args.val_split, val_images=len(val), val=evaluation.as_dict(),
                       inference_seconds_per_image=(time.perf_counter() - start) / len(val))
        summary += f"; {args.val_split}: {evaluation.summary()}"
    checkpoint = save_checkpoint(args.out / CHECKPOINT_NAME, model,
                                 meta={"class_names": list(dataset.class_names), "metrics": metrics})
    write_json_atomic(args.out / METRICS_NAME, metrics)
    print(f"{summary}; wrote {checkpoint}")
    return 0
