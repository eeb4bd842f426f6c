"""Typed run configuration: YAML files plus dotted command-line overrides.

Owns the schema of every setting and its one-line doc (the attribute docstring under each field,
which `asyncrl config-doc` renders into docs/config.md). Validation happens here, once, so that a
wrong key or value is reported before any process starts. Must never start processes or import
torch: every part of asyncrl imports this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and value."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class ModelConfig(Section):
    path: Optional[str] = None
    """Local directory of a Hugging Face causal LM (from_pretrained); null builds a random-init model from the fields below."""
    arch: Literal["qwen2", "llama"] = "qwen2"
    """Architecture of the random-init model."""
    vocab_size: int = Field(32, ge=2)
    """Vocabulary size of the random-init model; must cover the task's tokenizer."""
    hidden_size: int = Field(64, ge=8)
    """Width of the random-init model."""
    intermediate_size: int = Field(128, ge=8)
    """MLP width of the random-init model."""
    num_layers: int = Field(2, ge=1)
    """Transformer blocks of the random-init model."""
    num_heads: int = Field(4, ge=1)
    """Attention heads of the random-init model."""
    num_kv_heads: int = Field(2, ge=1)
    """Key/value heads (grouped-query attention) of the random-init model."""
    max_positions: int = Field(64, ge=8)
    """Longest prompt + response the random-init model supports."""
    tie_embeddings: bool = True
    """Share the input embedding with the output head."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype on every process."""
    init_seed: int = 0
    """Seed of the random initialisation, so that learner and rollout build the same version 0."""


class TaskConfig(Section):
    name: str = "repeat"
    """Built-in task (repeat, reverse, add_mod, longtail) or 'dataset' for a local jsonl/parquet file."""
    num_digits: int = Field(3, ge=1, le=16)
    """Digits per prompt for the built-in digit tasks."""
    path: Optional[str] = None
    """Local jsonl or parquet file of prompts with reference answers (task 'dataset')."""
    prompt_key: str = "question"
    """Column holding the prompt text (task 'dataset')."""
    answer_key: str = "answer"
    """Column holding the reference answer (task 'dataset'); GSM8K '#### 42' endings are understood."""
    reward: Literal["exact", "gsm8k"] = "gsm8k"
    """Reward for task 'dataset': exact string match, or the GSM8K-style final-number match."""


class SamplingConfig(Section):
    n: int = Field(8, ge=1)
    """Samples per prompt: the size of a trajectory group."""
    temperature: float = Field(1.0, gt=0.0)
    """Softmax temperature; behaviour log-probs are taken after it."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass; 1 disables it."""
    top_k: int = Field(0, ge=0)
    """Keep only the k most likely tokens; 0 disables it."""
    max_new_tokens: int = Field(8, ge=1)
    """Longest response in tokens."""
    stop_tokens: list[int] = []
    """Token ids that end a response, in addition to the tokenizer's end-of-sequence token."""


class RolloutConfig(Section):
    num_servers: int = Field(1, ge=1)
    """Rollout servers that `asyncrl run` starts."""
    engine: Literal["torch", "continuous", "vllm", "sglang"] = "torch"
    """Generation engine: the embedded transformers engine, the embedded continuous-batching engine (qwen2/llama), an in-process vLLM (extra 'vllm'), or an SGLang server (extra 'sglang'); see docs/engines.md."""
    engine_url: str = "http://127.0.0.1:30000"
    """SGLang: URL of the engine server to attach to (or that engine_launch starts)."""
    engine_launch: list[str] = []
    """SGLang: command that starts the server when nothing answers at engine_url, e.g. [python, -m, sglang.launch_server, --model-path, ...]; empty attaches only."""
    engine_timeout_s: float = Field(600.0, gt=0.0)
    """SGLang: seconds one request (a generation batch, a weight update) may take before it is an error."""
    engine_start_timeout_s: float = Field(600.0, gt=0.0)
    """SGLang: seconds a launched server may take to become healthy."""
    engine_check_version: bool = True
    """SGLang: refuse a server whose version is not the pinned one."""
    engine_weight_update: Literal["distributed", "tensor"] = "distributed"
    """SGLang: new versions over an NCCL group with the server ('distributed'), or as tensor handles to a colocated loopback server ('tensor')."""
    engine_group_address: str = "127.0.0.1"
    """SGLang 'distributed': an address of the rollout host that the server can reach; the rollout server hosts the weight group's rendezvous there, on a free port."""
    engine_group_backend: Literal["nccl", "gloo"] = "nccl"
    """SGLang 'distributed': the weight group's backend; nccl on GPUs (what SGLang expects), gloo only for CPU tests."""
    engine_args: dict[str, Any] = {}
    """vLLM: extra keyword arguments of vllm.LLM (e.g. gpu_memory_utilization, tensor_parallel_size, dtype, enable_sleep_mode)."""
    groups_per_batch: int = Field(8, ge=1)
    """Groups one generation batch holds (n samples each)."""
    device: str = "cpu"
    """Torch device of the embedded engine."""
    slots: int = Field(0, ge=0)
    """Continuous engine: samples decoded at once; a finished one's slot is refilled from the batch's pending prompts. 0: every sample of a generation batch at once."""
    compile: bool = False
    """Continuous engine: torch.compile its per-token forward (dynamic shapes; the first batch pays the compile)."""
    threads: int = Field(1, ge=1)
    """Torch CPU threads per rollout server."""
    seed: int = 1
    """Base seed of sampling and prompt order; server i uses seed + i."""


