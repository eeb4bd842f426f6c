"""The engine interface every rollout engine satisfies, and the HTTP plumbing the server adapters share.

Owns the contract between the rollout server and an engine: `generate(prompts, params, generator)`
returns, per prompt, `params.n` `Completion`s whose `logprobs` are the behaviour log-probs of the
distribution actually sampled from (temperature, then top-k, then top-p, renormalised; see
`rollout/sampling.py`); `load_weights(state, version)` swaps in a complete version atomically;
`version` is the version generating now; `health()` says whether the engine can serve; `close()`
lets go of what the engine holds. `TorchEngine` satisfies it as it is.

Also owns attaching to (or starting) an engine server over HTTP, with timeouts and errors that say
which URL failed and what to do. Never talks to the queue or the learner, and never imports
learner code.
"""

from __future__ import annotations

import shlex
import subprocess
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Protocol, runtime_checkable

import httpx

if TYPE_CHECKING:
    import torch

    from asyncrl.rollout.engine import Completion, SamplingParams


class EngineError(RuntimeError):
    """An engine server that is missing, unreachable, of the wrong version, or that refused a request."""


@runtime_checkable
class Engine(Protocol):
    version: int
    """Weight version generating now; -1 until the learner's version 0 has been loaded."""

    def generate(
        self, prompts: list[list[int]], params: "SamplingParams", generator: "Optional[torch.Generator]" = None
    ) -> list[list["Completion"]]: ...

    def load_weights(self, state_dict: dict[str, "torch.Tensor"], version: int) -> None: ...


def health(engine: Engine) -> bool:
    """True when the engine can serve; engines without a `health` method (the embedded one) always can."""
    check = getattr(engine, "health", None)
    return True if check is None else bool(check())


def close(engine: Engine) -> None:
    closer = getattr(engine, "close", None)
    if closer is not None:
        closer()


class ServerEngineMixin:
    """What a server adapter adds so the rollout server can drive it like the embedded engine.

    Server engines run their own scheduler, so interrupting a batch between decode steps is
    theirs to do (SGLang: pause/abort); here `generate_versioned` runs a whole batch and tags
    every token with the version that was loaded when it started, which is exact in 'drain' mode.
    """

    version: int
    is_paused: bool = False

    def generate_versioned(self, prompts, params, generator=None, partials=None, interrupt=None):
        from asyncrl.rollout.engine import VersionedCompletion  # the embedded engine's record of a resumable sample

        if partials is not None and any(c.finish_reason == "abort" for group in partials for c in group):
            raise EngineError(
                f"{type(self).__name__} cannot continue interrupted samples; use weights.update_mode=drain with it"
            )
        version = self.version
        return [
            [VersionedCompletion(c.tokens, c.logprobs, [version] * len(c.tokens), c.finish_reason) for c in group]
            for group in self.generate(prompts, params, generator)
        ]

    @contextmanager
    def paused(self) -> Iterator[Any]:
        self.pause()
        self.is_paused = True
        try:
            yield self
        finally:
            self.is_paused = False
            self.resume()

    def pause(self) -> None:
        """Stop admitting work (servers that cannot pause need not: weight loads are atomic there)."""

    def resume(self) -> None:
        """Undo `pause`."""


class HttpClient:
    """JSON over HTTP to one engine server, with a timeout on every call and errors that name the URL."""

    def __init__(self, url: str, timeout_s: float, engine: str):
        self.url = url.rstrip("/")
        self.engine = engine
        self.timeout_s = timeout_s
        self._client = httpx.Client(base_url=self.url, timeout=timeout_s)

    def get(self, path: str, timeout_s: Optional[float] = None) -> Any:
        return self._call("GET", path, None, timeout_s)

    def post(self, path: str, body: Optional[dict] = None, timeout_s: Optional[float] = None) -> Any:
        return self._call("POST", path, body, timeout_s)

    def _call(self, method: str, path: str, body: Optional[dict], timeout_s: Optional[float]) -> Any:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            response = self._client.request(method, path, json=body, timeout=timeout)
        except httpx.ConnectError as e:
            raise EngineError(
                f"{self.engine} server at {self.url} is unreachable ({e}); start it, or set rollout.engine_url to "
                f"where it listens, or set rollout.engine_launch so asyncrl starts it"
            ) from e
        except httpx.TimeoutException as e:
            raise EngineError(
                f"{self.engine} server at {self.url} did not answer {method} {path} within {timeout} s; "
                f"raise rollout.engine_timeout_s or check the server's log"
            ) from e
        if response.status_code == 404:
            raise EngineError(
                f"{self.engine} server at {self.url} has no endpoint {path} (404); is it the pinned version? "
                f"see docs/engines.md"
            )
        if response.status_code >= 400:
            raise EngineError(
                f"{self.engine} server at {self.url} refused {method} {path} with HTTP {response.status_code}: "
                f"{response.text[:300]}"
            )
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            return response.text

    def close(self) -> None:
        self._client.close()


def attach_or_launch(
    client: HttpClient, ready: Callable[[], bool], command: list[str], start_timeout_s: float
) -> Optional[subprocess.Popen]:
    """Attach to the server if `ready()` (which must not raise); otherwise start `command` and wait for it.

    Returns the process started (None when attached). A server that neither answers nor can be
    started is an error naming the URL and the command.
    """
    if ready():
        return None
    if not command:
        raise EngineError(
            f"{client.engine} server at {client.url} is unreachable or unhealthy; start it, or set "
            f"rollout.engine_url to where it listens, or set rollout.engine_launch so asyncrl starts it"
        )
    process = subprocess.Popen(command)
    deadline = time.monotonic() + start_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EngineError(
                f"{client.engine} server command exited with status {process.returncode} before serving "
                f"{client.url}: {shlex.join(command)}"
            )
        if ready():
            return process
        time.sleep(0.5)
    process.terminate()
    raise EngineError(
        f"{client.engine} server started with {shlex.join(command)} did not become healthy at {client.url} "
        f"within {start_timeout_s} s; raise rollout.engine_start_timeout_s or check its output"
    )
