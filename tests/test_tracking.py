"""Metric sinks: metrics.jsonl always, TensorBoard and offline W&B when configured, read back with their own readers."""

import json
import time

import pytest

from asyncrl.config import load_config
from asyncrl.tracking import build_tracker, scalars

RECORD = {"step": 3, "loss": 0.25, "ess": 0.9, "staleness_hist": {"0": 5, "1": 3}, "note": "text", "bad": float("nan")}


def test_scalars_flatten_nested_numbers_and_leave_out_the_rest():
    assert scalars(RECORD) == {"step": 3.0, "loss": 0.25, "ess": 0.9, "staleness_hist/0": 5.0, "staleness_hist/1": 3.0}


def test_metrics_jsonl_is_always_written(tmp_path):
    tracker = build_tracker(load_config(None), tmp_path)
    tracker.write(RECORD)
    tracker.close()
    line = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert line["loss"] == 0.25 and line["bad"] is None


def test_tensorboard_sink_writes_scalars_tensorboard_can_read(tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoard is not installed: pip install tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = build_tracker(load_config(None, ["tracking.tensorboard=true"]), tmp_path)
    tracker.write(RECORD)
    tracker.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"loss", "staleness_hist/1"} <= set(events.Tags()["scalars"])
    (point,) = events.Scalars("loss")
    assert (point.step, point.value) == (3, 0.25)


def test_wandb_sink_logs_offline_to_the_output_directory(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="Weights & Biases is not installed: pip install wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = build_tracker(load_config(None, ["tracking.wandb=true", "run_name=tracked"]), tmp_path)
    tracker.write(RECORD)
    tracker.close()
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    # This wandb has no reader for its offline log; the keys are stored as plain strings in it.
    # Its writer is a separate service process that may still be flushing when finish() returns.
    deadline = time.monotonic() + 15
    while b"staleness_hist/1" not in (data := run_file.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert b"staleness_hist/1" in data and b"0.25" in data