class LearnerConfig(Section):
    steps: int = Field(200, ge=1)
    """Learner steps (policy versions) to train."""
    groups_per_step: int = Field(8, ge=1)
    """Groups in each step's batch (B)."""
    lr: float = Field(1e-3, gt=0.0)
    """Adam learning rate."""
    betas: tuple[float, float] = (0.9, 0.99)
    """Adam betas."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay."""
    grad_clip: float = Field(1.0, gt=0.0)
    """Gradient-norm clip."""
    sync_every: int = Field(1, ge=1)
    """Publish weights every this many steps; needs sync_every - 1 <= max_staleness."""
    device: str = "cpu"
    """Torch device of the learner."""
    threads: int = Field(1, ge=1)
    """Torch CPU threads of the learner."""
    seed: int = 0
    """Seed of the learner's own randomness."""
    batch_timeout_s: float = Field(300.0, gt=0.0)
    """Give up with an error when no batch arrives for this long."""
    micro_batch_tokens: int = Field(0, ge=0)
    """Padded tokens (rows x (prompt + response length)) per forward/backward; larger batches are split and their gradients accumulated. 0: the whole batch at once."""
    recompute_prox: bool = False
    """Recompute proximal log-probs in a separate no-grad forward; false reuses the training forward (exact: one optimizer step per batch, weights unchanged)."""
    backend: Literal["torch", "deepspeed"] = "torch"
    """Training backend: plain torch (one rank) or DeepSpeed ZeRO (ranks from torchrun or the deepspeed launcher)."""
    zero_stage: int = Field(2, ge=0, le=3)
    """DeepSpeed ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters."""
    checkpoint_every: int = Field(0, ge=0)
    """Save a checkpoint every this many steps (and at the end) under <out>/checkpoints; 0 disables. Queue acks wait for the checkpoint."""
    keep_checkpoints: int = Field(2, ge=1)
    """Newest checkpoints kept on disk; older ones are deleted."""
    remember_trained: int = Field(8192, ge=0)
    """Ids of acknowledged groups the learner remembers (about 100 bytes each) and tells a restarted
    queue in its hello, so that a producer's resend of one is not trained twice. Must exceed the
    groups trained in the few seconds a producer takes to hear that its groups settled."""


