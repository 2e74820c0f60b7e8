#!/usr/bin/env python3
"""For scripts/gpu-check: starts `sluice serve --device cuda` on a model, checks that
/admin/models says it runs on CUDA, sends one chat request (or, with --loadtest DIR,
runs `sluice loadtest` at 64 streams against it), writes what it saw as JSON, and stops
the server. Standard library only (the GPU machine has no network to install from)."""

import argparse
import json
import subprocess
import sys
import time
import urllib.request

KEY = "sk-sluice-dev"


def call(base, path, body=None, key=KEY):
    req = urllib.request.Request(base + path, method="POST" if body is not None else "GET")
    req.add_header("Authorization", f"Bearer {key}")
    data = None
    if body is not None:
        req.add_header("Content-Type", "application/json")
        data = json.dumps(body).encode()
    with urllib.request.urlopen(req, data=data, timeout=120) as r:
        return json.loads(r.read())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--loadtest", help="run sluice loadtest at 64 streams, report here")
    a = ap.parse_args()
    # An admin key for /admin/models: a config with one generated key.
    made = subprocess.run([a.bin, "keys", "new", "--name", "ops"], capture_output=True,
                          text=True, check=True).stdout
    key = next(l.split(": ", 1)[1] for l in made.splitlines() if l.startswith("API key"))
    entry = made[made.index("[[keys]]"):] + "\nadmin = true\n"
    cfg = f"/tmp/sluice-gpu-check-{int(time.time())}.toml"
    with open(cfg, "w") as f:
        f.write(f'[server]\ndevice = "cuda"\n\n[[models]]\nname = "m"\npath = "{a.model}"\n\n'
                + entry)
    srv = subprocess.Popen([a.bin, "serve", "--config", cfg, "--port", "0"],
                           stdout=subprocess.PIPE, text=True)
    try:
        line = srv.stdout.readline().strip()
        if not line.startswith("sluice listening on "):
            sys.exit(f"sluice serve did not start: {line!r}")
        base = line.removeprefix("sluice listening on ")
        admin = call(base, "/admin/models", key=key)
        backend = admin["data"][0].get("backend")
        seen = {"admin_models": admin}
        if backend != "cuda":
            json.dump(seen, open(a.out, "w"), indent=2)
            sys.exit(f"served on {backend!r}, not cuda")
        if a.loadtest:
            rc = subprocess.run([a.bin, "loadtest", "--url", base, "--api-key", key,
                                 "--model", "m", "--concurrency", "64", "--requests", "640",
                                 "--max-tokens", "128", "--output", a.loadtest,
                                 "--no-progress"]).returncode
            seen["loadtest_exit"] = rc
        else:
            t = time.perf_counter()
            r = call(base, "/v1/chat/completions",
                     {"model": "m", "max_tokens": 16, "temperature": 0,
                      "messages": [{"role": "user", "content": "Name three colors."}]},
                     key=key)
            seen["chat"] = r
            seen["chat_seconds"] = time.perf_counter() - t
            if r["usage"]["completion_tokens"] != 16:
                json.dump(seen, open(a.out, "w"), indent=2)
                sys.exit("the chat request did not generate 16 tokens")
        json.dump(seen, open(a.out, "w"), indent=2)
        if seen.get("loadtest_exit", 0) != 0:
            sys.exit("sluice loadtest failed")
    finally:
        srv.terminate()
        srv.wait(timeout=60)


if __name__ == "__main__":
    main()
