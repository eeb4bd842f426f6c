"""Reshard plans: map a Hugging Face state (Qwen2 / Llama names) onto one engine rank's layout.

Pure: shapes and names in, a plan out; `apply_plan` turns source tensors into the rank's tensors
with narrow/cat/cast only, so a plan can be tested on CPU and run wherever the bytes land (the
engine side, after a version arrived whole and verified). No I/O, no process groups.

The layout follows Megatron/vLLM tensor parallelism:

- column-parallel (output rows split): q/k/v_proj (and q/k/v biases, Qwen2), gate/up_proj. Rank r
  of T holds heads [r·H/T, (r+1)·H/T). Grouped-query k/v: with KV >= T heads, KV/T each; with
  T > KV, each kv head is replicated on T/KV consecutive ranks (rank r holds head r·KV/T).
- row-parallel (input columns split): o_proj, down_proj.
- vocabulary-parallel: embed_tokens and lm_head rows split in equal blocks; the vocabulary is
  padded with zero rows up to a multiple of T·vocab_multiple so every rank's block is the same size.
- fused projections: qkv_proj = cat(q_r, k_r, v_r), gate_up_proj = cat(gate_r, up_r), per rank.
- tied embeddings: a source without lm_head feeds an untied engine's lm_head from embed_tokens; a
  tying engine gets no lm_head (it reads the embedding).
- dtype conversion last, so each rank casts only its own slice.
Everything else (norms) is replicated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from asyncrl.weights.codec import NAME_DTYPES, WeightsError

_PROJ = re.compile(r"^(?P<prefix>.*layers\.\d+\.)(?P<block>self_attn|mlp)\.(?P<proj>[a-z]+)_proj\.(?P<kind>weight|bias)$")
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@dataclass(frozen=True)
class ModelShape:
    """The numbers a plan needs from the model config."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def from_hf_config(cls, config) -> "ModelShape":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(heads, getattr(config, "num_key_value_heads", None) or heads, head_dim,
                   config.intermediate_size, config.vocab_size)


@dataclass(frozen=True)
class EngineLayout:
    """What one engine rank holds; engines declare it, the plan follows it."""

    tp_size: int = 1
    tp_rank: int = 0
    fuse_qkv: bool = False
    fuse_gate_up: bool = False
    tie_embeddings: Optional[bool] = None
    """True: no lm_head (read the embedding); False: an lm_head of its own; None: as the source."""
    dtype: Optional[str] = None
    """Cast to this dtype name (e.g. 'bfloat16'); None keeps the source dtype."""
    vocab_multiple: int = 1
    """Pad the vocabulary to a multiple of tp_size * vocab_multiple (vLLM pads to 64 per rank)."""


@dataclass(frozen=True)
class Piece:
    source: str
    dim: int
    start: int
    stop: int
    """May exceed the source's size along dim: the rows beyond it are zeros (vocabulary padding)."""


@dataclass(frozen=True)
class Target:
    name: str
    pieces: tuple[Piece, ...]
    """Concatenated along dimension 0 (fused projections are stacked by output rows)."""


