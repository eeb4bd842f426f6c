"""Prompts, tokenizers and rewards: where a rollout server gets what to generate and how it scored.

Owns choosing a task from `TaskConfig`. Built-in digit tasks use the fixed `CharTokenizer` and need
no files; task 'dataset' reads a local file and needs a real model's tokenizer. Must never
download, generate, or import the learner.
"""

from __future__ import annotations

from typing import Optional

from asyncrl.config import TaskConfig
from asyncrl.rollout.tasks.base import Prompt, Task
from asyncrl.rollout.tasks.dataset import DatasetTask
from asyncrl.rollout.tasks.digits import DIGIT_TASKS
from asyncrl.rollout.tasks.tokenizer import CharTokenizer, HFTokenizer, Tokenizer

TASK_NAMES: tuple[str, ...] = (*DIGIT_TASKS, DatasetTask.name)


def build_task(cfg: TaskConfig, model_path: Optional[str] = None) -> Task:
    """The task `cfg.name` names. `model_path` (model.path) gives task 'dataset' its tokenizer;
    the built-in digit tasks always use `CharTokenizer` and ignore it. The caller checks that
    `task.tokenizer.vocab_size` fits the model's vocabulary."""
    if cfg.name in DIGIT_TASKS:
        return DIGIT_TASKS[cfg.name](cfg.num_digits)
    if cfg.name == DatasetTask.name:
        if model_path is None:
            raise ValueError(
                "task 'dataset' needs a real model's tokenizer: set model.path to a local Hugging Face "
                "model directory (the random-init model only speaks the built-in digit tasks)"
            )
        return DatasetTask(cfg, HFTokenizer(model_path))
    raise ValueError(f"task.name = {cfg.name!r} is not a task; valid names: {list(TASK_NAMES)}")


__all__ = ["CharTokenizer", "HFTokenizer", "Prompt", "Task", "TASK_NAMES", "Tokenizer", "build_task"]
