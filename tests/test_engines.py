"""Specification of the engine interface and of choosing an engine with `rollout.engine`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from asyncrl.config import ConfigError, ModelConfig, load_config
from asyncrl.modeling import build_model
from asyncrl.rollout.engine import SamplingParams, TorchEngine
from asyncrl.rollout.engines import Engine, build_engine
from asyncrl.rollout.engines.base import EngineError, health
from asyncrl.rollout.tasks import build_task

ROOT = Path(__file__).resolve().parent.parent


def test_the_embedded_engine_satisfies_the_engine_interface():
    engine = TorchEngine(build_model(ModelConfig()), 1, 0)
    assert isinstance(engine, Engine)
    assert health(engine)
    groups = engine.generate([[3, 4]], SamplingParams(n=2, max_new_tokens=3))
    assert len(groups) == 1 and len(groups[0]) == 2


def test_build_engine_gives_the_torch_engine_on_version_minus_one_by_default():
    cfg = load_config(None)
    engine = build_engine(cfg, build_task(cfg.task).tokenizer)
    assert isinstance(engine, TorchEngine) and engine.version == -1


def test_a_model_vocabulary_smaller_than_the_task_needs_is_refused_with_the_setting():
    cfg = load_config(None, ["model.vocab_size=4"])
    with pytest.raises(ValueError, match="model.vocab_size >= 16"):
        build_engine(cfg, build_task(cfg.task).tokenizer)


def test_interrupt_mode_with_the_in_process_vllm_is_refused_with_the_setting():
    cfg = load_config(None, ["rollout.engine=vllm", "weights.update_mode=interrupt"])
    with pytest.raises(EngineError, match="update_mode=drain"):
        build_engine(cfg, build_task(cfg.task).tokenizer)


def test_an_unknown_engine_is_refused_before_anything_starts():
    with pytest.raises(ConfigError, match="rollout.engine"):
        load_config(None, ["rollout.engine=tgi"])


@pytest.mark.parametrize("engine", ["torch", "vllm", "sglang"])
def test_the_gsm8k_qwen_config_of_each_engine_loads(engine):
    cfg = load_config(ROOT / "configs" / f"gsm8k_qwen_{engine}.yaml")
    assert cfg.rollout.engine == engine
    assert cfg.task.name == "dataset" and cfg.task.path.endswith(".parquet")
    assert "Qwen2.5-0.5B-Instruct" in cfg.model.path


def test_the_sglang_config_keeps_the_filters_sglang_cannot_report_off():
    cfg = load_config(ROOT / "configs" / "gsm8k_qwen_sglang.yaml")
    assert (cfg.sampling.top_k, cfg.sampling.top_p) == (0, 1.0)


def test_engine_modules_never_import_learner_code():
    for path in (ROOT / "asyncrl" / "rollout" / "engines").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(name.startswith("asyncrl.learner") for name in names), path
