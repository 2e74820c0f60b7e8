#!/usr/bin/env python3
"""The peer a user would otherwise pick on a GPU machine, for scripts/gpu-check: Hugging
Face transformers `generate` on the same model shape (random weights, bf16), with a
static KV cache and `torch.compile`, greedy, at the given batch sizes. Also the device's
copy bandwidth (for the bandwidth floor of a decode step).

Every figure is the median of --reps timed runs (after warm-up runs that compile), with
the minimum and maximum, as `sluice bench` reports its own.

Runs where gpu-check runs: PyTorch and transformers installed, no network (the model is
built from a config, never downloaded).
"""

import argparse
import json
import statistics
import time

import torch

# The shapes `sluice model synth` writes (engine/src/gguf/synth.rs).
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                         rope_theta=100000.0, tie_word_embeddings=True),
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                      rope_theta=500000.0, tie_word_embeddings=False),
}


def stats(samples):
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "n": len(samples)}


def copy_bandwidth(reps):
    """Device-to-device copy bandwidth in bytes/s (read + write counted once each)."""
    n = 1 << 30  # 1 GiB of bytes
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    samples = []
    for i in range(reps + 2):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        if i >= 2:
            samples.append(2 * n / (time.perf_counter() - t))
    return stats(samples)


def generate_rate(shape, batch, prompt, gen, reps):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, torch_dtype=torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    model.generation_config.cache_implementation = "static"
    model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device="cuda")
    kwargs = dict(max_new_tokens=gen, min_new_tokens=gen, do_sample=False, pad_token_id=0)
    samples = []
    with torch.no_grad():
        for i in range(reps + 2):  # two warm-ups: compilation, then graph capture
            torch.cuda.synchronize()
            t = time.perf_counter()
            model.generate(ids, **kwargs)
            torch.cuda.synchronize()
            if i >= 2:
                samples.append(batch * gen / (time.perf_counter() - t))
    del model
    torch.cuda.empty_cache()
    return stats(samples)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="smollm2-135m,llama3-8b")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "copy_bandwidth_bytes_per_s": copy_bandwidth(a.reps), "generate": []}
    import transformers
    report["transformers"] = transformers.__version__
    for shape in a.shapes.split(","):
        for b in (int(x) for x in a.batches.split(",")):
            try:
                r = generate_rate(shape, b, a.prompt, a.gen, a.reps)
                row = {"shape": shape, "batch": b, "tok_s": r}
            except Exception as e:  # one failing row must not lose the others
                row = {"shape": shape, "batch": b, "error": f"{type(e).__name__}: {e}"}
            print(json.dumps(row), flush=True)
            report["generate"].append(row)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
