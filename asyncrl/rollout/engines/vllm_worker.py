"""The vLLM worker extension: the code asyncrl runs inside each vLLM worker to swap weights in.

vLLM mixes this class into its workers when the `LLM` is built with `worker_extension_cls`, and
`LLM.collective_rpc('asyncrl_load_weights', ...)` calls it on every worker. Owns only copying a
version into the worker's model; never fetches, validates versions or talks to asyncrl services
(the rollout server did that before calling). Imports nothing from vllm, so it loads wherever
the worker does.
"""

from __future__ import annotations


class WeightLoaderExtension:
    def asyncrl_load_weights(self, named_tensors: list, version: int) -> int:
        """Load Hugging Face-named tensors through the model's own `load_weights` (which fuses q/k/v
        and gate/up and slices for tensor parallelism); returns the version as the worker's receipt."""
        import torch

        model = self.model_runner.model  # set by vLLM on the worker this class is mixed into
        device = next(model.parameters()).device
        model.load_weights(weights=((name, tensor.to(device)) for name, tensor in named_tensors))
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the receipt must mean the copy has landed
        return version
