"""Benchmark: generated tokens/s of the embedded engines against Hugging Face `generate()` on a long-tailed mix.

    .venv/bin/python scripts/bench_engine.py --json runs/bench_engine.json

Workload: `--groups` random prompts (8-24 tokens) x n samples, sampled at temperature 1 with no
top-k/top-p, on random-init models whose next-token distribution is close to uniform. A sample
ends at any of the stop tokens (1/16 of the vocabulary, so lengths are geometric with mean ~16:
a long tail) or at `--max-new-tokens`. Every engine gets the same prompts, n, sampling settings,
stop tokens and max length, and batches of `--batch-groups` groups (batch x n rows):

- `hf_generate`: `model.generate(do_sample=True, temperature=1, top_k=0, top_p=1,
  num_return_sequences=n, eos_token_id=<stop tokens>)` per batch, left-padded, with the SDPA
  attention (`hf_generate_eager`: the eager attention the embedded models are built with).
  It returns no log-probs; the embedded engines also compute behaviour log-probs.
- `torch`: `TorchEngine.generate` per batch (one rectangular batch, finished rows decode pads).
- `continuous_static`: `ContinuousEngine(slots=0)` per batch: the hand-written forward and
  preallocated cache, without refill.
- `continuous`: `ContinuousEngine(slots=batch x n)` given all groups in one call: finished samples'
  slots are refilled from the pending groups.
- `continuous_compile` (with `--compile`): the same with `torch.compile` (compile time excluded).
- `vllm`: the same workload in a subprocess of the vLLM venv (`--vllm-python`), when it exists.

Tokens counted are the samples' own (up to and including the stop token). Each engine runs once to
warm up, then `--repeats` times; the median wall time counts. Models: the quickstart model and a
bigger one (hidden 256, 4 layers, vocab 512).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from asyncrl.config import ModelConfig  # noqa: E402
from asyncrl.modeling import build_model  # noqa: E402
from asyncrl.rollout.engine import SamplingParams, TorchEngine  # noqa: E402
from asyncrl.rollout.engines.continuous import ContinuousEngine  # noqa: E402

PAD = 0
MODELS = {
    "quickstart": dict(arch="qwen2", vocab_size=32, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=4, num_kv_heads=2),
    "bigger": dict(arch="qwen2", vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=4,
                   num_heads=8, num_kv_heads=4),
}

VLLM_SCRIPT = """
import json, sys, time
from vllm import LLM, SamplingParams

def main():  # vLLM spawns its engine core, which re-imports this file: nothing may run at import
    spec = json.load(open(sys.argv[1]))
    # a small share of memory: the machine is shared, and these models need little KV cache
    llm = LLM(model=spec["model"], skip_tokenizer_init=True, dtype="float32", seed=0, gpu_memory_utilization=0.08)
    params = SamplingParams(n=spec["n"], temperature=1.0, top_k=-1, top_p=1.0, max_tokens=spec["max_new_tokens"],
                            stop_token_ids=spec["stop"], ignore_eos=False, detokenize=False)
    prompts = [{"prompt_token_ids": p} for p in spec["prompts"]]
    llm.generate(prompts[:2], params, use_tqdm=False)
    times, tokens = [], 0
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - start)
        tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    print("RESULT " + json.dumps({"tokens": tokens, "times": times}))

if __name__ == "__main__":
    main()
"""


def workload(vocab: int, groups: int, seed: int) -> tuple[list[list[int]], tuple[int, ...]]:
    stop = tuple(range(1, 1 + vocab // 16))  # id 1 is also the model's eos
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(groups):
        length = int(torch.randint(8, 25, (1,), generator=g))
        prompts.append(torch.randint(len(stop) + 1, vocab, (length,), generator=g).tolist())
    return prompts, stop


def count_tokens(rows: torch.Tensor, stop: tuple[int, ...]) -> list[int]:
    """Lengths of HF output rows (pads after a stop are not the sample's)."""
    hit = torch.isin(rows, torch.tensor(stop))
    first = torch.where(hit.any(1), hit.float().argmax(1) + 1, torch.full((rows.shape[0],), rows.shape[1]))
    return first.tolist()


def run_hf(model, prompts, params, stop, batch_groups, generator_seed) -> list[int]:
    torch.manual_seed(generator_seed)
    lengths = []
    for i in range(0, len(prompts), batch_groups):
        batch = prompts[i : i + batch_groups]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[PAD] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=params.temperature, top_k=0,
                top_p=1.0, max_new_tokens=params.max_new_tokens, num_return_sequences=params.n,
                eos_token_id=list(stop), pad_token_id=PAD,
            )
        lengths += count_tokens(out[:, width:], stop)
    return lengths


