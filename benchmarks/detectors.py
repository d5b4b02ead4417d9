"""Detector benchmark on BCCD: speed and memory of every registered detector, accuracy of the default one.

    python -m benchmarks.detectors [--data DIR] [--images 4] [--skip-accuracy] [--threads N]

Part 1, per registered detector, each in a fresh process: training seconds per image (batches of 2, after
one warm-up step), inference seconds per image (batch 1, after one warm-up image), and the process's peak
resident memory (ru_maxrss: the whole Python process, i.e. torch and its libraries — see `baseline_rss` —
plus the model, activations and gradients; it is a high-water mark, not the model's own size).
Part 2: the default detector trained on BCCD `train` with the configured schedule (MAGRAL_EPOCHS,
MAGRAL_BATCH_SIZE, MAGRAL_LEARNING_RATE, MAGRAL_IMAGE_SIZE), evaluated on BCCD `test` (mAP, AP50,
per-class AP).
Wall times depend on what else runs on the machine; CPU seconds are printed beside them.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from magral_core.cli.progress import track

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "bccd"


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure_one(name: str, data: Path, images: int, threads: int) -> dict[str, Any]:
    """Speed and peak RSS of one detector in this process (call in a fresh process)."""
    import torch

    from magral_core.config import Config
    from magral_core.datasets import load_dataset
    from magral_core.vision.detectors import build_detector
    from magral_core.vision.engine import DecodedImageCache, predict, setup_torch, train_detector

    baseline = _rss_mib()
    config = Config.from_env()
    setup_torch(threads)
    dataset = load_dataset(data).split("train").subset(range(images + 2))
    model = build_detector(name, num_classes=dataset.num_classes, image_size=config.image_size,
                           weights_dir=config.weights_dir)
    warm, timed = dataset.subset([0, 1]), dataset.subset(range(2, images + 2))
    warm_cache = DecodedImageCache(warm, config.image_size)
    timed_cache = DecodedImageCache(timed, config.image_size)
    for i in range(len(timed)):
        timed_cache[i]  # decode and resize outside the timed region
    train_detector(model, warm, epochs=1, batch_size=2, learning_rate=1e-4, seed=0, cache=warm_cache)
    report = train_detector(model, timed, epochs=1, batch_size=2, learning_rate=1e-4, seed=0,
                            cache=timed_cache)
    predict(model, warm, batch_size=1, cache=warm_cache)
    start, cpu = time.perf_counter(), time.process_time()
    predict(model, timed, batch_size=1, cache=timed_cache)
    infer_s, infer_cpu = time.perf_counter() - start, time.process_time() - cpu
    return {
        "detector": name, "image_size": config.image_size, "threads": torch.get_num_threads(),
        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "train_s_per_img": report.seconds / images, "train_cpu_s_per_img": report.cpu_seconds / images,
        "infer_s_per_img": infer_s / images, "infer_cpu_s_per_img": infer_cpu / images,
        "baseline_rss_mib": baseline, "peak_rss_mib": _rss_mib(),
    }


def measure_accuracy(data: Path, threads: int, progress: bool) -> dict[str, Any]:
    """Default detector, configured schedule, trained on `train`, evaluated on `test`."""
    from magral_core.config import Config
    from magral_core.datasets import load_dataset
    from magral_core.vision.detectors import build_detector
    from magral_core.vision.engine import predict, setup_torch, train_detector
    from magral_core.vision.evaluation import evaluate_coco

    config = Config.from_env()
    setup_torch(threads)
    dataset = load_dataset(data)
    train, test = dataset.split("train"), dataset.split("test")
    model = build_detector(config.detector, num_classes=dataset.num_classes, image_size=config.image_size,
                           weights_dir=config.weights_dir, seed=config.seed)
    report = train_detector(model, train, epochs=config.epochs, batch_size=config.batch_size,
                            learning_rate=config.learning_rate, seed=config.seed, progress=progress)
    start = time.perf_counter()
    evaluation = evaluate_coco(test, predict(model, test, score_threshold=config.score_threshold))
    return {
        "detector": config.detector, "epochs": config.epochs, "batch_size": config.batch_size,
        "learning_rate": config.learning_rate, "image_size": config.image_size, "threads": threads,
        "train_images": len(train), "test_images": len(test), "train_minutes": report.seconds / 60,
        "train_cpu_minutes": report.cpu_seconds / 60,
        "test_infer_s_per_img": (time.perf_counter() - start) / len(test),
        **evaluation.as_dict(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="BCCD directory (COCO annotations.json)")
    parser.add_argument("--images", type=int, default=4, help="timed images per detector (default 4)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: config)")
    parser.add_argument("--detectors", nargs="*", default=None, help="subset of registered names")
    parser.add_argument("--skip-speed", action="store_true", help="no per-detector speed/memory part")
    parser.add_argument("--skip-accuracy", action="store_true", help="no BCCD training/evaluation part")
    parser.add_argument("--progress", action="store_true", help="progress bars while training")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: one detector
    parser.add_argument("--json", type=Path, default=None, help="also write all figures to this file")
    args = parser.parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from magral_core.config import Config
    from magral_core.vision.detectors import DETECTORS

    threads = args.threads or Config.from_env().torch_threads
    if args.one:
        print(json.dumps(measure_one(args.one, args.data, args.images, threads)))
        return 0
    results: dict[str, Any] = {"speed": [], "accuracy": None}
    if not args.skip_speed:
        print(f"{'detector':26} {'params M':>8} {'train s/img':>11} {'(cpu)':>7} {'infer s/img':>11} "
              f"{'(cpu)':>7} {'peak RSS MiB':>12} {'(base)':>7}")
        for name in track(args.detectors or sorted(DETECTORS), desc="detectors", unit="detector"):
            child = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--one", name, "--data", str(args.data),
                 "--images", str(args.images), "--threads", str(threads)],
                capture_output=True, text=True, check=False,
            )
            if child.returncode != 0:
                print(f"{name:26} failed: {child.stderr.strip().splitlines()[-1:]}")
                continue
            row = json.loads(child.stdout.strip().splitlines()[-1])
            results["speed"].append(row)
            print(f"{name:26} {row['parameters_m']:8.1f} {row['train_s_per_img']:11.3f} "
                  f"{row['train_cpu_s_per_img']:7.3f} {row['infer_s_per_img']:11.3f} "
                  f"{row['infer_cpu_s_per_img']:7.3f} {row['peak_rss_mib']:12.0f} "
                  f"{row['baseline_rss_mib']:7.0f}",
                  flush=True)
    if not args.skip_accuracy:
        acc = measure_accuracy(args.data, threads, args.progress)
        results["accuracy"] = acc
        ap50 = acc["per_class_ap50"]
        classes = ", ".join(f"{k} {v:.3f}/{ap50[k]:.3f}" for k, v in acc["per_class_ap"].items())
        print(f"{acc['detector']} BCCD train→test: mAP {acc['map']:.3f} AP50 {acc['ap50']:.3f} "
              f"(AP/AP50: {classes}); "
              f"{acc['epochs']} epochs × {acc['train_images']} images, batch {acc['batch_size']}, "
              f"lr {acc['learning_rate']}, {acc['image_size']} px, {acc['threads']} threads: "
              f"{acc['train_minutes']:.1f} min wall ({acc['train_cpu_minutes']:.1f} CPU min); "
              f"inference {acc['test_infer_s_per_img']:.3f} s/img")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
