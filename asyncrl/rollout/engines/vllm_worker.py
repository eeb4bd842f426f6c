"""The vLLM worker extension: the code asyncrl runs inside each vLLM worker to swap weights in.

vLLM mixes this class into its workers when the `LLM` is built with `worker_extension_cls`, and
`LLM.collective_rpc('asyncrl_load_weights', ...)` (tensors, workers in the caller's process) or
`'asyncrl_load_weights_file'` (a safetensors file the adapter staged, workers in other processes)
calls it on every worker. Owns only copying a version into the worker's model; never fetches,
validates versions or talks to asyncrl services (the rollout server did that before calling). Imports nothing from vllm, so it loads wherever
the worker does.

Why `reload_weights` and not the model's `load_weights`: vLLM 0.32 strips the per-parameter
`weight_loader`s once the model has loaded (calling `model.load_weights` a second time fails
with "'Parameter' object has no attribute 'weight_loader'"). The worker's
`reload_weights(weights_iterator=..., is_checkpoint_format=True)` restores them layer by layer,
runs the model's own `load_weights` (which fuses q/k/v and gate/up and slices for tensor
parallelism) and copies the result back into the same storage the KV-cache-holding model uses.

Why a tied output head is sent twice: the layerwise reload completes a layer only when every
weight it was created with has arrived, and with `tie_word_embeddings` vLLM's `lm_head` still
counts `lm_head.weight` as one. asyncrl sends each tied tensor once (`model.embed_tokens.weight`),
and without the alias the reload leaves the head unfinished and generation silently keeps the old
weights (measured: log-prob differences of 1.0 after one update). The extension adds
`lm_head.weight` as an alias of the embedding when the model ties them and it is missing.
"""

from __future__ import annotations


class WeightLoaderExtension:
    def asyncrl_load_weights(self, named_tensors: list, version: int) -> int:
        """Load Hugging Face-named tensors in place; returns the version as the worker's receipt."""
        import torch

        named = dict(named_tensors)
        tied = getattr(self.model_config.hf_text_config, "tie_word_embeddings", False)  # vLLM Worker's model_config
        if tied and "lm_head.weight" not in named and "model.embed_tokens.weight" in named:
            named["lm_head.weight"] = named["model.embed_tokens.weight"]
        self.reload_weights(weights_iterator=iter(named.items()), is_checkpoint_format=True)  # vLLM's Worker method
        if self.device.type == "cuda":  # the vLLM Worker's device
            torch.cuda.synchronize(self.device)  # the receipt must mean the copy has landed
        return version

    def asyncrl_load_weights_file(self, path: str, version: int) -> int:
        """Load a version from the safetensors file the adapter staged (workers in other processes)."""
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return self.asyncrl_load_weights([(name, f.get_tensor(name)) for name in f.keys()], version)
