"""Prompts with reference answers from a local jsonl or parquet file, scored by a text reward.

Owns reading the file (by extension: `.jsonl`, `.parquet`), checking it once at load so that a
wrong column or an empty file is reported before anything generates, and turning a sampled row
into a `Prompt` through a real model's tokenizer. Must never download: datasets are local files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

from asyncrl.config import TaskConfig
from asyncrl.rollout.tasks.base import Prompt
from asyncrl.rollout.tasks.rewards import exact_match_reward, extract_final_number, gsm8k_reward
from asyncrl.rollout.tasks.tokenizer import HFTokenizer

REWARDS: dict[str, Callable[[str, str], float]] = {"exact": exact_match_reward, "gsm8k": gsm8k_reward}

SUFFIXES = (".jsonl", ".parquet")


def _read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    rows, columns = [], {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"dataset {str(path)!r} line {line_no} is not valid JSON: {exc}") from None
        if not isinstance(row, dict):
            raise ValueError(
                f"dataset {str(path)!r} line {line_no} holds a {type(row).__name__}, not a JSON object"
            )
        rows.append(row)
        columns.update(dict.fromkeys(row))
    return rows, list(columns)


def _read_parquet(path: Path, keys: list[str]) -> tuple[list[dict], list[str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            f"reading the parquet dataset {str(path)!r} needs pyarrow: pip install pyarrow "
            "(or pip install 'asyncrl[parquet]')"
        ) from None
    columns = list(pq.read_schema(path).names)
    present = [k for k in keys if k in columns]
    return pq.read_table(path, columns=present).to_pylist(), columns


def load_rows(path: str, prompt_key: str, answer_key: str) -> list[tuple[str, str]]:
    """(prompt, answer) pairs of a jsonl or parquet file, every row checked to have both columns."""
    file = Path(path)
    if file.suffix not in SUFFIXES:
        raise ValueError(f"dataset {path!r}: unsupported file type {file.suffix!r}; use one of {list(SUFFIXES)}")
    if not file.is_file():
        raise FileNotFoundError(f"dataset file {path!r} does not exist (task.path)")
    keys = {"task.prompt_key": prompt_key, "task.answer_key": answer_key}
    if file.suffix == ".jsonl":
        rows, columns = _read_jsonl(file)
    else:
        rows, columns = _read_parquet(file, list(keys.values()))
    if not rows:
        raise ValueError(f"dataset {path!r} holds no rows")
    for setting, key in keys.items():
        if key not in columns:
            raise ValueError(
                f"dataset {path!r} has no column {key!r} ({setting}); available columns: {columns}"
            )
    pairs = []
    for index, row in enumerate(rows):
        values = [row.get(key) for key in keys.values()]
        for (setting, key), value in zip(keys.items(), values):
            if value is None:
                raise ValueError(f"dataset {path!r} row {index} has no value in column {key!r} ({setting})")
        pairs.append((str(values[0]), str(values[1])))
    return pairs


class DatasetTask:
    """Rows of a local file as prompts; the reward compares the decoded response with the answer column."""

    name = "dataset"

    def __init__(self, cfg: TaskConfig, tokenizer: HFTokenizer) -> None:
        if cfg.path is None:
            raise ValueError("task 'dataset' needs task.path: a local .jsonl or .parquet file of prompts")
        self.tokenizer = tokenizer
        self.rows = load_rows(cfg.path, cfg.prompt_key, cfg.answer_key)
        self._score = REWARDS[cfg.reward]
        if cfg.reward == "gsm8k":
            # A reference without a final number would silently score every response 0.
            for index, (_, answer) in enumerate(self.rows):
                if extract_final_number(answer) is None:
                    raise ValueError(
                        f"dataset {cfg.path!r} row {index}: answer {answer[-80:]!r} has no final number "
                        "for task.reward = 'gsm8k'; fix the row or use task.reward = 'exact'"
                    )

    def sample_prompt(self, rng: random.Random) -> Prompt:
        text, answer = self.rows[rng.randrange(len(self.rows))]
        return Prompt(tokens=self.tokenizer.encode_prompt(text), text=text, reference=answer)

    def reward(self, prompt: Prompt, response_tokens: list[int]) -> float:
        """The configured text reward of the response decoded up to its first EOS."""
        eos = self.tokenizer.eos_token_id
        end = response_tokens.index(eos) if eos in response_tokens else len(response_tokens)
        return self._score(self.tokenizer.decode(response_tokens[:end]), prompt.reference)
