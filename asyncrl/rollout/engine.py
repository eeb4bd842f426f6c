"""The embedded rollout engine: batched sampling from a Hugging Face causal LM with a KV cache.

Owns turning prompts into completions with behaviour log-probs, and swapping in new weights.
Never does I/O, talks to the queue or learner, or decides which version to load: the rollout server
does that and tells the engine through `load_weights`.

Design decisions, in the order a reader meets them:

- One rectangular batch. The n samples of each prompt become n rows (prompt-major: rows
  i*n .. i*n+n-1 belong to prompt i), so a whole generation batch is one prefill forward and then
  one forward per new token, reusing keys and values from a `DynamicCache`.
- Left padding made invisible. Prompts of different lengths are left-padded with the pad token;
  the attention mask hides the pads and position ids count only real tokens (cumsum(mask) - 1),
  so a prompt's logits do not depend on what it was batched with.
- Finished rows keep decoding pads. Evicting a row would mean re-indexing every layer's cache;
  feeding it the pad token keeps the batch rectangular, costs at most max_new_tokens wasted steps,
  and its outputs are discarded. Generation stops as soon as every row has finished.
- Behaviour log-probs are of the distribution actually sampled from (temperature, then top-k, then
  top-p, renormalised; see `sampling.py`), which is what the learner's importance weights need.
- Weights swap under a lock, and only after every tensor has been checked, so a generate call
  never sees half a version (ARCHITECTURE.md, contract 6).
- Interruptible generation for weight updates (`generate_versioned`): between decode steps the
  caller may ask to stop; unfinished samples come back marked 'abort' with what they have so far,
  and passing them back continues them (prompt + tokens so far are prefilled again with the new
  weights). Every token carries the version that produced it, so staleness and importance weights
  stay exact across the swap. `paused()` holds off generation around a swap and always lets go.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Literal

import torch
from transformers import DynamicCache

from asyncrl.rollout.sampling import sample_tokens

if TYPE_CHECKING:
    from asyncrl.config import SamplingConfig


@dataclass
class SamplingParams:
    """Plain mirror of `asyncrl.config.SamplingConfig`: cheap to build per request and to compare."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 16
    stop_tokens: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, cfg: "SamplingConfig") -> "SamplingParams":
        return cls(
            n=cfg.n,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            max_new_tokens=cfg.max_new_tokens,
            stop_tokens=tuple(cfg.stop_tokens),
        )


@dataclass
class Completion:
    tokens: list[int]
    """Response token ids, including the stop token when one ended the response."""
    logprobs: list[float]
    """Behaviour log-prob of each token under the (tempered, filtered) distribution it was sampled from."""
    finish_reason: Literal["stop", "length"]
    """'stop': a stop or end-of-sequence token was sampled; 'length': max_new_tokens was reached."""


@dataclass
class VersionedCompletion:
    tokens: list[int]
    """Response token ids so far, including the stop token when one ended the response."""
    logprobs: list[float]
    """Behaviour log-prob of each token under the distribution it was sampled from."""
    versions: list[int]
    """Weight version that produced each token."""
    finish_reason: Literal["stop", "length", "abort"]
    """'abort': interrupted (for a weight update) before finishing; hand it back to continue it."""


