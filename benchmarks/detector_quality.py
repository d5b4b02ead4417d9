"""Detector quality on BCCD per training change: mAP, AP50, per-class AP and training seconds.

    python -m benchmarks.detector_quality [--data DIR] [--labeled 20 60 all] [--variants NAME ...]
        [--warm-chain] [--out docs/results/detector_quality.json] [--markdown]

Each variant is trained on a seeded subset of BCCD `train` (`--labeled` images, or `all`) and evaluated on
BCCD `val` (where variants are chosen) and `test` (reported only). Variants that stop early carve their
validation part out of the labeled subset (`method.proxy.split_validation`, as the simulator does) and train
on the rest; fixed schedules train on the whole subset. Every finished (variant, labeled) cell is written to
`--out` at once (atomic JSON), and cells already there are not run again, so an interrupted run resumes.
`--markdown` prints the table of `--out` without training. `--warm-chain` trains the `--labeled` sizes in
order as successive rounds do (the first from the ImageNet trunk, each next warm-started from the one
before, `vision.warm_start.warm_start`) and writes cells `<variant>@<n> warm`, to set against the cold
`<variant>@<n>`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "bccd"
DEFAULT_OUT = REPO / "docs" / "results" / "detector_quality.json"
SUBSET_SEED = 0
RULE_FIELDS = ("detector", "schedule", "epochs", "steps_per_image", "min_steps", "max_steps", "eval_every",
               "patience", "zoom_min", "zoom_max", "colour_jitter", "image_size", "max_image_size",
               "batch_size", "learning_rate", "seed")

BUDGET = {"schedule": "budget"}
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {"doc": "the configured default: 10 epochs, 448 px, flips only", "config": {}},
    "budget": {"doc": "step budget clip(4 n, 300, 1200), best val-part mAP every 50 steps, patience 4",
               "config": BUDGET},
    "budget+zoom": {"doc": "budget + zoom in/out 0.8-1.6", "config": {**BUDGET, "zoom_min": 0.8,
                                                                      "zoom_max": 1.6}},
    "budget+colour": {"doc": "budget + colour jitter 0.2", "config": {**BUDGET, "colour_jitter": 0.2}},
    "budget+zoom+colour": {"doc": "budget + zoom 0.8-1.6 + colour jitter 0.2",
                           "config": {**BUDGET, "zoom_min": 0.8, "zoom_max": 1.6, "colour_jitter": 0.2}},
    "budget+p3": {"doc": "budget + a stride-8 level and 12-384 px anchors (frcnn_mobilenet_v2_p3)",
                  "config": {**BUDGET, "detector": "frcnn_mobilenet_v2_p3"}},
    "budget+p3+zoom+long": {"doc": "budget+p3 + zoom 0.8-1.6, 6 steps per image",
                            "config": {**BUDGET, "detector": "frcnn_mobilenet_v2_p3", "zoom_min": 0.8,
                                       "zoom_max": 1.6, "steps_per_image": 6.0}},
    "budget+size": {"doc": "budget + input size chosen from the box sizes, at most 640 px",
                    "config": {**BUDGET, "max_image_size": 640}},
}
"""Variant name -> `doc` (one line) and `config`: the `Config` fields it changes."""


def labeled_subset(train_size: int, labeled: str) -> list[int]:
    """Positions of the labeled subset of `train`: the first `labeled` of a permutation seeded with
    SUBSET_SEED (so 20 is contained in 60), or every position for `all`."""
    import numpy as np

    if labeled == "all":
        return list(range(train_size))
    count = int(labeled)
    if not 1 <= count <= train_size:
        raise ValueError(f"--labeled must be within [1, {train_size}] or 'all', found {labeled}")
    return sorted(np.random.default_rng(SUBSET_SEED).permutation(train_size)[:count].tolist())


def run_cell(data: Path, variant: str, labeled: str, start_from: Any = None) -> dict[str, Any]:
    """Train one variant on one labeled subset; its val and test figures and training seconds.
    `start_from`, a trained detector, warm-starts the model as a round does (`vision.warm_start.warm_start`)
    instead of training from the ImageNet trunk; the trained model is returned in the row's "model"."""
    import numpy as np
    import torch

    from magral_core.config import Config
    from magral_core.datasets import load_dataset
    from magral_core.method.proxy import split_validation
    from magral_core.vision.detectors import build_detector
    from magral_core.vision.engine import chosen_image_size, fit_detector, predict
    from magral_core.vision.evaluation import evaluate_coco

    config = Config.from_env().replace(**VARIANTS[variant]["config"])
    dataset = load_dataset(data)
    train, val, test = dataset.split("train"), dataset.split("val"), dataset.split("test")
    positions = np.asarray(labeled_subset(len(train), labeled))
    fit, part = (split_validation(positions, config.seed) if config.schedule == "budget"
                 else (positions, positions[:0]))
    fit_set = train.subset(fit.tolist())
    image_size = chosen_image_size(fit_set, config)
    model = build_detector(config.detector, num_classes=dataset.num_classes, image_size=image_size,
                           weights_dir=config.weights_dir, seed=config.seed)
    warm_tensors = None
    if start_from is not None:
        from magral_core.vision.warm_start import warm_start

        warm_tensors = warm_start(model, start_from)
    report = fit_detector(model, fit_set, config,
                          val=train.subset(part.tolist()) if len(part) else None)
    row: dict[str, Any] = {"variant": variant, "doc": VARIANTS[variant]["doc"], "labeled": len(positions),
                           "train_images": report.images, "image_size": image_size,
                           "steps": report.iterations,
                           "best_step": report.best_step, "val_part_scores": report.val_scores,
                           "train_seconds": report.seconds, "train_cpu_seconds": report.cpu_seconds,
                           "torch_threads": torch.get_num_threads(),
                           "rule": {k: getattr(config, k) for k in RULE_FIELDS}}
    if warm_tensors is not None:
        row["warm_tensors"] = warm_tensors
    for name, split in (("val", val), ("test", test)):
        start = time.perf_counter()
        row[name] = evaluate_coco(split, predict(model, split, score_threshold=config.score_threshold)
                                  ).as_dict()
        row[f"{name}_infer_s_per_img"] = (time.perf_counter() - start) / len(split)
    row["model"] = model
    return row


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {"cells": {}}


