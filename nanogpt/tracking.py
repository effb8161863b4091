"""Recording what a run measures.

metrics.jsonl in the run directory is always written: one JSON object per line,
easy to read back with pandas or a few lines of Python. Trackers such as
Weights & Biases receive the same records.
"""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """Appends one JSON record per call to run_dir/metrics.jsonl."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.file = open(self.path, "a", encoding="utf-8")

    def log(self, record: dict) -> None:
        """Write record as one line, flushed so a crash loses nothing already logged."""
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        """Close the file."""
        self.file.close()


def read_metrics(run_dir: Path) -> list[dict]:
    """All records of a run's metrics.jsonl, in order."""
    path = Path(run_dir) / "metrics.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
