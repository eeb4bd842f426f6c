"""Contract tests of the SGLang adapter against an in-process HTTP double of an SGLang 0.5.4 server.

`SGLangServerDouble` is a double, not SGLang: a real `http.server` on a loopback port that answers
with the request and response shapes of the pinned version's `http_server.py` (`/generate` with
`meta_info.output_token_logprobs` as `[logprob, token_id, text]`, `{success, message}` bodies for
weight updates, HTTP 400 on failure). It exists because SGLang needs a GPU; the GPU-marked test at
the end runs the real server where one is installed.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from asyncrl.rollout.engine import SamplingParams
from asyncrl.rollout.engines.base import EngineError
from asyncrl.rollout.engines.sglang import SGLANG_VERSION, SGLangEngine, parse_generate_output

EOS = 2


class SGLangServerDouble:
    """Answers like an SGLang 0.5.4 HTTP server; records every request as (path, body)."""

    def __init__(self, version: str = SGLANG_VERSION):
        self.version = version
        self.weight_version = "default"
        self.requests: list[tuple[str, dict]] = []
        self.paused = False
        self.delay_s = 0.0
        self.fail_updates = False
        self.generate_s = 0.0
        """How long /generate works before answering, unless /abort_request cuts it short."""
        self.aborted = threading.Event()
        self.join_groups = False
        """Really join the weight-update group asked for (in a child process, as SGLang's workers do)."""
        self.peer = None
        self.received: dict[str, torch.Tensor] = {}
        double = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                double.requests.append((self.path, {}))
                if self.path == "/health":
                    return self._send(200, None)
                if self.path == "/get_server_info":
                    return self._send(200, {"version": double.version, "model_path": "/models/double"})
                if self.path == "/get_model_info":
                    return self._send(200, {"model_path": "/models/double", "tokenizer_path": None,
                                            "is_generation": True, "preferred_sampling_params": None,
                                            "weight_version": double.weight_version})
                return self._send(404, {"detail": "Not Found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                double.requests.append((self.path, body))
                time.sleep(double.delay_s)
                route = {
                    "/generate": double.generate,
                    "/pause_generation": lambda b: double.set_paused(True),
                    "/continue_generation": lambda b: double.set_paused(False),
                    "/abort_request": double.abort,
                    "/init_weights_update_group": double.init_group,
                    "/update_weights_from_distributed": double.update_weights,
                    "/update_weights_from_tensor": double.update_weights,
                }.get(self.path)
                if route is None:
                    return self._send(404, {"detail": "Not Found"})
                self._send(*route(body))

            def _send(self, status, payload):
                data = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.handle_error = lambda request, address: None  # a client that timed out and hung up
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @staticmethod
    def logprob(row: list[int], step: int) -> float:
        """A deterministic per-token log-prob the test can recompute."""
        return -0.1 * (step + 1) - 0.01 * len(row)

    def generate(self, body):
        rows = body["input_ids"]
        sampling = body["sampling_params"]
        sampling = sampling if isinstance(sampling, list) else [sampling] * len(rows)
        self.aborted.clear()
        aborted = self.aborted.wait(self.generate_s) if self.generate_s else False
        outputs = []
        for i, row in enumerate(rows):
            limit = sampling[i]["max_new_tokens"]
            # Even rows stop on EOS after 3 tokens, odd rows run to max_new_tokens.
            stops = i % 2 == 0 and limit > 3
            tokens = [10 + (row[-1] + t) % 20 for t in range(3 if stops else limit)]
            if stops:
                tokens[-1] = EOS
            finish = {"type": "stop", "matched": EOS} if stops else {"type": "length", "length": limit}
            if aborted:  # cut short: half of what it would have made
                tokens = tokens[: len(tokens) // 2]
                finish = {"type": "abort", "message": "Abort before prefill"}
            entries = [[self.logprob(row, t), tok, None] for t, tok in enumerate(tokens)]
            outputs.append({"text": "", "output_ids": tokens, "meta_info": {
                "id": f"req-{i}", "finish_reason": finish, "prompt_tokens": len(row),
                "weight_version": self.weight_version, "completion_tokens": len(tokens),
                "cached_tokens": 0, "e2e_latency": 0.01, "output_token_logprobs": entries}})
        return 200, outputs

    def abort(self, body):
        if body.get("abort_all"):
            self.aborted.set()
        return 200, None

    def set_paused(self, paused: bool):
        self.paused = paused
        return 200, {"message": "ok", "status": "ok"}

    def init_group(self, body):
        if self.join_groups:
            ctx = mp.get_context("spawn")
            mine, theirs = ctx.Pipe()
            args = (theirs, body["master_address"], body["master_port"], body["rank_offset"], body["world_size"],
                    body["group_name"], body["backend"])
            self.peer = (ctx.Process(target=group_peer, args=args, daemon=True), mine)
            self.peer[0].start()
            if not mine.poll(60) or mine.recv_bytes() != b"joined":
                return 500, {"success": False, "message": "the double's group peer did not join"}
        return 200, {"success": True, "message": "Succeeded to initialize custom process group."}

    def update_weights(self, body):
        if self.fail_updates:
            return 400, {"success": False, "message": "Failed to update weights: shape mismatch for lm_head.weight"}
        if self.peer is not None and "names" in body:
            conn = self.peer[1]
            conn.send_bytes(json.dumps(body).encode())
            for name, shape in zip(body["names"], body["shapes"]):
                self.received[name] = torch.frombuffer(bytearray(conn.recv_bytes()), dtype=torch.float32).reshape(shape)
        self.weight_version = body.get("weight_version") or self.weight_version
        return 200, {"success": True, "message": "Succeeded to update model weights."}

    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]

    def close(self):
        if self.peer is not None:
            self.peer[1].send_bytes(b"null")
            self.peer[0].join(10)
        self.server.shutdown()
        self.server.server_close()


def group_peer(conn, address, port, rank, world_size, group_name, backend):
    """The double's side of the weight-update group, in its own process like SGLang's workers: it
    joins with the same torch calls SGLang's `init_custom_process_group` makes, then receives each
    broadcast tensor an update request names and hands its values back as float32 bytes."""
    from asyncrl.weights.transport import broadcast, open_engine_group

    group = open_engine_group(address, port, rank, world_size, group_name, backend, timeout_s=60)
    conn.send_bytes(b"joined")
    while (request := json.loads(conn.recv_bytes())) is not None:
        for shape, dtype in zip(request["shapes"], request["dtypes"]):
            tensor = torch.empty(shape, dtype=getattr(torch, dtype))
            broadcast(group, tensor)
            conn.send_bytes(tensor.float().numpy().tobytes())


@pytest.fixture
def double():
    server = SGLangServerDouble()
    yield server
    server.close()


def recorded_broadcast():
    sent = []
    return sent, sent.append


def test_generate_sends_token_ids_n_times_per_prompt_and_reads_tokens_and_logprobs(double):
    engine = SGLangEngine(double.url, EOS, timeout_s=5)
    prompts = [[5, 6, 7], [8, 9]]
    groups = engine.generate(prompts, SamplingParams(n=2, temperature=0.7, max_new_tokens=5))

    path, body = double.requests[-1]
    assert path == "/generate"
    assert body["input_ids"] == [[5, 6, 7], [5, 6, 7], [8, 9], [8, 9]]
    assert body["return_logprob"] is True
    assert body["sampling_params"]["temperature"] == 0.7
    assert body["sampling_params"]["max_new_tokens"] == 5
    assert [len(g) for g in groups] == [2, 2]
    first, second = groups[0]
    assert first.finish_reason == "stop" and first.tokens[-1] == EOS and len(first.tokens) == 3
    assert second.finish_reason == "length" and len(second.tokens) == 5
    assert first.logprobs == pytest.approx([SGLangServerDouble.logprob([5, 6, 7], t) for t in range(3)])


def test_top_k_or_top_p_is_refused_because_sglang_logprobs_precede_the_filters(double):
    engine = SGLangEngine(double.url, EOS, timeout_s=5)
    for params in (SamplingParams(top_p=0.9), SamplingParams(top_k=5)):
        with pytest.raises(EngineError, match="before top-k/top-p"):
            engine.generate([[1, 2]], params)
    assert "/generate" not in double.paths()


def test_parsed_logprobs_are_the_tempered_distribution_the_server_reports():
    # SGLang reports log(softmax(logits / T)); with no filter that is our behaviour log-prob exactly.
    logits = torch.tensor([1.0, 2.0, 0.5, -1.0])
    tempered = torch.log_softmax(logits / 0.6, -1)
    output = {"meta_info": {"id": "r", "finish_reason": {"type": "length"}, "weight_version": "3",
                            "output_token_logprobs": [[float(tempered[1]), 1, None], [float(tempered[3]), 3, None]]}}
    completion, version = parse_generate_output(output, fallback_version=0)
    assert completion.tokens == [1, 3] and version == 3
    assert completion.logprobs == pytest.approx([float(tempered[1]), float(tempered[3])])
    assert math.isclose(sum(math.exp(v) for v in tempered.tolist()), 1.0, rel_tol=1e-6)


def test_a_response_without_logprobs_or_an_aborted_request_is_an_error():
    with pytest.raises(EngineError, match="output_token_logprobs"):
        parse_generate_output({"text": "hi", "meta_info": {"id": "r"}}, 0)
    aborted = {"meta_info": {"id": "r", "finish_reason": {"type": "abort", "message": "Abort"},
                             "output_token_logprobs": []}}
    with pytest.raises(EngineError, match="abort"):
        parse_generate_output(aborted, 0)


def test_distributed_weight_update_names_every_tensor_broadcasts_them_in_order_and_sets_the_version(double):
    sent, broadcast = recorded_broadcast()
    engine = SGLangEngine(double.url, EOS, timeout_s=5, broadcast=broadcast)
    engine.init_weight_group("10.0.0.1", 29500, world_size=2)
    state = {"model.embed_tokens.weight": torch.zeros(4, 3), "model.norm.weight": torch.ones(3, dtype=torch.bfloat16)}
    engine.load_weights(state, version=7)

    init = dict(double.requests)["/init_weights_update_group"]
    assert init == {"master_address": "10.0.0.1", "master_port": 29500, "rank_offset": 1, "world_size": 2,
                    "group_name": engine.group_name, "backend": "nccl"}
    update = dict(double.requests)["/update_weights_from_distributed"]
    assert update["names"] == list(state)
    assert update["dtypes"] == ["float32", "bfloat16"]
    assert update["shapes"] == [[4, 3], [3]]
    assert update["weight_version"] == "7"
    assert [t.shape for t in sent] == [torch.Size([4, 3]), torch.Size([3])]
    assert engine.version == 7

    groups = engine.generate_versioned([[3, 4]], SamplingParams(n=1, max_new_tokens=4))
    assert set(groups[0][0].versions) == {7}  # the server's weight_version tags the tokens


def test_colocated_tensor_update_posts_serialized_handles_with_the_version(double):
    engine = SGLangEngine(double.url, EOS, timeout_s=5, weight_update="tensor", serializer=lambda items: b"handles")
    engine.load_weights({"w": torch.zeros(2)}, version=2)
    body = dict(double.requests)["/update_weights_from_tensor"]
    assert body["serialized_named_tensors"] == ["aGFuZGxlcw=="]  # base64 of b"handles"
    assert body["weight_version"] == "2" and body["flush_cache"] is True
    assert engine.version == 2


def test_tensor_updates_are_refused_to_a_server_that_is_not_on_loopback():
    with pytest.raises(EngineError, match="loopback"):
        SGLangEngine("http://10.1.2.3:30000", EOS, timeout_s=0.2, weight_update="tensor")


def test_a_failed_weight_update_raises_with_the_servers_message_and_keeps_the_version(double):
    engine = SGLangEngine(double.url, EOS, timeout_s=5, broadcast=lambda tensor: None)
    engine.version = 3
    double.fail_updates = True
    with pytest.raises(EngineError, match="shape mismatch for lm_head.weight"):
        engine.load_weights({"lm_head.weight": torch.zeros(2, 2)}, version=4)
    assert engine.version == 3


def test_distributed_update_without_a_group_says_how_to_open_one(double):
    engine = SGLangEngine(double.url, EOS, timeout_s=5)
    with pytest.raises(EngineError, match="init_weight_group"):
        engine.load_weights({"w": torch.zeros(1)}, version=1)


def test_interrupt_aborts_the_batch_and_continues_each_sample_with_exact_per_token_versions(double):
    engine = SGLangEngine(double.url, EOS, timeout_s=10, broadcast=lambda tensor: None)
    engine.load_weights({"w": torch.zeros(1)}, version=1)
    double.generate_s = 5.0
    params = SamplingParams(n=2, max_new_tokens=8)
    staged = threading.Event()
    threading.Timer(0.2, staged.set).start()  # a new version arrives while the batch runs
    started = time.monotonic()
    first = engine.generate_versioned([[5, 6, 7]], params, interrupt=staged.is_set)
    assert time.monotonic() - started < 3  # aborted, not waited out
    assert ("/abort_request", {"rid": "", "abort_all": True}) in double.requests
    assert [c.finish_reason for c in first[0]] == ["abort", "abort"]
    made = [len(c.tokens) for c in first[0]]
    assert made == [1, 4] and all(set(c.versions) == {1} for c in first[0])

    double.generate_s = 0.0
    engine.load_weights({"w": torch.zeros(1)}, version=2)  # the swap between the two calls
    final = engine.generate_versioned([[5, 6, 7]], params, partials=first, interrupt=lambda: False)
    body = [b for path, b in double.requests if path == "/generate"][-1]
    assert body["input_ids"] == [[5, 6, 7, *c.tokens] for c in first[0]]  # prompt + tokens so far
    assert [sp["max_new_tokens"] for sp in body["sampling_params"]] == [8 - m for m in made]
    for before, after in zip(first[0], final[0]):
        assert after.tokens[: len(before.tokens)] == before.tokens
        assert after.logprobs[: len(before.logprobs)] == before.logprobs
        assert after.versions == [1] * len(before.tokens) + [2] * (len(after.tokens) - len(before.tokens))
        assert after.finish_reason in ("stop", "length") and len(after.tokens) <= 8
    assert [c.finish_reason for c in final[0]] == ["stop", "length"] and len(final[0][1].tokens) == 8


def test_pause_abort_and_continue_reach_their_endpoints(double):
    engine = SGLangEngine(double.url, EOS, timeout_s=5)
    with engine.paused():
        assert double.paused and engine.is_paused
        engine.abort()
        engine.abort("req-3")
    assert not double.paused and not engine.is_paused
    assert double.paths()[-4:] == ["/pause_generation", "/abort_request", "/abort_request", "/continue_generation"]
    assert [b for p, b in double.requests if p == "/abort_request"] == [
        {"rid": "", "abort_all": True}, {"rid": "req-3", "abort_all": False}]


def test_paused_continues_generation_even_when_the_body_raises(double):
    engine = SGLangEngine(double.url, EOS, timeout_s=5)
    with pytest.raises(RuntimeError):
        with engine.paused():
            raise RuntimeError("swap failed")
    assert double.paths()[-1] == "/continue_generation" and not double.paused


def test_health_and_model_info_report_the_weight_version(double):
    engine = SGLangEngine(double.url, EOS, timeout_s=5)
    assert engine.health()
    assert engine.model_info()["weight_version"] == "default"


def test_a_server_of_another_version_is_refused_with_both_versions_named():
    server = SGLangServerDouble(version="0.4.6")
    try:
        with pytest.raises(EngineError, match=r"version 0\.4\.6.*0\.5\.4"):
            SGLangEngine(server.url, EOS, timeout_s=5)
    finally:
        server.close()


def test_an_unreachable_server_is_an_error_naming_the_url_and_what_to_set(double):
    url = double.url
    double.close()
    with pytest.raises(EngineError, match=f"{url}.*unreachable.*rollout.engine_url"):
        SGLangEngine(url, EOS, timeout_s=1)


def test_a_request_slower_than_the_timeout_is_an_error_naming_the_setting(double):
    engine = SGLangEngine(double.url, EOS, timeout_s=0.3)
    double.delay_s = 1.0
    with pytest.raises(EngineError, match="within 0.3 s.*engine_timeout_s"):
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=2))


def test_a_missing_endpoint_points_at_the_pinned_version(double):
    engine = SGLangEngine(double.url, EOS, timeout_s=5)
    with pytest.raises(EngineError, match="no endpoint /nope.*pinned version"):
        engine.client.post("/nope", {})


def test_a_launch_command_that_exits_is_an_error_naming_the_command(double):
    url = double.url
    double.close()
    with pytest.raises(EngineError, match="exited with status 3.*exit 3"):
        SGLangEngine(url, EOS, timeout_s=0.5, launch=["sh", "-c", "exit 3"], start_timeout_s=10)


def real_sglang(port: int, **kwargs) -> tuple[SGLangEngine, str]:
    """A real SGLang server started on `port` with the checkpoint in ASYNCRL_SGLANG_MODEL; skips without one."""
    pytest.importorskip("sglang")
    if not torch.cuda.is_available() or shutil.which("nvidia-smi") is None:
        pytest.skip("needs a CUDA GPU")
    import os

    model = os.environ.get("ASYNCRL_SGLANG_MODEL")
    if not model:
        pytest.skip("set ASYNCRL_SGLANG_MODEL to a local checkpoint directory")
    launch = ["python", "-m", "sglang.launch_server", "--model-path", model, "--port", str(port), "--weight-version", "0"]
    return SGLangEngine(f"http://127.0.0.1:{port}", EOS, launch=launch, start_timeout_s=600, **kwargs), model


@pytest.mark.gpu
@pytest.mark.sglang
def test_real_sglang_server_generates_with_logprobs_and_takes_a_weight_version():
    engine, _ = real_sglang(30123, weight_update="tensor")
    try:
        groups = engine.generate([[1, 2, 3]], SamplingParams(n=2, max_new_tokens=8))
        assert all(len(c.tokens) == len(c.logprobs) > 0 for c in groups[0])
        assert all(lp <= 0 for c in groups[0] for lp in c.logprobs)
    finally:
        engine.close()


@pytest.mark.gpu
@pytest.mark.sglang
def test_real_sglang_server_takes_a_version_over_the_nccl_group():
    from transformers import AutoModelForCausalLM

    engine, model = real_sglang(30124)
    try:
        engine.connect_weight_group("127.0.0.1", "nccl", timeout_s=120)
        state = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.bfloat16).state_dict()
        engine.load_weights(state, version=1)
        groups = engine.generate_versioned([[1, 2, 3]], SamplingParams(n=2, max_new_tokens=8))
        assert all(set(c.versions) == {1} for c in groups[0])
        assert engine.model_info()["weight_version"] == "1"
    finally:
        engine.close()