class TorchEngine:
    def __init__(self, model: torch.nn.Module, eos_token_id: int, pad_token_id: int, device: str = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.version = 0
        self.is_paused = False
        # Re-entrant so that load_weights can run inside paused() on the same thread.
        self._lock = threading.RLock()

    @torch.inference_mode()
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator | None = None
    ) -> list[list[Completion]]:
        """For each prompt, params.n completions (outer list per prompt, inner per sample)."""
        if not prompts:
            return []
        self._check_request(prompts, params, generator)
        with self._lock:
            tokens, logprobs, lengths, stopped, _ = self._decode(prompts, params, generator)
        tokens, logprobs, lengths, stopped = (t.tolist() for t in (tokens, logprobs, lengths, stopped))
        completions = [
            Completion(tokens[row][:length], logprobs[row][:length], "stop" if stop else "length")
            for row, (length, stop) in enumerate(zip(lengths, stopped))
        ]
        n = params.n
        return [completions[i * n : (i + 1) * n] for i in range(len(prompts))]

    @torch.inference_mode()
    def generate_versioned(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        generator: torch.Generator | None = None,
        partials: list[list[VersionedCompletion]] | None = None,
        interrupt: Callable[[], bool] | None = None,
    ) -> list[list[VersionedCompletion]]:
        """Like `generate`, but resumable and with per-token versions.

        `partials` (one list of params.n per prompt, as returned by an interrupted call) continue
        from the tokens they hold; finished ones are passed through unchanged. `interrupt` is asked
        between decode steps; when it returns True the call returns at once, unfinished samples
        marked 'abort'.
        """
        if not prompts:
            return []
        self._check_request(prompts, params, generator)
        if partials is None:
            partials = [[VersionedCompletion([], [], [], "abort") for _ in range(params.n)] for _ in prompts]
        if len(partials) != len(prompts) or any(len(group) != params.n for group in partials):
            raise ValueError(f"partials must hold params.n={params.n} completions for each of the {len(prompts)} prompts")
        todo = [(i, j) for i, group in enumerate(partials) for j, c in enumerate(group) if c.finish_reason == "abort"]
        result = [[VersionedCompletion(list(c.tokens), list(c.logprobs), list(c.versions), c.finish_reason) for c in group]
                  for group in partials]
        for i, j in todo:
            if len(result[i][j].tokens) >= params.max_new_tokens:
                raise ValueError(f"partial {j} of prompt {i} already has {len(result[i][j].tokens)} tokens, "
                                 f"max_new_tokens={params.max_new_tokens}; it should have finished as 'length'")
        if not todo:
            return result
        rows = [prompts[i] + result[i][j].tokens for i, j in todo]
        budgets = [params.max_new_tokens - len(result[i][j].tokens) for i, j in todo]
        with self._lock:
            version = self.version
            tokens, logprobs, lengths, stopped, done = self._decode(rows, params, generator, budgets, interrupt)
        tokens, logprobs, lengths, stopped, done = (t.tolist() for t in (tokens, logprobs, lengths, stopped, done))
        for row, (i, j) in enumerate(todo):
            c, length = result[i][j], lengths[row]
            c.tokens += tokens[row][:length]
            c.logprobs += logprobs[row][:length]
            c.versions += [version] * length
            c.finish_reason = "stop" if stopped[row] else "length" if done[row] else "abort"
        return result

    @contextmanager
    def paused(self) -> Iterator["TorchEngine"]:
        """No generation runs while this is held (it waits for a running call to return first);
        released on every exit, exceptions included, so nothing can leave the engine paused."""
        with self._lock:
            self.is_paused = True
            try:
                yield self
            finally:
                self.is_paused = False

    def _decode(self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator | None,
                budgets: list[int] | None = None, interrupt: Callable[[], bool] | None = None):
        """Prefill then decode; returns per-row tokens [B, T], logprobs [B, T], lengths [B], stopped [B], done [B].

        `budgets` are per-row token limits (default max_new_tokens for each of the n rows per
        prompt, prompt-major); `interrupt` is asked between decode steps, and when it says so the
        rows not yet done are returned as they are (done False).
        """
        rows = [prompt for prompt in prompts for _ in range(params.n)] if budgets is None else prompts
        width = max(len(prompt) for prompt in rows)
        ids = torch.tensor([[self.pad_token_id] * (width - len(p)) + p for p in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        next_position = positions[:, -1] + 1
        stop_ids = torch.tensor([self.eos_token_id, *params.stop_tokens], device=self.device)
        batch = len(rows)
        limit = torch.tensor(budgets if budgets is not None else [params.max_new_tokens] * batch, device=self.device)
        longest = int(limit.max())

        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions,
            past_key_values=cache, use_cache=True, logits_to_keep=1,
        )
        stopped = torch.zeros(batch, dtype=torch.bool, device=self.device)
        finished = limit <= 0
        lengths = limit.clone()
        step_tokens, step_logprobs = [], []
        for step in range(longest):
            token, logprob = sample_tokens(out.logits[:, -1], params, generator)
            token = token.masked_fill(finished, self.pad_token_id)
            step_tokens.append(token)
            step_logprobs.append(logprob)
            hit_stop = torch.isin(token, stop_ids) & ~finished
            lengths = torch.where(hit_stop, step + 1, lengths)
            stopped |= hit_stop
            finished |= hit_stop | (limit == step + 1)
            if step + 1 == longest or bool(finished.all()):
                break
            if interrupt is not None and interrupt():
                lengths = torch.where(finished, lengths, step + 1)
                break
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            out = self.model(
                input_ids=token[:, None], attention_mask=mask, position_ids=next_position[:, None],
                past_key_values=cache, use_cache=True,
            )
            next_position = next_position + 1
        if not step_tokens:
            empty = torch.zeros(batch, 0, device=self.device)
            return empty.long(), empty, lengths, stopped, finished
        return torch.stack(step_tokens, 1), torch.stack(step_logprobs, 1), lengths, stopped, finished

    def _check_request(self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator | None):
        if params.n < 1 or params.max_new_tokens < 1:
            raise ValueError(f"n={params.n}, max_new_tokens={params.max_new_tokens}: both must be >= 1")
        vocab = self.model.config.vocab_size
        max_position = self.model.config.max_position_embeddings
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt {i} holds token ids {bad[:5]} outside the vocabulary [0, {vocab})")
            longest = len(prompt) + params.max_new_tokens
            if longest > max_position:
                raise ValueError(
                    f"prompt {i} has {len(prompt)} tokens + max_new_tokens={params.max_new_tokens} = {longest}, "
                    f"more than the model's {max_position} positions; shorten the prompt or max_new_tokens"
                )
        if generator is not None and generator.device.type != self.device.type:
            raise ValueError(
                f"generator is on {generator.device} but the engine samples on {self.device}; "
                f"create it with torch.Generator(device={str(self.device)!r})"
            )

    @torch.no_grad()
    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Copy tensors into the model in place (between generate calls) and set version.

        Every key of the model's state dict must be given with its shape, except aliases of a given
        tensor (a tied output head); nothing is copied unless all of them check out.
        """
        params = self.model.state_dict()
        unknown = sorted(set(state_dict) - set(params))
        if unknown:
            raise KeyError(f"load_weights got tensors the model does not have: {unknown[:5]}; check the reshard plan")
        given = {params[name].data_ptr() for name in state_dict}
        missing = sorted(name for name in params if name not in state_dict and params[name].data_ptr() not in given)
        if missing:
            raise KeyError(f"load_weights for version {version} lacks tensors {missing[:5]}; send a complete version")
        for name, tensor in state_dict.items():
            if tensor.shape != params[name].shape:
                raise ValueError(
                    f"load_weights: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(params[name].shape)}"
                )
        with self._lock:
            for name, tensor in state_dict.items():
                params[name].copy_(tensor)
            self.version = version
