"""SGLang behind the engine interface, through its HTTP server (pinned: sglang 0.5.4).

Owns the request and response shapes of the SGLang endpoints asyncrl uses (listed in
docs/engines.md) and turning them into `Completion`s. Never imports sglang at module level: the
adapter runs against any server that speaks the pinned shapes, and only the colocated weight path
needs the package (for SGLang's own tensor serializer).

Design decisions:

- Token ids in, token ids out: `/generate` gets `input_ids`, and tokens and behaviour log-probs are
  read together from `meta_info.output_token_logprobs` (`[logprob, token_id, text]` per token), so
  the two can never disagree in length.
- Each prompt is sent n times (prompt-major), not with `sampling_params.n`, so the order of a
  group's samples is ours; SGLang's radix cache shares the prompt's prefill among them.
- One meaning for behaviour log-probs. SGLang reports log-probs after temperature but before its
  top-k/top-p filtering, so they equal ours (contract 3) only when no filter is on. A filter's
  renormalisation cannot be undone from the sampled token's log-prob alone, so the adapter refuses
  top_k > 0 or top_p < 1 instead of training on the wrong distribution. The server must run without
  SGLANG_RETURN_ORIGINAL_LOGPROB (which reports pre-temperature log-probs).
- Versions: every update carries `weight_version=str(version)` and each response's
  `meta_info.weight_version` tags its tokens, so a response is attributed to the weights that
  produced it even if an update raced it.
- Weights: 'distributed' opens an NCCL group with the server (`connect_weight_group`: this
  process is rank 0, the server's tensor-parallel workers ranks 1..tp, formed the way SGLang forms
  its side) and broadcasts each tensor while `/update_weights_from_distributed` receives it; 'tensor'
  (colocated, same host) hands SGLang CUDA-IPC handles via `/update_weights_from_tensor`. The
  latter uses SGLang's own pickle-based serializer, so it is allowed only to a loopback server.
"""

from __future__ import annotations

import base64
import threading
import uuid
from typing import Any, Callable, Literal, Optional
from urllib.parse import urlparse

from asyncrl.rollout.engines.base import EngineError, HttpClient, ServerEngineMixin, attach_or_launch

SGLANG_VERSION = "0.5.4"
"""The SGLang release whose request/response shapes this adapter speaks (pyproject's `sglang` extra)."""

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def sglang_sampling_params(params) -> dict[str, Any]:
    """Our SamplingParams as SGLang's `sampling_params`; refuses filters whose log-probs SGLang misreports."""
    if params.top_k > 0 or params.top_p < 1.0:
        raise EngineError(
            f"sampling.top_k={params.top_k}, sampling.top_p={params.top_p}: SGLang reports log-probs before "
            f"top-k/top-p filtering, so behaviour log-probs would be of the wrong distribution; set top_k=0 and "
            f"top_p=1 with rollout.engine=sglang (temperature is fine), or use the torch or vllm engine"
        )
    return {
        "temperature": params.temperature,
        "top_p": 1.0,
        "top_k": -1,
        "max_new_tokens": params.max_new_tokens,
        "stop_token_ids": list(params.stop_tokens),
        "skip_special_tokens": False,
        "no_stop_trim": True,
    }


def parse_generate_output(output: dict, fallback_version: int, allow_abort: bool = False):
    """One `/generate` result -> (Completion, weight version that produced it). An aborted request
    (finish_reason 'abort', with the tokens made before the abort) is an error unless `allow_abort`."""
    from asyncrl.rollout.engine import Completion

    meta = output.get("meta_info") if isinstance(output, dict) else None
    if not isinstance(meta, dict) or "output_token_logprobs" not in meta:
        raise EngineError(
            f"SGLang /generate answered without meta_info.output_token_logprobs ({str(output)[:200]}); "
            f"the request sets return_logprob=true, so the server is not speaking sglang {SGLANG_VERSION}'s shapes"
        )
    entries = meta["output_token_logprobs"]
    tokens = [int(entry[1]) for entry in entries]
    logprobs = [float(entry[0]) for entry in entries]
    reason = (meta.get("finish_reason") or {}).get("type")
    if reason not in (("stop", "length", "abort") if allow_abort else ("stop", "length")):
        raise EngineError(
            f"SGLang request {meta.get('id')} finished with {meta.get('finish_reason')!r}; "
            f"expected 'stop' or 'length' (was it aborted?)"
        )
    version = meta.get("weight_version")
    try:
        version = int(version)
    except (TypeError, ValueError):
        version = fallback_version  # a server started without --weight-version reports "default"
    return Completion(tokens, logprobs, reason), version