def test_rollout_engine_sglang_opens_the_weight_group_and_the_server_receives_every_tensor(double):
    from asyncrl.config import load_config
    from asyncrl.rollout.engines import build_engine

    double.join_groups = True
    cfg = load_config(None, ["rollout.engine=sglang", f"rollout.engine_url={double.url}", "rollout.engine_timeout_s=60",
                             "rollout.engine_group_backend=gloo"])  # gloo: the NCCL path needs a GPU (marked test below)
    engine = build_engine(cfg, type("Tokenizer", (), {"eos_token_id": EOS})())
    init = dict(double.requests)["/init_weights_update_group"]
    assert (init["master_address"], init["rank_offset"], init["world_size"], init["backend"]) == ("127.0.0.1", 1, 2, "gloo")
    state = {"model.embed_tokens.weight": torch.randn(5, 3), "model.norm.weight": torch.randn(3).to(torch.bfloat16)}
    engine.load_weights(state, version=4)
    assert list(double.received) == list(state)
    for name, tensor in state.items():
        assert torch.equal(double.received[name], tensor.float())
    assert engine.version == 4 and double.weight_version == "4"


def test_rollout_engine_sglang_attaches_to_the_configured_url(double):
    from asyncrl.config import load_config
    from asyncrl.rollout.engines import build_engine

    cfg = load_config(None, ["rollout.engine=sglang", f"rollout.engine_url={double.url}", "rollout.engine_timeout_s=5",
                             "rollout.engine_weight_update=tensor"])
    engine = build_engine(cfg, type("Tokenizer", (), {"eos_token_id": EOS})())
    assert isinstance(engine, SGLangEngine) and engine.version == -1 and engine.process is None
    assert engine.client.url == double.url
