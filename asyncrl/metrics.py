"""Per-step metrics: one JSON object per learner step appended to metrics.jsonl.

Lines are flushed as they are written so that `asyncrl run` can follow a live run. Must never
block training on anything slower than a local file write.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; a missing number is more honest than a crash
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    return value


class MetricsWriter:
    def __init__(self, path: Optional[Path]):
        self.path = path
        self._file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", buffering=1)

    def write(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: Path) -> list[dict]:
    """All complete records of a metrics.jsonl (a partly written last line is skipped)."""
    records = []
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