class SGLangEngine(ServerEngineMixin):
    """Generation and weight updates on an SGLang server, attached to by URL or started by asyncrl."""

    def __init__(
        self,
        url: str,
        eos_token_id: int,
        timeout_s: float = 600.0,
        weight_update: Literal["distributed", "tensor"] = "distributed",
        launch: Optional[list[str]] = None,
        start_timeout_s: float = 600.0,
        check_version: bool = True,
        serializer: Optional[Callable[[list], bytes]] = None,
        broadcast: Optional[Callable[[Any], None]] = None,
    ):
        self.client = HttpClient(url, timeout_s, "SGLang")
        self.eos_token_id = eos_token_id
        self.weight_update = weight_update
        self.version = -1
        self.versions_seen: list[int] = []
        """Weight versions reported by the last generate call, one per sample (prompt-major)."""
        self._serializer = serializer
        self._broadcast = broadcast
        self.group_name = f"asyncrl_weights_{uuid.uuid4().hex[:8]}"
        """Names the weight-update group; unique, since a process registers each group name once."""
        self._lock = threading.RLock()
        if weight_update == "tensor" and urlparse(self.client.url).hostname not in LOOPBACK:
            raise EngineError(
                f"rollout.engine_weight_update=tensor with SGLang at {self.client.url}: colocated updates pass "
                f"SGLang-serialized tensor handles and are allowed only to a loopback server; use 'distributed'"
            )
        self.process = attach_or_launch(self.client, self.health, launch or [], start_timeout_s)
        if check_version:
            self.check_version()

    # --- serving ---------------------------------------------------------------------------------

    def health(self) -> bool:
        try:
            self.client.get("/health", timeout_s=min(self.client.timeout_s, 30.0))
        except EngineError:
            return False
        return True

    def check_version(self) -> str:
        info = self.client.get("/get_server_info")
        version = str(info.get("version")) if isinstance(info, dict) else "unknown"
        if version != SGLANG_VERSION:
            raise EngineError(
                f"SGLang server at {self.client.url} is version {version}; asyncrl speaks sglang {SGLANG_VERSION}'s "
                f"API: install `pip install 'asyncrl[sglang]'` on the server, or set rollout.engine_check_version=false "
                f"at your own risk"
            )
        return version

    def model_info(self) -> dict:
        return self.client.get("/get_model_info")

    def generate(self, prompts, params, generator=None):
        """n completions per prompt; `generator` is unused (the server seeds its own sampling)."""
        if not prompts:
            return []
        rows = [list(map(int, p)) for p in prompts for _ in range(params.n)]
        parsed = self._generate_rows(rows, [params.max_new_tokens] * len(rows), params)
        self.versions_seen = [version for _, version in parsed]
        n = params.n
        completions = [c for c, _ in parsed]
        return [completions[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _generate_rows(self, rows: list[list[int]], budgets: list[int], params, interrupt=None) -> list:
        """One /generate of `rows`, row i with at most budgets[i] new tokens; [(Completion, version)].

        With `interrupt`, it is polled while the request runs; once it turns true every running request
        is aborted (/abort_request, abort_all) and comes back with the tokens it had (finish 'abort')."""
        sampling = [dict(sglang_sampling_params(params), max_new_tokens=b) for b in budgets]
        body = {"input_ids": rows, "sampling_params": sampling if len(set(budgets)) > 1 else sampling[0],
                "return_logprob": True, "logprob_start_len": -1}
        with self._lock:
            if interrupt is None:
                answer = self.client.post("/generate", body)
            else:
                answer = self._post_interruptible(body, interrupt)
        if isinstance(answer, dict):
            answer = [answer]
        if not isinstance(answer, list) or len(answer) != len(rows):
            raise EngineError(
                f"SGLang /generate returned {len(answer) if isinstance(answer, list) else type(answer).__name__} "
                f"results for {len(rows)} requests"
            )
        return [parse_generate_output(out, self.version, allow_abort=interrupt is not None) for out in answer]

    def _post_interruptible(self, body: dict, interrupt: Callable[[], bool], poll_s: float = 0.005) -> Any:
        result: dict = {}

        def request() -> None:
            try:
                result["answer"] = self.client.post("/generate", body)
            except BaseException as e:  # reported on the caller's thread below
                result["error"] = e

        thread = threading.Thread(target=request, daemon=True)
        thread.start()
        aborted = False
        while thread.is_alive():
            thread.join(poll_s)
            if not aborted and thread.is_alive() and interrupt():
                self.abort()  # the running requests return at once with what they made so far
                aborted = True
        if "error" in result:
            raise result["error"]
        return result["answer"]

    def generate_versioned(self, prompts, params, generator=None, partials=None, interrupt=None):
        """Each token tagged with the weight version the server reports for its request.

        Interrupt mode (`interrupt` given): a staged weight version aborts the running batch, and the
        samples come back with finish 'abort'; called again with them as `partials` (after the swap),
        each unfinished sample continues from its prompt plus its tokens so far, with what is left of
        max_new_tokens, and its new tokens carry the new version. Finished samples are kept as they are."""
        from asyncrl.rollout.engine import VersionedCompletion

        if not prompts:
            return []
        n = params.n
        if partials is None:
            done = [VersionedCompletion([], [], [], "abort") for _ in range(len(prompts) * n)]
        else:
            done = [c for group in partials for c in group]
        todo = [i for i, c in enumerate(done) if c.finish_reason == "abort"]
        rows = [list(map(int, prompts[i // n])) + list(done[i].tokens) for i in todo]
        budgets = [params.max_new_tokens - len(done[i].tokens) for i in todo]
        parsed = self._generate_rows(rows, budgets, params, interrupt) if todo else []
        for i, (completion, version) in zip(todo, parsed):
            before = done[i]
            reason = completion.finish_reason
            if reason == "abort" and len(before.tokens) + len(completion.tokens) >= params.max_new_tokens:
                reason = "length"  # aborted with nothing left to make: finished
            done[i] = VersionedCompletion(
                list(before.tokens) + list(completion.tokens), list(before.logprobs) + list(completion.logprobs),
                list(before.versions) + [version] * len(completion.tokens), reason,
            )
        self.versions_seen = [version for _, version in parsed]
        return [done[g * n : (g + 1) * n] for g in range(len(prompts))]

    # --- interrupt mode --------------------------------------------------------------------------

    def pause(self) -> None:
        self.client.post("/pause_generation", {})

    def resume(self) -> None:
        self.client.post("/continue_generation", {})

    def abort(self, rid: Optional[str] = None) -> None:
        """Abort one request by id, or every running request when rid is None."""
        self.client.post("/abort_request", {"rid": rid or "", "abort_all": rid is None})

    # --- weights ---------------------------------------------------------------------------------

    def init_weight_group(self, master_address: str, master_port: int, world_size: int = 2,
                          group_name: Optional[str] = None, backend: str = "nccl") -> None:
        """Ask the server to join the weight-broadcast group (its ranks start at 1; we are rank 0).

        The caller opens its own side of the group (rank 0) while this request is in flight, and
        hands `broadcast` (rank 0's broadcast in that group) to the engine; `connect_weight_group` does both.
        """
        body = {"master_address": master_address, "master_port": master_port, "rank_offset": 1,
                "world_size": world_size, "group_name": group_name or self.group_name, "backend": backend}
        self._expect_success("/init_weights_update_group", self.client.post("/init_weights_update_group", body))

    def connect_weight_group(self, master_address: str = "127.0.0.1", backend: str = "nccl",
                             port: Optional[int] = None, timeout_s: float = 600.0) -> None:
        """Open the weight-update group with the server, for weight_update='distributed'.

        This process is rank 0 and hosts the rendezvous on master_address (an address of this host
        that the server can reach) at `port` (a free one by default); the server's tensor-parallel
        workers are ranks 1..tp_size (`/get_server_info`). The server joins while its
        /init_weights_update_group request is being served, so that request goes out on its own
        thread while this one joins; either side failing within timeout_s is an EngineError.
        """
        import torch

        from asyncrl.ports import free_port
        from asyncrl.weights.transport import broadcast, open_engine_group

        info = self.client.get("/get_server_info")
        tp_size = int(info.get("tp_size") or 1) if isinstance(info, dict) else 1
        port = port or free_port()
        failure: list[BaseException] = []

        def request() -> None:
            try:
                self.init_weight_group(master_address, port, 1 + tp_size, self.group_name, backend)
            except BaseException as e:  # reported on the caller's thread below
                failure.append(e)

        thread = threading.Thread(target=request, daemon=True)
        thread.start()
        try:
            group = open_engine_group(master_address, port, 0, 1 + tp_size, self.group_name, backend, timeout_s)
        except Exception as e:
            thread.join(1.0)
            cause = failure[0] if failure else e
            raise EngineError(f"SGLang at {self.client.url} did not join the weight-update group at "
                              f"{master_address}:{port} ({backend}) within {timeout_s:.0f} s: {cause}") from cause
        thread.join(timeout_s)
        if failure:
            raise failure[0]
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self._broadcast = lambda tensor: broadcast(group, tensor.to(device).contiguous())

    def load_weights(self, state_dict: dict, version: int) -> None:
        if self.weight_update == "tensor":
            self._load_from_tensor(state_dict, version)
        else:
            self._load_from_distributed(state_dict, version)
        self.version = version

    def _load_from_distributed(self, state_dict: dict, version: int) -> None:
        if self._broadcast is None:
            raise EngineError(
                "SGLang weight_update=distributed needs the NCCL group: call init_weight_group(...) and pass "
                "broadcast=, or use weight_update=tensor for a colocated server"
            )
        names = list(state_dict)
        body = {
            "names": names,
            "dtypes": [str(state_dict[n].dtype).removeprefix("torch.") for n in names],
            "shapes": [list(state_dict[n].shape) for n in names],
            "group_name": self.group_name,
            "flush_cache": True,
            "weight_version": str(version),
        }
        answer: dict = {}
        failure: list[BaseException] = []

        def request() -> None:
            try:
                answer["body"] = self.client.post("/update_weights_from_distributed", body)
            except BaseException as e:  # reported on the caller's thread below
                failure.append(e)

        # The server receives the broadcasts only while its request is being served, so the
        # request goes out first on its own thread and the tensors follow in the order named.
        thread = threading.Thread(target=request, daemon=True)
        thread.start()
        for name in names:
            self._broadcast(state_dict[name])
        thread.join(self.client.timeout_s)
        if failure:
            raise failure[0]
        if thread.is_alive():
            raise EngineError(f"SGLang /update_weights_from_distributed for version {version} did not finish "
                              f"within {self.client.timeout_s} s")
        self._expect_success("/update_weights_from_distributed", answer.get("body"))

    def _load_from_tensor(self, state_dict: dict, version: int) -> None:
        serializer = self._serializer or _sglang_serializer()
        payload = serializer(list(state_dict.items()))
        body = {
            "serialized_named_tensors": [base64.b64encode(payload).decode("ascii")],
            "load_format": None,
            "flush_cache": True,
            "weight_version": str(version),
        }
        self._expect_success("/update_weights_from_tensor", self.client.post("/update_weights_from_tensor", body))

    def _expect_success(self, path: str, answer: Any) -> None:
        if not isinstance(answer, dict) or not answer.get("success", False):
            message = answer.get("message") if isinstance(answer, dict) else answer
            raise EngineError(f"SGLang {path} at {self.client.url} failed: {message}")

    def close(self) -> None:
        self.client.close()
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)


def _sglang_serializer() -> Callable[[list], bytes]:
    try:
        from sglang.srt.utils import MultiprocessingSerializer
    except ImportError as e:
        raise EngineError(
            "rollout.engine_weight_update=tensor needs the sglang package on the rollout host "
            f"(pip install 'asyncrl[sglang]'); it is not importable: {e}"
        ) from e
    return MultiprocessingSerializer.serialize
