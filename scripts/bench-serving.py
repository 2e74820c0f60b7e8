#!/usr/bin/env python3
"""Serving benchmark: the same `sluice loadtest` against `sluice serve` and `llama-server`,
REPS repetitions of every level with the two servers alternating, reported as the median
with min and max on both sides (the ratio is of the medians).

Usage: scripts/bench-serving.py SLUICE_BIN LLAMA_DIR MODEL OUT_DIR [--avx2]

Levels: 1, 4 and 16 concurrent greedy streams (temperature 0), then 16 streams sampling
with OpenAI's defaults sent explicitly (temperature 1, top_p 1, the whole vocabulary).
With --avx2, Sluice runs its AVX2 kernels (SLUICE_NO_AVX512=1 SLUICE_NO_VNNI=1) and
LLAMA_DIR is expected to be the AVX2-only llama.cpp build (scripts/install-llama-cpp
--avx2): what an AVX2-only CPU runs. Writes OUT_DIR/summary.json (every run's figures)
and OUT_DIR/table.md; prints the table. Environment: THREADS (2), REQUESTS (32), REPS (3).
"""
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

sluice, llama_dir, model, out = sys.argv[1:5]
avx2 = "--avx2" in sys.argv[5:]
threads = os.environ.get("THREADS", "2")
requests = int(os.environ.get("REQUESTS", "32"))
reps = int(os.environ.get("REPS", "3"))
os.makedirs(out, exist_ok=True)

# (label, concurrency, loadtest sampling flags)
LEVELS = [
    ("1 stream, greedy", 1, ["--temperature", "0"]),
    ("4 streams, greedy", 4, ["--temperature", "0"]),
    ("16 streams, greedy", 16, ["--temperature", "0"]),
    ("16 streams, temperature 1, top_p 1", 16, ["--temperature", "1", "--top-p", "1"]),
]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_health(url):
    for _ in range(480):
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return
        except Exception:
            time.sleep(0.5)
    sys.exit(f"no server at {url}")


def cpu_flags():
    flags = set()
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return flags


env = dict(os.environ, SLUICE_LOG="warn")
if avx2:
    env.update(SLUICE_NO_AVX512="1", SLUICE_NO_VNNI="1")
p1, p2 = free_port(), free_port()
servers = {
    "sluice": subprocess.Popen(
        [sluice, "serve", "--port", str(p1), "--model", model, "--threads", threads],
        env=env, stdout=subprocess.DEVNULL),
}
llama_args = [os.path.join(llama_dir, "llama-server"), "-m", model, "-t", threads, "-np", "16",
              "-c", "8192", "--port", str(p2)]
if not avx2 and "amx_tile" in cpu_flags():
    # The native build's AMX kernels fault where the hypervisor does not enable AMX.
    llama_args.append("--no-repack")
servers["llama-server"] = subprocess.Popen(
    llama_args, env=dict(os.environ, LD_LIBRARY_PATH=llama_dir),
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
urls = {"sluice": f"http://127.0.0.1:{p1}", "llama-server": f"http://127.0.0.1:{p2}"}
try:
    for u in urls.values():
        wait_health(u)
    runs = []  # (level index, rep, server, report)
    for rep in range(reps):
        for li, (label, conc, flags) in enumerate(LEVELS):
            # Alternate which server goes first, so neither always runs on a warmer machine.
            order = ["sluice", "llama-server"] if (rep + li) % 2 == 0 else ["llama-server", "sluice"]
            for name in order:
                d = os.path.join(out, f"rep{rep}-level{li}-{name}")
                subprocess.run(
                    [sluice, "loadtest", "--url", urls[name], "--api-key", "sk-sluice-dev",
                     "--name", name, "--concurrency", str(conc), "--requests", str(max(requests, 2 * conc)),
                     "--max-tokens", "128", "--no-progress", "--output", d, *flags],
                    check=True, stdout=subprocess.DEVNULL)
                r = json.load(open(os.path.join(d, "report.json")))["runs"][0]
                runs.append((li, rep, name, r))
                print(f"rep {rep} {label:<36} {name:<13} {r['output_tokens_per_s']:8.1f} tok/s", flush=True)
                # Keep only the summary: the full report is regenerated with the run.
                for f in os.listdir(d):
                    os.remove(os.path.join(d, f))
                os.rmdir(d)
finally:
    for p in servers.values():
        p.terminate()
    for p in servers.values():
        p.wait()


def stat(xs):
    return statistics.median(xs), min(xs), max(xs)


def fmt(s, digits=0):
    m, lo, hi = s
    return f"{m:.{digits}f} [{lo:.{digits}f}–{hi:.{digits}f}]"


summary = []
lines = [
    f"| load | Sluice output tok/s | llama-server output tok/s | ratio of medians | TTFT p50 ms Sluice / llama-server | ITL p50 ms Sluice / llama-server | errors |",
    "|---|---|---|---|---|---|---|",
]
for li, (label, conc, flags) in enumerate(LEVELS):
    row = {"load": label, "concurrency": conc, "flags": flags}
    for name in ("sluice", "llama-server"):
        rs = [r for (l, _, n, r) in runs if l == li and n == name]
        row[name] = {
            "output_tok_s": [r["output_tokens_per_s"] for r in rs],
            "ttft_p50_ms": [r["ttft_ms"]["p50"] for r in rs],
            "itl_p50_ms": [r["itl_ms"]["p50"] for r in rs],
            "errors": sum(sum(r["errors"].values()) for r in rs),
        }
    a, b = row["sluice"], row["llama-server"]
    ratio = statistics.median(a["output_tok_s"]) / statistics.median(b["output_tok_s"])
    row["ratio"] = ratio
    summary.append(row)
    lines.append(
        f"| {label} | {fmt(stat(a['output_tok_s']))} | {fmt(stat(b['output_tok_s']))} | **{ratio:.2f}×** | "
        f"{statistics.median(a['ttft_p50_ms']):.0f} / {statistics.median(b['ttft_p50_ms']):.0f} | "
        f"{statistics.median(a['itl_p50_ms']):.1f} / {statistics.median(b['itl_p50_ms']):.1f} | "
        f"{a['errors']} / {b['errors']} |")
greedy16, sampled16 = summary[2]["sluice"]["output_tok_s"], summary[3]["sluice"]["output_tok_s"]
per_rep = [s / g for s, g in zip(sampled16, greedy16)]
lines += ["", f"Sluice at 16 streams sampling (temperature 1, top_p 1) against its own greedy 16 streams: "
          f"**{statistics.median(sampled16) / statistics.median(greedy16):.2f}×** (ratio of medians; per repetition "
          f"{', '.join(f'{x:.2f}' for x in per_rep)})."]
cpu = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "benchmarks-md.py"), "--cpu-line"]
                     + (["--avx2"] if avx2 else []), capture_output=True, text=True, check=True).stdout.strip()
lines = [f"CPU: {cpu}; {threads} threads each; {reps} repetitions of {requests} requests per level "
         f"(128 output tokens each), the servers alternating.", ""] + lines
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
json.dump({"sluice_commit": commit, "reps": reps, "requests": requests, "threads": threads, "avx2": avx2, "cpu": cpu, "levels": summary},
          open(os.path.join(out, "summary.json"), "w"), indent=1)
open(os.path.join(out, "table.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