class LossConfig(Section):
    advantage: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "gae"] = "grpo"
    """Advantage estimator: group baselines GRPO (mean/std), Dr. GRPO (mean only), RLOO, REINFORCE++; or 'gae' with a learned value head (PPO with critic)."""
    adv_eps: float = Field(1e-6, gt=0.0)
    """Added to the group std in GRPO."""
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    """GAE: discount per response token (1: the sequence reward counts fully at every token)."""
    lam: float = Field(0.95, ge=0.0, le=1.0)
    """GAE: lambda, from 0 (one-step TD error, low variance) to 1 (Monte Carlo return minus value, no value bias)."""
    value_coef: float = Field(0.5, gt=0.0)
    """GAE: weight of the value loss added to the policy loss."""
    value_clip: Optional[float] = Field(0.2, gt=0.0)
    """GAE: clip value updates to within this of the values before the update (PPO value clipping); null disables it."""
    gae_whiten: bool = False
    """GAE: normalise the policy's advantages to mean 0, std 1 over the batch's response tokens (returns stay raw); see docs/losses.md."""
    objective: Literal["decoupled", "behaviour"] = "decoupled"
    """'decoupled': clip against recomputed proximal log-probs and correct behaviour->proximal by importance weights; 'behaviour': plain PPO against the behaviour log-probs, no correction."""
    correction: Literal["tis", "seq_is", "mis", "geo_mask", "none"] = "tis"
    """Importance correction behaviour -> proximal in the decoupled objective: token truncated IS, sequence IS, masked IS (IcePop), geometric-mean sequence mask, or none."""
    is_cap: float = Field(2.0, gt=0.0)
    """Cap C of truncated importance weights (tis, seq_is)."""
    is_low: float = Field(0.5, ge=0.0)
    """Lower bound of kept importance weights (mis, geo_mask)."""
    is_high: float = Field(2.0, gt=0.0)
    """Upper bound of kept importance weights (mis, geo_mask)."""
    clip_low: float = Field(0.2, ge=0.0, lt=1.0)
    """PPO ratio clip below 1."""
    clip_high: float = Field(0.2, ge=0.0)
    """PPO ratio clip above 1 (clip-higher when larger than clip_low)."""
    dual_clip: Optional[float] = Field(None, gt=1.0)
    """Dual-clip bound c on negative advantages (e.g. 3); null disables it."""
    ratio: Literal["token", "gspo"] = "token"
    """Per-token PPO ratio, or GSPO's length-normalised sequence ratio."""
    agg: Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "token_mean"
    """How per-token losses are reduced to one number."""
    kl_coef: float = Field(0.0, ge=0.0)
    """Weight of the KL penalty to a frozen reference model (the initial policy); 0 builds no reference model."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """Per-token KL estimator: k3 in the loss (GRPO's choice), k1 in the reward."""
    kl_in_reward: bool = False
    """Subtract kl_coef x the sequence's summed KL from its reward before advantages, instead of adding it to the loss."""
    entropy_coef: float = Field(0.0, ge=0.0)
    """Weight of the entropy bonus; > 0 computes per-token entropy from the logits."""


class TrackingConfig(Section):
    tensorboard: bool = False
    """Also write metrics as TensorBoard scalars under <out>/tensorboard."""
    wandb: bool = False
    """Also log metrics to Weights & Biases, offline (files under <out>/wandb; `wandb sync` uploads them later)."""
    wandb_project: str = "asyncrl"
    """W&B project name."""


class QueueConfig(Section):
    address: str = "tcp://127.0.0.1:5555"
    """Where the transfer queue listens (server) and where producers and consumers connect."""
    capacity_groups: int = Field(1024, ge=1)
    """Most groups held at once; producers are told to wait beyond it."""
    capacity_bytes: int = Field(256 << 20, ge=1024)
    """Most payload bytes held at once; producers are told to wait beyond it."""
    max_message_bytes: int = Field(64 << 20, ge=1024)
    """Messages larger than this are rejected."""
    request_timeout_s: float = Field(30.0, gt=0.0)
    """A client resends a request that got no reply for this long, then gives up after retries."""
    lease_s: float = Field(120.0, gt=0.0)
    """Groups handed to a learner and not acknowledged within this long are delivered again."""
    ticket_lease_s: float = Field(300.0, gt=0.0)
    """A rollout server silent this long loses its outstanding admission tickets."""
    seen_capacity: int = Field(1 << 18, ge=1)
    """Most ids of settled groups remembered to recognise resends (about 100 bytes each)."""
    resend_window_s: float = Field(3600.0, gt=0.0)
    """How long a settled group's id is remembered; later resends are not recognised."""
    max_batch_groups: int = Field(1024, ge=1)
    """Most groups one put message may carry."""
    shm_dir: Optional[str] = "/dev/shm"
    """A shared-memory file system where the queue offers same-host producers an arena each: large groups' arrays are written there once and read by the learner, instead of crossing two sockets (docs/queue.md). null: every group travels in the messages."""
    shm_min_bytes: int = Field(64 << 10, ge=0)
    """Groups with at least this many array bytes go through the producer's arena (when the queue's shm_dir is visible to it)."""
    arena_bytes: int = Field(128 << 20, ge=1 << 20)
    """Size of each rollout server's arena; groups that find it full travel in the messages, so it bounds memory and never stalls."""


class WeightsConfig(Section):
    address: str = "tcp://127.0.0.1:5556"
    """Where the learner serves weight versions and rollout servers fetch them."""
    bucket_bytes: int = Field(64 << 20, ge=1024)
    """Size of the buckets a version is copied out and sent in; bounds the learner's extra memory per step of a sharded gather."""
    transport: Literal["zmq", "shm", "ipc"] = "zmq"
    """How this rollout server's engine gets the buckets: over the ZeroMQ socket, by mapping the learner's shared-memory file ('shm'), or by opening the learner's ipc buffers through torch's cross-process handles ('ipc', CUDA IPC on a GPU); 'shm' and 'ipc' need the same host and fall back to zmq when the learner keeps none."""
    shm_dir: Optional[str] = None
    """Directory on a shared-memory file system (e.g. /dev/shm) where the learner keeps each version for 'shm' engines; null keeps versions in the learner's memory."""
    ipc: bool = False
    """Learner: also keep the newest two versions as one flat buffer per bucket on the model's device (GPU memory for a GPU learner), for 'ipc' engines; costs the learner two more copies of the model there."""
    update_mode: Literal["drain", "interrupt"] = "drain"
    """At a new version: 'drain' finishes the running generation batch, then swaps; 'interrupt' stops it between decode steps, swaps, and continues the same samples (per-token versions stay exact)."""


class ReplayConfig(Section):
    redis_url: Optional[str] = None
    """Redis that mirrors every accepted, dropped and rejected group (redis://user:pass@host:port/db, rediss:// for TLS); null turns the mirror off."""
    maxlen: int = Field(10000, ge=1)
    """Most groups kept per run; older ones are deleted (the run's event stream is trimmed with MAXLEN ~ to about this)."""
    max_bytes: int = Field(1 << 30, ge=1 << 20)
    """Most group payload bytes kept per run; the oldest groups are deleted beyond it."""
    max_runs: int = Field(16, ge=1)
    """Most runs kept in Redis; a new run deletes the least recently written ones beyond it."""
    buffer: int = Field(8192, ge=1)
    """Most mirror records waiting to be written (a record without arrays is a few hundred bytes); beyond it records are lost and counted, the queue never waits."""
    buffer_bytes: int = Field(256 << 20, ge=1 << 20)
    """Most payload bytes waiting to be written; beyond it records are lost and counted."""
    array_mib_per_s: Optional[float] = Field(16.0, gt=0)
    """Most array bytes (tokens, log-probs, versions) mirrored per second, in MiB; a group beyond it is mirrored without its arrays (summary, rewards and lengths kept; counted as arrays_skipped), so the mirror never costs the queue more than Redis can take. null: every group's arrays."""


class RunConfig(Section):
    max_restarts: int = Field(5, ge=0)
    """Times `asyncrl run` restarts each child that crashes before it gives up and stops the run; 0 stops at the first crash."""
    restart_backoff_s: float = Field(1.0, gt=0.0)
    """Wait before a child's first restart; each further restart of the same child doubles it, up to restart_backoff_max_s."""
    restart_backoff_max_s: float = Field(30.0, gt=0.0)
    """Longest wait before a restart."""
    min_uptime_s: float = Field(20.0, ge=0.0)
    """A child that exits with an error within this long of its first start is a setup error (bad config, missing file): the run stops instead of restarting it. A child killed by a signal is always restarted."""


class SecurityConfig(Section):
    curve: bool = False
    """Authenticate and encrypt the queue and weights sockets with CurveZMQ; needs keys_dir (see docs/security.md)."""
    keys_dir: Optional[str] = None
    """Directory made by `asyncrl keys`: each role's key pair (queue, learner, rollout) and authorized/ with the public keys allowed in."""


class Config(Section):
    run_name: str = "run"
    """Name of the run, used in logs and replay keys."""
    max_staleness: int = Field(1, ge=0)
    """K: most versions between the weights that generated a group and the step that trains on it; 0 is on-policy."""
    out: Optional[str] = None
    """Output directory (metrics.jsonl, logs); `--out` sets it."""
    model: ModelConfig = ModelConfig()
    """The policy model."""
    task: TaskConfig = TaskConfig()
    """Prompts and rewards."""
    sampling: SamplingConfig = SamplingConfig()
    """How responses are sampled."""
    rollout: RolloutConfig = RolloutConfig()
    """Rollout servers."""
    learner: LearnerConfig = LearnerConfig()
    """The learner."""
    loss: LossConfig = LossConfig()
    """The policy loss."""
    queue: QueueConfig = QueueConfig()
    """The transfer queue."""
    weights: WeightsConfig = WeightsConfig()
    """Weight publication."""
    tracking: TrackingConfig = TrackingConfig()
    """Where metrics go besides metrics.jsonl."""
    replay: ReplayConfig = ReplayConfig()
    """The Redis replay mirror behind `asyncrl replay`."""
    run: RunConfig = RunConfig()
    """How `asyncrl run` supervises its children."""
    security: SecurityConfig = SecurityConfig()
    """Authentication of remote peers."""

    @model_validator(mode="after")
    def _curve_has_keys(self) -> "Config":
        if self.security.curve and not self.security.keys_dir:
            raise ValueError("security.curve=true needs security.keys_dir: make one with `asyncrl keys DIR`")
        return self

    @model_validator(mode="after")
    def _critic_on_torch(self) -> "Config":
        if self.loss.advantage == "gae" and self.learner.backend != "torch":
            raise ValueError(
                f"loss.advantage=gae with learner.backend={self.learner.backend}: the value head is only built by the torch "
                "backend; set learner.backend=torch, or choose a group estimator (loss.advantage=grpo, rloo, ...)"
            )
        return self

    @model_validator(mode="after")
    def _sync_fits_staleness(self) -> "Config":
        if self.learner.sync_every - 1 > self.max_staleness:
            raise ValueError(
                f"learner.sync_every={self.learner.sync_every} with max_staleness={self.max_staleness}: "
                "a group generated right after a publish would be trained "
                f"{self.learner.sync_every - 1} versions later; set learner.sync_every <= max_staleness + 1"
            )
        return self


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split 'a.b.c=value' into (['a','b','c'], value) with the value read as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}={raw!r}: value is not valid YAML ({exc})") from exc
    return key.split("."), value


