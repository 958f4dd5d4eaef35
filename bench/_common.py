"""What the benchmark scripts share: the JSON report they write, reading a job's run, and
a run's steady time."""

from __future__ import annotations

import glob
import json
import os
import shlex
import sys
import time


def write_report(path: str, argv, script: str, report: dict) -> dict:
    """Adds command, machine and time to `report`, writes it as JSON to `path`, returns it."""
    full = {
        "command": shlex.join(["python", f"bench/{script}", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpus": os.cpu_count(), "platform": sys.platform},
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **report,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(full, f, indent=2)
    return full


def steady_seconds(manifest: dict) -> float:
    """A run's seconds without its wait for the model load (the manifest's elapsed_seconds -
    its model_wait_ms): the load runs beside the first decodes, so its CPU stays in."""
    return manifest["elapsed_seconds"] - manifest["metrics"].get("model_wait_ms", 0) / 1000


def read_run(run_dir: str) -> tuple[dict[str, dict], int]:
    """A job's run directory -> ({path: caption record}, number of error records)."""
    records, errors = {}, 0
    for path in sorted(glob.glob(os.path.join(glob.escape(run_dir), "captions-*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            records.update((r["path"], r) for r in map(json.loads, f))
    for path in glob.glob(os.path.join(glob.escape(run_dir), "errors-*.jsonl")):
        with open(path, encoding="utf-8") as f:
            errors += sum(1 for _ in f)
    return records, errors
