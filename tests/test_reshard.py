"""Reshard plans: every rank's slices, put back together by an independent inverse, equal the source
bit for bit, for Qwen2- (q/k/v biases, tied embeddings) and Llama-shaped (untied) tiny models."""

from __future__ import annotations

import pytest
import torch

from asyncrl.config import ModelConfig
from asyncrl.modeling import build_model
from asyncrl.weights.codec import WeightsError
from asyncrl.weights.reshard import EngineLayout, ModelShape, padded_vocab, plan, reshard

# vocab 30 is not a multiple of 4: the vocabulary-parallel blocks need padding. 2 kv heads with
# TP = 4 exercises replicated grouped-query heads.
CONFIGS = {
    "qwen2": ModelConfig(arch="qwen2", vocab_size=30, hidden_size=64, intermediate_size=96, num_heads=4, num_kv_heads=2, tie_embeddings=True),
    "llama": ModelConfig(arch="llama", vocab_size=30, hidden_size=64, intermediate_size=96, num_heads=4, num_kv_heads=2, tie_embeddings=False),
}


def source_state(arch: str) -> tuple[dict[str, torch.Tensor], ModelShape]:
    model = build_model(CONFIGS[arch])
    state = {k: v for k, v in model.state_dict().items() if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    return state, ModelShape.from_hf_config(model.config)


def layouts(tp: int, fused: bool, **kw) -> list[EngineLayout]:
    return [EngineLayout(tp_size=tp, tp_rank=r, fuse_qkv=fused, fuse_gate_up=fused, **kw) for r in range(tp)]


def unfuse(rank_state: dict[str, torch.Tensor], shape: ModelShape, tp: int) -> dict[str, torch.Tensor]:
    """Split a rank's fused qkv / gate_up tensors back into per-projection slices."""
    out = {}
    q = shape.num_heads // tp * shape.head_dim
    kv = max(1, shape.num_kv_heads // tp) * shape.head_dim
    inter = shape.intermediate_size // tp
    for name, tensor in rank_state.items():
        if ".qkv_proj." in name:
            for proj, part in zip("qkv", tensor.split([q, kv, kv])):
                out[name.replace("qkv_proj", f"{proj}_proj")] = part
        elif ".gate_up_proj." in name:
            for proj, part in zip(("gate", "up"), tensor.split([inter, inter])):
                out[name.replace("gate_up_proj", f"{proj}_proj")] = part
        else:
            out[name] = tensor
    return out


def reassemble(ranks: list[dict[str, torch.Tensor]], shape: ModelShape, vocab: int) -> dict[str, torch.Tensor]:
    tp = len(ranks)
    ranks = [unfuse(r, shape, tp) for r in ranks]
    out = {}
    for name in ranks[0]:
        parts = [r[name] for r in ranks]
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            out[name] = torch.cat(parts)[:vocab]
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            out[name] = torch.cat(parts, dim=1)
        elif any(f".{p}_proj." in name for p in ("k", "v")) and tp > shape.num_kv_heads:
            every = tp // shape.num_kv_heads
            for i, part in enumerate(parts):  # replicas of one head must be identical
                assert torch.equal(part, parts[i - i % every])
            out[name] = torch.cat(parts[::every])
        elif any(f".{p}_proj." in name for p in ("q", "k", "v", "gate", "up")):
            out[name] = torch.cat(parts)
        else:
            for part in parts:
                assert torch.equal(part, parts[0])
            out[name] = parts[0]
    return out


def assert_bit_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name].view(torch.uint8), want[name].view(torch.uint8)), name


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("fused", [False, True])
def test_reassembled_slices_equal_the_source_bit_for_bit(arch, tp, fused):
    source, shape = source_state(arch)
    ranks = [reshard(source, shape, layout) for layout in layouts(tp, fused)]
    assert_bit_equal(reassemble(ranks, shape, shape.vocab_size), source)


@pytest.mark.parametrize("tp", [2, 4])
def test_each_rank_holds_its_share_of_heads_and_an_equal_vocabulary_block(tp):
    source, shape = source_state("qwen2")
    rank = reshard(source, shape, EngineLayout(tp_size=tp, tp_rank=1, fuse_qkv=True))
    kv_heads = max(1, shape.num_kv_heads // tp)
    qkv = rank["model.layers.0.self_attn.qkv_proj.weight"]
    assert qkv.shape == ((shape.num_heads // tp + 2 * kv_heads) * shape.head_dim, 64)
    assert rank["model.layers.0.self_attn.qkv_proj.bias"].shape == (qkv.shape[0],)
    assert rank["model.embed_tokens.weight"].shape == (padded_vocab(30, EngineLayout(tp_size=tp)) // tp, 64)


def test_padding_rows_of_the_vocabulary_are_zeros():
    source, shape = source_state("llama")
    last = reshard(source, shape, EngineLayout(tp_size=4, tp_rank=3, vocab_multiple=4))
    # padded to 32 rows: rank 3 holds rows 24..31, of which 30 and 31 are padding
    assert torch.equal(last["lm_head.weight"][:6], source["lm_head.weight"][24:30])
    assert not last["lm_head.weight"][6:].any()


def test_a_tied_source_feeds_an_untied_engines_output_head_from_the_embedding():
    source, shape = source_state("qwen2")
    rank = reshard(source, shape, EngineLayout(tie_embeddings=False))
    assert torch.equal(rank["lm_head.weight"], source["model.embed_tokens.weight"])


def test_an_untied_source_cannot_be_tied_on_the_engine():
    source, shape = source_state("llama")
    with pytest.raises(WeightsError, match="own lm_head"):
        reshard(source, shape, EngineLayout(tie_embeddings=True))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_dtype_conversion_casts_each_slice_exactly_like_casting_the_source(tp):
    source, shape = source_state("llama")
    ranks = [reshard(source, shape, layout) for layout in layouts(tp, True, dtype="bfloat16")]
    want = {k: v.to(torch.bfloat16) for k, v in source.items()}
    assert_bit_equal(reassemble(ranks, shape, shape.vocab_size), want)


def test_a_tp_size_that_does_not_divide_the_heads_is_refused_with_the_numbers():
    source, shape = source_state("qwen2")
    with pytest.raises(WeightsError, match="num_attention_heads = 4 is not divisible by tp_size = 3"):
        plan({k: tuple(v.shape) for k, v in source.items()}, shape, EngineLayout(tp_size=3, tp_rank=0))
