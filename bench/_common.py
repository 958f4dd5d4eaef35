"""What every benchmark script writes besides its own table: the JSON report."""

from __future__ import annotations

import json
import os
import sys
import time


def write_report(path: str, argv, script: str, report: dict) -> dict:
    """Adds command, machine and time to `report`, writes it as JSON to `path`, returns it."""
    full = {
        "command": f"python bench/{script} " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": sys.platform},
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **report,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(full, f, indent=2)
    return full
