"""The policy model: random init is the same on every process; local checkpoints load by path."""

import pytest
import torch

from asyncrl.config import ModelConfig
from asyncrl.modeling import build_model


def test_random_init_is_identical_for_the_same_seed():
    a, b = build_model(ModelConfig()), build_model(ModelConfig())
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_random_init_does_not_disturb_the_global_rng():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    build_model(ModelConfig())
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_local_checkpoint_loads_with_from_pretrained(tmp_path, arch):
    source = build_model(ModelConfig(arch=arch, init_seed=3))
    source.save_pretrained(tmp_path)
    loaded = build_model(ModelConfig(path=str(tmp_path)))
    ids = torch.tensor([[1, 4, 5, 6, 14]])
    torch.testing.assert_close(loaded(ids).logits, source(ids).logits)


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a local directory"):
        build_model(ModelConfig(path=str(tmp_path / "absent")))