def apply_override(data: dict, path: list[str], value: Any) -> None:
    node = data
    for depth, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(path[: depth + 1])
            raise ConfigError(f"override {'.'.join(path)}: {where} = {child!r} is a value, not a section")
        node = child
    node[path[-1]] = value


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key (value {err['input']!r}); see docs/config.md for the keys")
        elif err["loc"]:
            lines.append(f"{key} = {err['input']!r}: {msg}")
        else:
            lines.append(msg)
    return "invalid config:\n  " + "\n  ".join(lines)


def build_config(data: dict) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


def load_config(path: Optional[str | Path], overrides: list[str] = ()) -> Config:
    """Read a YAML file (or start from defaults when path is None) and apply dotted overrides."""
    data: dict = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping, not {type(data).__name__}")
    for item in overrides:
        keys, value = parse_override(item)
        apply_override(data, keys, value)
    return build_config(data)


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def config_reference() -> str:
    """Markdown reference of every config key with its type, default and doc."""
    out = ["# Config reference", "", "Generated by `asyncrl config-doc` from asyncrl/config.py.", ""]

    def walk(model: type[BaseModel], prefix: str) -> None:
        rows = []
        subs = []
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                subs.append((prefix + name, ann, field.description))
                continue
            default = field.default
            ann_text = str(ann).replace("typing.", "")
            if isinstance(ann, type):
                ann_text = ann.__name__
            rows.append(f"| `{prefix}{name}` | `{ann_text}` | `{default!r}` | {field.description or ''} |")
        if rows:
            out.extend(["| key | type | default | meaning |", "|---|---|---|---|", *rows, ""])
        for key, sub, doc in subs:
            out.extend([f"## `{key}`", "", doc or "", ""])
            walk(sub, key + ".")

    walk(Config, "")
    return "\n".join(out)
