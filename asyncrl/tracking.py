"""Where per-step metrics go: always metrics.jsonl, and TensorBoard and Weights & Biases when configured.

A `Sink` takes one record (a flat-ish dict of numbers, as the learner writes it) per step. The
`Tracker` fans a record out to every configured sink. TensorBoard and W&B get the numeric
values only, nested dicts flattened to 'a/b' (the staleness histogram becomes
staleness_hist/0, staleness_hist/1, ...). W&B runs offline unless WANDB_MODE says otherwise:
nothing here may reach its servers; `wandb sync <out>/wandb/offline-run-*` uploads later.
Must never block training on anything slower than a local file write, and never import torch
at module level.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Protocol

from asyncrl.config import Config
from asyncrl.metrics import MetricsWriter


class Sink(Protocol):
    def write(self, record: dict) -> None: ...
    def close(self) -> None: ...


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a record, nested dicts flattened to 'key/sub'."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


class JsonlSink:
    def __init__(self, path: Path):
        self._writer = MetricsWriter(path)

    def write(self, record: dict) -> None:
        self._writer.write(record)

    def close(self) -> None:
        self._writer.close()


class TensorBoardSink:
    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError("tracking.tensorboard=true needs TensorBoard: pip install tensorboard") from exc
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, record: dict) -> None:
        step = int(record.get("step", 0))
        for name, value in scalars(record).items():
            self._writer.add_scalar(name, value, step)

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    def __init__(self, out_dir: Path, project: str, run_name: str, config: dict):
        try:
            import wandb
        except ImportError as exc:
            raise ImportError("tracking.wandb=true needs Weights & Biases: pip install wandb") from exc
        self._wandb = wandb
        mode = os.environ.get("WANDB_MODE", "offline")
        out_dir.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(project=project, name=run_name, dir=str(out_dir), mode=mode, config=config, reinit="create_new")

    def write(self, record: dict) -> None:
        self._run.log(scalars(record), step=int(record.get("step", 0)))

    def close(self) -> None:
        self._run.finish()


class Tracker:
    """Fans each record out to every sink."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks

    def write(self, record: dict) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def build_tracker(cfg: Config, out_dir: Optional[Path]) -> Tracker:
    """metrics.jsonl under out_dir (nothing without one), plus the sinks cfg.tracking turns on."""
    if out_dir is None:
        return Tracker([])
    sinks: list[Sink] = [JsonlSink(out_dir / "metrics.jsonl")]
    if cfg.tracking.tensorboard:
        sinks.append(TensorBoardSink(out_dir / "tensorboard"))
    if cfg.tracking.wandb:
        sinks.append(WandbSink(out_dir, cfg.tracking.wandb_project, cfg.run_name, cfg.model_dump(mode="json")))
    return Tracker(sinks)