def padded_vocab(vocab_size: int, layout: EngineLayout) -> int:
    block = layout.tp_size * layout.vocab_multiple
    return -(-vocab_size // block) * block


def _split(total: int, layout: EngineLayout, what: str) -> tuple[int, int]:
    if total % layout.tp_size:
        raise WeightsError(f"{what} = {total} is not divisible by tp_size = {layout.tp_size}; choose a tp_size that divides it")
    size = total // layout.tp_size
    return layout.tp_rank * size, (layout.tp_rank + 1) * size


def _kv_rows(shape: ModelShape, layout: EngineLayout) -> tuple[int, int]:
    tp, kv = layout.tp_size, shape.num_kv_heads
    if kv >= tp:
        first, last = _split(kv, layout, "num_key_value_heads")
    elif tp % kv:
        raise WeightsError(f"tp_size = {tp} is neither a divisor nor a multiple of num_key_value_heads = {kv}")
    else:
        first = layout.tp_rank * kv // tp
        last = first + 1
    return first * shape.head_dim, last * shape.head_dim


def _column(name: str, proj: str, shape: ModelShape, layout: EngineLayout) -> Piece:
    if proj == "q":
        first, last = _split(shape.num_heads, layout, "num_attention_heads")
        return Piece(name, 0, first * shape.head_dim, last * shape.head_dim)
    if proj in ("k", "v"):
        return Piece(name, 0, *_kv_rows(shape, layout))
    return Piece(name, 0, *_split(shape.intermediate_size, layout, "intermediate_size"))


def plan(source_shapes: Mapping[str, tuple[int, ...]], shape: ModelShape, layout: EngineLayout) -> list[Target]:
    """The rank's tensors, each built from slices of named source tensors."""
    if not 0 <= layout.tp_rank < layout.tp_size:
        raise WeightsError(f"tp_rank = {layout.tp_rank} is outside tp_size = {layout.tp_size}")
    if layout.dtype is not None and layout.dtype not in NAME_DTYPES:
        raise WeightsError(f"layout dtype {layout.dtype!r}; use one of {sorted(NAME_DTYPES)}")
    targets: list[Target] = []
    fused: dict[tuple[str, str], dict[str, Piece]] = {}
    vocab = padded_vocab(shape.vocab_size, layout)
    vocab_rows = _split(vocab, layout, "padded vocabulary")
    for name, dims in source_shapes.items():
        match = _PROJ.match(name)
        if name in (EMBED, HEAD):
            if name == HEAD and layout.tie_embeddings:
                raise WeightsError("the source has its own lm_head but the engine ties it to the embedding; "
                                   "set tie_embeddings to False or None in the engine layout")
            targets.append(Target(name, (Piece(name, 0, *vocab_rows),)))
        elif match is None:
            targets.append(Target(name, (Piece(name, 0, 0, dims[0]),) if dims else (Piece(name, -1, 0, 0),)))
        elif match["proj"] in ("o", "down"):
            if match["kind"] == "bias":  # a row-parallel bias is added once, after the reduction
                targets.append(Target(name, (Piece(name, 0, 0, dims[0]),)))
            else:
                total = shape.num_heads * shape.head_dim if match["proj"] == "o" else shape.intermediate_size
                targets.append(Target(name, (Piece(name, 1, *_split(total, layout, f"input width of {name}")),)))
        else:
            piece = _column(name, match["proj"], shape, layout)
            group = "qkv" if match["proj"] in ("q", "k", "v") else "gate_up"
            if (group == "qkv" and layout.fuse_qkv) or (group == "gate_up" and layout.fuse_gate_up):
                fused.setdefault((f"{match['prefix']}{match['block']}.{group}_proj.{match['kind']}", group), {})[match["proj"]] = piece
            else:
                targets.append(Target(name, (piece,)))
    for (name, group), pieces in fused.items():
        order = ("q", "k", "v") if group == "qkv" else ("gate", "up")
        missing = [p for p in order if p not in pieces]
        if missing:
            raise WeightsError(f"cannot build {name}: the source lacks the {', '.join(missing)} projection")
        targets.append(Target(name, tuple(pieces[p] for p in order)))
    if HEAD not in source_shapes and EMBED in source_shapes and layout.tie_embeddings is False:
        targets.append(Target(HEAD, (Piece(EMBED, 0, *vocab_rows),)))
    return targets


def _take(tensor: torch.Tensor, piece: Piece) -> torch.Tensor:
    if piece.dim < 0:
        return tensor
    size = tensor.shape[piece.dim]
    part = tensor.narrow(piece.dim, min(piece.start, size), max(0, min(piece.stop, size) - piece.start))
    pad = piece.stop - piece.start - part.shape[piece.dim]
    if pad > 0:
        zeros = list(tensor.shape)
        zeros[piece.dim] = pad
        part = torch.cat([part, tensor.new_zeros(zeros)], dim=piece.dim)
    return part


def apply_plan(targets: list[Target], source: Mapping[str, torch.Tensor], dtype: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Build the rank's tensors from `source` (views where a single slice suffices, else copies)."""
    cast = NAME_DTYPES[dtype] if dtype is not None else None
    out = {}
    for target in targets:
        parts = [_take(source[p.source], p) for p in target.pieces]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        out[target.name] = tensor.to(cast) if cast is not None else tensor
    return out


def reshard(source: Mapping[str, torch.Tensor], shape: ModelShape, layout: EngineLayout) -> dict[str, torch.Tensor]:
    """plan + apply_plan in one call."""
    targets = plan({k: tuple(v.shape) for k, v in source.items()}, shape, layout)
    return apply_plan(targets, source, layout.dtype)
