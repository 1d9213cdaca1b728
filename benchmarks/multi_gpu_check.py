"""A model spread over two GPUs gives the one-GPU engine's tokens and relevancy (float32), and how fast each runs.

    python benchmarks/multi_gpu_check.py --tokenizer TOKENIZER_DIR            # needs two CUDA devices
    python benchmarks/multi_gpu_check.py --tokenizer TOKENIZER_DIR --cpu      # the script's own check, on the CPU

1. Correctness, float32: a Llama-shaped random model (hidden 1024, 16 layers, 16 heads, 8 KV heads) saved to a
   folder and loaded twice: on cuda:0 alone, and the way `selfie worker --gpus 0,1` loads it (``device_map="auto"``
   with ``workers.gpus.weights_max_memory`` of the free memory of both devices). Tokens must be equal and
   relevancy within 1e-5, against the one-GPU run with eager steps (what the split model runs: its CUDA graphs are
   off, and the engine says why) and, reported, with CUDA graphs.
2. Speed, bfloat16 (skipped with --skip-timing): the Llama-2-7B-shaped model of engine_bench.py, one GPU (CUDA
   graphs) against two (eager steps), interpretations/s and the automatic batch size of each.

With --cpu the "two devices" are the CPU and disk offload (the same path the unit test takes), to check the script.
Exit status 1 when a comparison fails or the worker's map does not use both devices.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfie_core import GenerationConfig, InjectionConfig, InterpretationTemplate, InterpretRequest  # noqa: E402
from selfie_core import SelfieEngine, load_model  # noqa: E402

PROMPTS = ["The Eiffel Tower is located in Paris, the capital of France.",
           "The quick brown fox jumps over the lazy dog near the river bank."]


def llama_folder(folder: Path, tokenizer_dir: str, hidden: int, layers: int, dtype: torch.dtype) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                      max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, initializer_range=0.05)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def split_load(folder: Path, dtype: str, cpu: bool, offload: Path):
    if cpu:
        n = load_model(str(folder)).model.config.num_hidden_layers
        device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                      **{f"model.layers.{i}": "cpu" if i < n // 2 else "disk" for i in range(n)}}
        return load_model(str(folder), dtype=dtype, device_map=device_map, offload_folder=str(offload))
    from workers.gpus import free_memory, weights_max_memory

    free = free_memory()[:2]
    return load_model(str(folder), dtype=dtype, device_map="auto", max_memory=weights_max_memory(free))


def requests(tokenizer, layers: int) -> list[InterpretRequest]:
    out = []
    for p in PROMPTS:
        n = len(tokenizer(p).input_ids)
        out += [InterpretRequest(p, layer, t) for layer in range(0, layers + 1, 3) for t in range(1, n, 2)]
    return out


def run(engine, reqs, **kw):
    template = InterpretationTemplate.preset("summarize", engine.tokenizer)
    start = time.perf_counter()
    results = engine.interpret(reqs, template=template, injection=InjectionConfig(k=2),
                               generation=GenerationConfig(max_new_tokens=kw.get("max_new_tokens", 12)))
    if engine.input_device.type == "cuda":
        torch.cuda.synchronize()
    return results, time.perf_counter() - start


def compare(name: str, ours, ref) -> bool:
    tokens = sum(a.token_ids != b.token_ids for a, b in zip(ours, ref))
    worst = max((abs(x - y) for a, b in zip(ours, ref) if a.token_ids == b.token_ids
                 for x, y in zip(a.relevancy, b.relevancy)), default=0.0)
    ok = tokens == 0 and worst <= 1e-5
    print(f"  {name}: {len(ours)} rows, {tokens} with other tokens, largest relevancy difference {worst:.2e} "
          f"-> {'OK' if ok else 'FAIL'}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="a tokenizer folder (save_pretrained), e.g. SmolLM2's")
    ap.add_argument("--cpu", action="store_true", help="check the script on the CPU (CPU + disk offload)")
    ap.add_argument("--skip-timing", action="store_true")
    args = ap.parse_args()
    if not args.cpu and torch.cuda.device_count() < 2:
        print(f"needs two CUDA devices; this machine has {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    failed = False
    one = "cpu" if args.cpu else "cuda:0"
    hidden, layers = (256, 8) if args.cpu else (1024, 16)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama-f32"
        llama_folder(folder, args.tokenizer, hidden, layers, torch.float32)
        print(f"== float32, Llama-shaped (hidden {hidden}, {layers} layers): split against {one} alone")
        split = split_load(folder, "float32", args.cpu, Path(tmp) / "offload")
        used = sorted({str(v) for v in split.model.hf_device_map.values()})
        print(f"  split map uses {used}: {split.model.hf_device_map}")
        if not args.cpu and used != ["0", "1"]:
            print("  FAIL: the worker's device_map does not spread the model over both GPUs")
            failed = True
        split_engine = SelfieEngine(split)
        print(f"  CUDA graphs on the split model: off, because {split_engine.graphs_off_reason}")
        reqs = requests(split.tokenizer, layers)
        ours, t_split = run(split_engine, reqs)
        del split_engine, split
        single = load_model(str(folder), device=one)
        ref, t_one = run(SelfieEngine(single, cuda_graphs=False), reqs)
        failed |= not compare(f"split vs {one}, eager steps", ours, ref)
        if not args.cpu:
            graphs, _ = run(SelfieEngine(single), reqs)
            compare(f"split vs {one}, CUDA graphs (reported only: other attention kernels)", ours, graphs)
        print(f"  {len(reqs)} interpretations: split {t_split:.2f} s, one device {t_one:.2f} s (first runs)")
        del single
    if not args.skip_timing:
        failed |= timing(args)
    print("FAILED" if failed else "all comparisons passed")
    return 1 if failed else 0


def timing(args) -> bool:
    hidden, layers = (256, 8) if args.cpu else (4096, 32)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama-bf16"
        llama_folder(folder, args.tokenizer, hidden, layers, torch.bfloat16)
        print(f"== bfloat16, Llama-2-7B-shaped (hidden {hidden}, {layers} layers): speed")
        reqs = requests(load_model(str(folder)).tokenizer, layers) * (1 if args.cpu else 8)
        for label, loaded in (("one device", lambda: load_model(str(folder), dtype="bfloat16",
                                                                 device="cpu" if args.cpu else "cuda:0")),
                              ("split", lambda: split_load(folder, "bfloat16", args.cpu, Path(tmp) / "offload"))):
            engine = SelfieEngine(loaded())
            run(engine, reqs[:4], max_new_tokens=2)  # warm-up
            size = engine._auto_batch_size(32, 20)
            _, seconds = run(engine, reqs, max_new_tokens=20)
            print(f"  {label}: {len(reqs)} interpretations in {seconds:.2f} s ({len(reqs) / seconds:.1f}/s), "
                  f"automatic batch {size} rows, CUDA graphs {'off' if engine.graphs_off_reason else 'on'}")
            del engine
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return False


if __name__ == "__main__":
    sys.exit(main())
