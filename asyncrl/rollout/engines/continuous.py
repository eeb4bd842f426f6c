"""The continuous-batching embedded engine (`rollout.engine: continuous`): slots, a preallocated KV cache, refill.

Owns one decode loop for Qwen2/Llama-shaped Hugging Face models. Everything else (requests, partials
and per-token versions, `paused()`, `load_weights`) is `TorchEngine`'s, inherited unchanged: this
class only replaces `_decode`, so both engines give the same answers to the same calls, with the
same behaviour log-probs (`sampling.py`). Never does I/O and never decides which version to load.

Design decisions, in the order a reader meets them:

- Slots, not rows. The cache holds `slots` sequences, each layer a preallocated
  [slots, kv_heads, max_len, head_dim] tensor for keys and one for values. Every loop iteration
  decodes one token for every occupied slot; a sample that finishes frees its slot, and the next
  iteration refills it from the pending prompts while the others decode. Long-tailed lengths then
  cost the tokens they have, not (batch x longest) as in one rectangular batch.
- One prefill per distinct prompt. Rows with identical tokens (the n samples of a prompt, prompt-
  major as in `TorchEngine`) form a unit: its tokens go through the model once and the keys and
  values are copied into each of its n slots. A unit enters only when all its slots are free, so
  a group's samples run side by side. Units prefill together, right-padded: with causal attention
  a real token never sees the pads after it, and the pads' keys lie beyond the slot's length.
- A hand-written forward over the HF modules. Embeddings, norms, projections, MLPs and rotary
  frequencies are the model's own modules (so `load_weights`' in-place copies are seen at once);
  only attention is written here, because it reads and writes the slot cache. That is why only
  qwen2 and llama (no sliding window) are accepted: another architecture would silently differ.
- Decode covers slots [0, hi) where hi is one past the highest occupied slot; free slots in
  between compute garbage that is never read. Admission takes the lowest free slots, and when
  nothing is pending and fewer than half of [0, hi) are busy the busy slots are moved down
  (compaction), so the tail of a long-tailed batch does not decode empty slots.
- Scheduling is on the host: sampled tokens come back to the CPU once per iteration (one sync),
  which decides finishing, freeing and refilling. `compile=True` hands the per-token forward to
  `torch.compile` (dynamic shapes: hi and the attended length change every step).
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import Callable

import torch
import torch.nn.functional as F

from asyncrl.rollout.engine import SamplingParams, TorchEngine
from asyncrl.rollout.sampling import sample_tokens

SUPPORTED = ("qwen2", "llama")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [B, H, W, D] with cos/sin [B, W, D] (the HF rotate-half convention)."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class SlotCache:
    """Keys and values of `slots` sequences for every layer, preallocated to `max_len` positions."""

    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (slots, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.slots, self.max_len = slots, max_len

    def fits(self, slots: int, max_len: int) -> bool:
        return slots <= self.slots and max_len <= self.max_len

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        for cache in (*self.keys, *self.values):
            cache[dst] = cache[src]  # the right side is gathered first, so overlapping slots are safe


class ContinuousEngine(TorchEngine):
    def __init__(self, model: torch.nn.Module, eos_token_id: int, pad_token_id: int, device: str = "cpu",
                 slots: int = 0, compile: bool = False, share_prefill: bool = True):
        """`slots`: sequences decoded at once (0: every row of a call at once, so nothing is refilled
        but finished rows stop costing compute). `share_prefill=False` prefills every row on its own
        (only to measure what sharing saves)."""
        config = model.config
        if config.model_type not in SUPPORTED:
            raise ValueError(
                f"the continuous engine runs {', '.join(SUPPORTED)} models, not {config.model_type!r}; "
                f"use rollout.engine=torch for it"
            )
        if "sliding_attention" in (getattr(config, "layer_types", None) or []):
            raise ValueError("the continuous engine has no sliding-window attention; set use_sliding_window=false "
                             "in the model config or use rollout.engine=torch")
        if slots < 0:
            raise ValueError(f"slots={slots}: must be >= 0 (0 decodes every row of a call at once)")
        super().__init__(model, eos_token_id, pad_token_id, device)
        self.slots = slots
        self.share_prefill = share_prefill
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.cache: SlotCache | None = None
        self.stats = {"steps": 0, "prefill_forwards": 0, "decode_forwards": 0, "prefill_tokens": 0}
        """Counts since construction: loop iterations (each one decode and/or one prefill forward),
        forwards by kind, and prompt tokens prefilled (what slot refill and prefill sharing save)."""
        self._step = torch.compile(self._decode_forward, dynamic=True) if compile else self._decode_forward

    # --- the model, by hand over its own modules ----------------------------------------------------

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor,
                 attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Hidden states after the final norm, [B, W, hidden]; `attend(layer, q, k, v)` does attention."""
        base = self.model.model
        h = base.embed_tokens(ids)
        cos, sin = base.rotary_emb(h, positions)
        batch, width = ids.shape
        for index, layer in enumerate(base.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(batch, width, -1, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(batch, width, -1, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(batch, width, -1, self.head_dim).transpose(1, 2)
            out = attend(index, _rotate(q, cos, sin), _rotate(k, cos, sin), v)
            h = h + attn.o_proj(out.transpose(1, 2).reshape(batch, width, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return base.norm(h)

    def _prefill(self, ids: torch.Tensor, lengths: torch.Tensor, unit_of_slot: torch.Tensor,
                 slot_ids: torch.Tensor) -> torch.Tensor:
        """Run right-padded prompts ids [P, W] once; copy unit u's keys/values into every slot s with
        unit_of_slot[s] == u. Returns each prompt's next-token logits [P, V]."""
        width = ids.shape[1]
        cache = self.cache
        scale = self.model.model.layers[0].self_attn.scaling

        def attend(layer, q, k, v):
            cache.keys[layer][slot_ids, :, :width] = k[unit_of_slot]
            cache.values[layer][slot_ids, :, :width] = v[unit_of_slot]
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

        positions = torch.arange(width, device=self.device).expand(ids.shape[0], width)
        h = self._forward(ids, positions, attend)
        last = h[torch.arange(ids.shape[0], device=self.device), lengths - 1]
        self.stats["prefill_forwards"] += 1
        self.stats["prefill_tokens"] += int(lengths.sum())
        return self.model.lm_head(last)

    def _decode_forward(self, tokens: torch.Tensor, filled: torch.Tensor, span: int) -> torch.Tensor:
        """Feed tokens [hi] to slots [0, hi) at positions filled [hi]; attend to the first `span`
        positions of each slot, masked to its own length. Returns next-token logits [hi, V]."""
        hi = tokens.shape[0]
        slot_ids = torch.arange(hi, device=tokens.device)
        visible = (torch.arange(span, device=tokens.device) <= filled[:, None])[:, None, None, :]
        cache = self.cache
        scale = self.model.model.layers[0].self_attn.scaling

        def attend(layer, q, k, v):
            keys, values = cache.keys[layer], cache.values[layer]
            keys[slot_ids, :, filled] = k[:, :, 0]
            values[slot_ids, :, filled] = v[:, :, 0]
            return F.scaled_dot_product_attention(
                q, keys[:hi, :, :span], values[:hi, :, :span], attn_mask=visible, scale=scale, enable_gqa=True
            )

        h = self._forward(tokens[:, None], filled[:, None], attend)
        return self.model.lm_head(h[:, -1])

    # --- the loop ----------------------------------------------------------------------------------

    def _decode(self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator | None,
                budgets: list[int] | None = None, interrupt: Callable[[], bool] | None = None):
        """`TorchEngine._decode`'s contract: per-row tokens [B, T], logprobs [B, T], lengths [B],
        stopped [B], done [B], rows prompt-major (n per prompt) unless `budgets` gives one per row."""
        rows = [prompt for prompt in prompts for _ in range(params.n)] if budgets is None else prompts
        limits = budgets if budgets is not None else [params.max_new_tokens] * len(rows)
        slots = min(self.slots or len(rows), len(rows))
        units = self._units(rows, slots)
        self._ensure_cache(slots, max(len(r) + b for r, b in zip(rows, limits)))

        stop_ids = set([self.eos_token_id, *params.stop_tokens])
        out_tokens: list[list[int]] = [[] for _ in rows]
        out_logprobs: list[list[float]] = [[] for _ in rows]
        stopped, done = [False] * len(rows), [limit <= 0 for limit in limits]
        pending = deque(unit for unit in units if not done[unit[0]])
        free = list(range(slots))  # a heap: admission takes the lowest free slots
        row_of_slot: dict[int, int] = {}  # occupied slots (each holds a row whose last token is not fed yet)
        filled = torch.zeros(slots, dtype=torch.long, device=self.device)
        last_token = torch.zeros(slots, dtype=torch.long, device=self.device)

        while pending or row_of_slot:
            logits, sampled_slots = [], []
            if row_of_slot:
                busy = sorted(row_of_slot)
                if not pending and len(busy) <= (busy[-1] + 1) // 2:
                    busy = self._compact(busy, row_of_slot, free, filled, last_token)
                hi = busy[-1] + 1
                span = int(filled[:hi].max()) + 1
                step_logits = self._step(last_token[:hi], filled[:hi], span)
                self.stats["decode_forwards"] += 1
                index = torch.tensor(busy, device=self.device)
                filled[index] += 1
                logits.append(step_logits[index])
                sampled_slots += busy
            admitted = []
            while pending and len(pending[0]) <= len(free):
                unit = pending.popleft()
                admitted.append((unit, [heapq.heappop(free) for _ in unit]))
            if admitted:
                logits.append(self._admit(rows, admitted, filled, row_of_slot))
                sampled_slots += [slot for _, unit_slots in admitted for slot in unit_slots]

            self.stats["steps"] += 1
            tokens, logprobs = sample_tokens(torch.cat(logits), params, generator)
            last_token[torch.tensor(sampled_slots, device=self.device)] = tokens
            for slot, token, logprob in zip(sampled_slots, tokens.tolist(), logprobs.tolist()):
                row = row_of_slot[slot]
                out_tokens[row].append(token)
                out_logprobs[row].append(logprob)
                stopped[row] = token in stop_ids
                if stopped[row] or len(out_tokens[row]) == limits[row]:
                    done[row] = True
                    del row_of_slot[slot]
                    heapq.heappush(free, slot)
            if (pending or row_of_slot) and interrupt is not None and interrupt():
                break
        return self._pack(out_tokens, out_logprobs, stopped, done)

    def _units(self, rows: list[list[int]], slots: int) -> list[list[int]]:
        """Row indices that share one prefill (identical tokens), in order of first row, at most `slots` each."""
        groups: dict[tuple, list[int]] = {}
        for index, tokens in enumerate(rows):
            groups.setdefault(tuple(tokens) if self.share_prefill else (index,), []).append(index)
        return [members[i : i + slots] for members in groups.values() for i in range(0, len(members), slots)]

    def _ensure_cache(self, slots: int, max_len: int) -> None:
        if self.cache is None or not self.cache.fits(slots, max_len):
            config = self.model.config
            dtype = self.model.model.embed_tokens.weight.dtype
            self.cache = SlotCache(config.num_hidden_layers, slots, config.num_key_value_heads, max_len,
                                   self.head_dim, dtype, self.device)

    def _admit(self, rows, admitted, filled, row_of_slot) -> torch.Tensor:
        """Prefill the admitted units into their slots; returns next-token logits, one row per slot."""
        prompts = [rows[unit[0]] for unit, _ in admitted]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([p + [self.pad_token_id] * (width - len(p)) for p in prompts], device=self.device)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        unit_of_slot = torch.tensor([u for u, (unit, _) in enumerate(admitted) for _ in unit], device=self.device)
        slot_list = [slot for _, unit_slots in admitted for slot in unit_slots]
        slot_ids = torch.tensor(slot_list, device=self.device)
        unit_logits = self._prefill(ids, lengths, unit_of_slot, slot_ids)
        filled[slot_ids] = lengths[unit_of_slot]
        for unit, unit_slots in admitted:
            row_of_slot.update(zip(unit_slots, unit))
        return unit_logits[unit_of_slot]

    def _compact(self, busy, row_of_slot, free, filled, last_token) -> list[int]:
        """Move the busy slots to [0, len(busy)) so decoding stops covering empty ones."""
        src = torch.tensor(busy, device=self.device)
        dst = torch.arange(len(busy), device=self.device)
        self.cache.move(src, dst)
        filled[dst], last_token[dst] = filled[src], last_token[src]
        rows = [row_of_slot[slot] for slot in busy]
        row_of_slot.clear()
        row_of_slot.update(enumerate(rows))
        free[:] = range(len(busy), len(busy) + len(free))  # sorted, so already a heap
        return list(range(len(busy)))

    def _pack(self, out_tokens, out_logprobs, stopped, done):
        width = max((len(t) for t in out_tokens), default=0)
        tokens = torch.full((len(out_tokens), width), self.pad_token_id, dtype=torch.long)
        logprobs = torch.zeros(len(out_tokens), width)
        for row, (t, lp) in enumerate(zip(out_tokens, out_logprobs)):
            tokens[row, : len(t)] = torch.tensor(t, dtype=torch.long)
            logprobs[row, : len(lp)] = torch.tensor(lp)
        lengths = torch.tensor([len(t) for t in out_tokens])
        return tokens, logprobs, lengths, torch.tensor(stopped), torch.tensor(done)