def run_engine(engine, prompts, params, batch_groups, seed) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    lengths = []
    for i in range(0, len(prompts), batch_groups):
        for group in engine.generate(prompts[i : i + batch_groups], params, generator):
            lengths += [len(c.tokens) for c in group]
    return lengths


def measure(run, repeats: int) -> dict:
    run()  # warm-up (and the compile, where there is one)
    times, lengths = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        lengths = run()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens = sum(lengths)
    return {"tokens": tokens, "seconds": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 1),
            "times": [round(t, 4) for t in times], "mean_length": round(tokens / len(lengths), 2),
            "max_length": max(lengths)}


def run_vllm(python: str, model, prompts, params, stop, repeats) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        spec = Path(tmp, "spec.json")
        spec.write_text(json.dumps({"model": tmp, "n": params.n, "max_new_tokens": params.max_new_tokens,
                                    "stop": list(stop), "prompts": prompts, "repeats": repeats}))
        script = Path(tmp, "bench_vllm.py")
        script.write_text(VLLM_SCRIPT)
        done = subprocess.run([python, str(script), str(spec)], capture_output=True, text=True, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        causes = [line for line in (done.stdout + done.stderr).splitlines() if "Error:" in line and "WARNING" not in line]
        return {"error": f"vllm exited {done.returncode}: {(causes or [done.stderr[-300:]])[0].strip()[-300:]}"}
    result = json.loads(lines[-1][len("RESULT "):])
    seconds = statistics.median(result["times"])
    return {"tokens": result["tokens"], "seconds": round(seconds, 4),
            "tokens_per_s": round(result["tokens"] / seconds, 1), "times": result["times"]}


def bench_model(name: str, args) -> dict:
    cfg = ModelConfig(**MODELS[name], max_positions=args.max_new_tokens + 32)
    prompts, stop = workload(cfg.vocab_size, args.groups, args.seed)
    params = SamplingParams(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens, stop_tokens=stop)
    slots = args.batch_groups * args.n
    results = {}

    def engine_run(engine, batch_groups):
        return lambda: run_engine(engine, prompts, params, batch_groups, args.seed)

    model = build_model(cfg).eval()
    model.set_attn_implementation("sdpa")
    results["hf_generate"] = measure(lambda: run_hf(model, prompts, params, stop, args.batch_groups, args.seed),
                                     args.repeats)
    model.set_attn_implementation("eager")
    results["hf_generate_eager"] = measure(
        lambda: run_hf(model, prompts, params, stop, args.batch_groups, args.seed), args.repeats)
    results["torch"] = measure(engine_run(TorchEngine(build_model(cfg), 1, PAD), args.batch_groups), args.repeats)
    results["continuous_static"] = measure(
        engine_run(ContinuousEngine(build_model(cfg), 1, PAD), args.batch_groups), args.repeats)
    results["continuous"] = measure(
        engine_run(ContinuousEngine(build_model(cfg), 1, PAD, slots=slots), len(prompts)), args.repeats)
    if args.compile:
        results["continuous_compile"] = measure(
            engine_run(ContinuousEngine(build_model(cfg), 1, PAD, slots=slots, compile=True), len(prompts)),
            args.repeats)
    if args.vllm_python and os.path.exists(args.vllm_python):
        results["vllm"] = run_vllm(args.vllm_python, model, prompts, params, stop, args.repeats)
    else:
        results["vllm"] = {"error": f"not installed: no {args.vllm_python}"}
    base = results["hf_generate"]["tokens_per_s"]
    for entry in results.values():
        if "tokens_per_s" in entry:
            entry["speedup_vs_hf_generate"] = round(entry["tokens_per_s"] / base, 2)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--groups", type=int, default=32, help="prompts in the workload")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--batch-groups", type=int, default=8, help="groups per batch (slots = this x n)")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="also time the engine under torch.compile")
    parser.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"),
                        help="python of a venv where vllm is importable")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "load_before": os.getloadavg(),
        "models": {},
    }
    for name in args.models:
        report["models"][name] = bench_model(name, args)
        for engine, entry in report["models"][name].items():
            print(f"{name:10s} {engine:20s} " + (f"{entry['tokens_per_s']:9.1f} tok/s  "
                  f"x{entry['speedup_vs_hf_generate']:.2f} vs hf_generate  ({entry['tokens']} tokens, "
                  f"{entry['seconds']:.2f} s)" if "tokens_per_s" in entry else entry["error"]), flush=True)
    report["load_after"] = os.getloadavg()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