def markdown(results: dict[str, Any]) -> str:
    """The results as one Markdown table, one row per (labeled, variant) cell, in VARIANTS order."""
    rank = {name: i for i, name in enumerate(VARIANTS)}
    cells = sorted(results["cells"].values(),
                   key=lambda r: (r["labeled"], rank.get(r["variant"], 99), "warm_from" in r))
    classes = sorted({c for r in cells for c in r["test"]["per_class_ap"]})
    head = ("| labeled | variant | trained on | px | steps (kept) | val mAP | test mAP | test AP50 | "
            + " | ".join(f"test AP {c}" for c in classes) + " | train s | train CPU s |")
    lines = [head, "|" + "---|" * (10 + len(classes))]
    for r in cells:
        per = " | ".join(f"{r['test']['per_class_ap'].get(c, float('nan')):.3f}" for c in classes)
        kept = "" if r.get("best_step") is None else f" ({r['best_step']})"
        name = r["variant"] + (f", warm from {r['warm_from']}" if "warm_from" in r else "")
        lines.append(f"| {r['labeled']} | {name} | {r['train_images']} | {r['image_size']} | "
                     f"{r['steps']}{kept} | {r['val']['map']:.3f} | {r['test']['map']:.3f} | "
                     f"{r['test']['ap50']:.3f} | {per} | {r['train_seconds']:.0f} | "
                     f"{r['train_cpu_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="BCCD directory")
    parser.add_argument("--labeled", nargs="+", default=["20"], help="labeled subset sizes, or 'all'")
    parser.add_argument("--variants", nargs="+", default=None, help=f"subset of {sorted(VARIANTS)}")
    parser.add_argument("--warm-chain", action="store_true",
                        help="train --labeled sizes in order as rounds do: the first from ImageNet, each next"
                             " warm-started from the one before (cells '<variant>@<n> warm')")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (resumed)")
    parser.add_argument("--markdown", action="store_true", help="print the table of --out and exit")
    args = parser.parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from magral_core.atomic import atomic_open
    from magral_core.config import Config
    from magral_core.vision.engine import setup_torch

    results = _load(args.out)
    if args.markdown:
        print(markdown(results))
        return 0
    setup_torch(Config.from_env().torch_threads)
    variants = args.variants or list(VARIANTS)
    for variant in variants:
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r}; known: {sorted(VARIANTS)}")

    def record(key: str, row: dict[str, Any]) -> None:
        results["cells"][key] = {k: v for k, v in row.items() if k != "model"}
        with atomic_open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
        print(f"{key}: val mAP {row['val']['map']:.3f}; test mAP {row['test']['map']:.3f} AP50 "
              f"{row['test']['ap50']:.3f} {row['test']['per_class_ap']}; {row['steps']} steps, "
              f"{row['train_seconds']:.0f} s", flush=True)

    if args.warm_chain:  # a chain is trained whole: its models are not kept between runs
        for variant in variants:
            previous: Any = None
            for before, labeled in zip([None, *args.labeled], args.labeled, strict=False):
                row = run_cell(args.data, variant, labeled, start_from=previous)
                if before is not None:
                    row["warm_from"] = int(before) if before != "all" else before
                    record(f"{variant}@{labeled} warm", row)
                previous = row["model"]
        return 0
    for labeled in args.labeled:
        for variant in variants:
            key = f"{variant}@{labeled}"
            if key not in results["cells"]:
                record(key, run_cell(args.data, variant, labeled))
    return 0


if __name__ == "__main__":
    sys.exit(main())
