#!/usr/bin/env python3
"""Compiles the CUDA kernels (engine/src/backends/cuda/kernels/*.cu) to PTX with NVRTC.

One PTX file per source and architecture, ptx/<source>.sm_80.ptx and .sm_90.ptx, is
committed beside the sources; the CUDA backend embeds them and the driver JIT-compiles
them for the GPU at hand. NVRTC and ptxas come from NVIDIA's PyPI wheels (see
scripts/ptx-requirements.txt), so neither a CUDA toolkit nor a GPU is needed. Run it
through scripts/build-ptx, which provides those wheels.

  build_ptx.py            regenerate ptx/
  build_ptx.py --check    compile into a temporary folder and fail if any PTX differs
                          from the committed one (or is missing, or is stale)

Both modes also run ptxas on every PTX (only to read its resource report; the cubin
is thrown away), print registers / spills / shared memory per kernel, and fail if a
kernel of the hot set (the matrix products, attention, rms_norm, rope) spills
registers to local memory.

The output is deterministic: the same sources and pinned compiler give byte-identical
PTX (NVRTC writes no paths or times into PTX without debug info, and nothing here
passes any).
"""

import argparse
import ctypes
import difflib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "engine/src/backends/cuda/kernels"
PTX_DIR = KERNELS / "ptx"

# Ampere (A100, sm_80) is the oldest target; Hopper (H100/H200, sm_90) gets its own PTX
# so that the driver's JIT compiles for it from compute_90 code. Plain compute_90, not
# sm_90a: nothing here uses the arch-specific (wgmma / TMA) instructions.
ARCHS = ["80", "90"]

# No --use_fast_math: it would flush denormals to zero and swap expf/tanhf/sincosf and
# division for approximations, which moves results away from the CPU engine's for no
# measurable gain (the kernels that use them are memory bound).
COMMON_OPTIONS = ["--std=c++17"]

# Kernels that must not spill: they carry the model's time.
HOT = re.compile(r"^(mmv_|mm_|paged_attention_|rms_norm$|rope$)")


def wheel_dir(package: str) -> Path:
    """The folder of an installed nvidia.* wheel package (e.g. "nvidia.cuda_nvrtc")."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"{package} is not installed: run scripts/build-ptx, which installs "
                 "scripts/ptx-requirements.txt")
    return Path(list(spec.submodule_search_locations)[0])


class Nvrtc:
    """The few NVRTC entry points we need, through ctypes."""

    def __init__(self):
        lib_dir = wheel_dir("nvidia.cuda_nvrtc") / "lib"
        # libnvrtc dlopens its builtins library by name; loading it first, globally,
        # makes that work without LD_LIBRARY_PATH.
        for builtins in sorted(lib_dir.glob("libnvrtc-builtins.so.*")):
            ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
            break
        self.lib = ctypes.CDLL(str(lib_dir / "libnvrtc.so.12"))
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        # cuda_fp16.h and mma.h are in the runtime wheel; mma.h includes crt/mma.h,
        # which only the nvcc wheel ships.
        self.includes = [wheel_dir("nvidia.cuda_runtime") / "include",
                         wheel_dir("nvidia.cuda_nvcc") / "include"]

    def version(self) -> str:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "version")
        return f"{major.value}.{minor.value}"

    def _check(self, status: int, what: str):
        if status != 0:
            raise RuntimeError(f"NVRTC {what}: {self.lib.nvrtcGetErrorString(status).decode()}")

    def compile(self, source: Path, arch: str) -> tuple[bytes | None, str]:
        """PTX of `source` for compute_`arch` (None if it does not compile) and the log."""
        prog = ctypes.c_void_p()
        # The program is named by its file name only: nothing host-specific goes in.
        self._check(self.lib.nvrtcCreateProgram(ctypes.byref(prog), source.read_bytes(),
                                                source.name.encode(), 0, None, None),
                    "create")
        try:
            opts = COMMON_OPTIONS + [f"--gpu-architecture=compute_{arch}", f"-I{KERNELS}"]
            opts += [f"-I{d}" for d in self.includes]
            argv = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
            status = self.lib.nvrtcCompileProgram(prog, len(opts), argv)
            size = ctypes.c_size_t()
            self._check(self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "log size")
            log = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetProgramLog(prog, log), "log")
            log_text = log.value.decode(errors="replace").strip()
            if status != 0:
                return None, log_text
            self._check(self.lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "PTX size")
            ptx = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetPTX(prog, ptx), "PTX")
            return ptx.value, log_text  # .value stops at the terminating NUL
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


def ptxas_report(ptxas: Path, ptx: Path, arch: str) -> list[dict]:
    """Per-kernel resources from `ptxas -v` (the cubin itself is discarded)."""
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run([str(ptxas), "-v", f"-arch=sm_{arch}", str(ptx),
                              "-o", os.path.join(tmp, "out.cubin")],
                             capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"ptxas failed on {ptx.name}:\n{run.stdout}{run.stderr}")
    # ptxas -v prints, per entry:
    #   Compiling entry function 'NAME' for 'sm_80'
    #   Function properties for NAME
    #       S bytes stack frame, A bytes spill stores, B bytes spill loads
    #   Used R registers, used N barriers, M bytes smem, C bytes cmem[0]
    kernels, cur = [], None
    for line in (run.stdout + run.stderr).splitlines():
        if m := re.search(r"Compiling entry function '([^']+)'", line):
            cur = {"kernel": m.group(1), "arch": f"sm_{arch}", "regs": 0, "stack": 0,
                   "spill_st": 0, "spill_ld": 0, "smem": 0}
            kernels.append(cur)
        elif cur is None:
            continue
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                            r"(\d+) bytes spill loads", line):
            cur["stack"], cur["spill_st"], cur["spill_ld"] = map(int, m.groups())
        elif "Used" in line and "registers" in line:
            cur["regs"] = int(re.search(r"Used (\d+) registers", line).group(1))
            if m := re.search(r"(\d+) bytes smem", line):
                cur["smem"] = int(m.group(1))
    return kernels


def first_difference(old: bytes, new: bytes) -> str:
    """Where two PTX texts first differ, as a short unified-diff excerpt."""
    a = old.decode(errors="replace").splitlines()
    b = new.decode(errors="replace").splitlines()
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"line {i + 1}:\n  committed: {x}\n  generated: {y}"
    i = min(len(a), len(b))
    return (f"line {i + 1}: committed has {len(a)} lines, generated {len(b)}\n"
            + "\n".join(list(difflib.unified_diff(a, b, lineterm="", n=0))[:6]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare with the committed PTX instead of writing it")
    args = parser.parse_args()

    nvrtc = Nvrtc()
    ptxas = wheel_dir("nvidia.cuda_nvcc") / "bin/ptxas"
    sources = sorted(KERNELS.glob("*.cu"))
    if not sources:
        print(f"no .cu sources in {KERNELS}", file=sys.stderr)
        return 1
    print(f"NVRTC {nvrtc.version()}: {len(sources)} sources x {len(ARCHS)} architectures")

    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp) if args.check else PTX_DIR
        out_dir.mkdir(parents=True, exist_ok=True)
        produced = []
        for src in sources:
            for arch in ARCHS:
                name = f"{src.stem}.sm_{arch}.ptx"
                ptx, log = nvrtc.compile(src, arch)
                if ptx is None:
                    failures.append(f"{src.name} (compute_{arch}) does not compile:\n{log}")
                    continue
                if log:  # warnings: show them, they usually point at real problems
                    print(f"{src.name} (compute_{arch}):\n{log}")
                (out_dir / name).write_bytes(ptx)
                produced.append((name, arch))

        # Resource report and the no-spill rule for the hot kernels.
        rows = []
        for name, arch in produced:
            rows += ptxas_report(ptxas, out_dir / name, arch)
        rows.sort(key=lambda r: (r["kernel"], r["arch"]))
        print(f"{'kernel':<26} {'arch':<6} {'regs':>4} {'spill st':>8} {'spill ld':>8} "
              f"{'stack':>5} {'smem':>6}")
        for r in rows:
            hot = "*" if HOT.match(r["kernel"]) else " "
            print(f"{r['kernel']:<26} {r['arch']:<6} {r['regs']:>4} {r['spill_st']:>8} "
                  f"{r['spill_ld']:>8} {r['stack']:>5} {r['smem']:>6} {hot}")
            if HOT.match(r["kernel"]) and (r["spill_st"] or r["spill_ld"]):
                failures.append(f"{r['kernel']} ({r['arch']}) spills: {r['spill_st']} bytes "
                                f"stored, {r['spill_ld']} bytes loaded")
        print("(* hot set: must not spill)")
        total = sum((out_dir / n).stat().st_size for n, _ in produced)
        print(f"{len(produced)} PTX files, {total} bytes, {len(rows)} kernels")

        # Every PTX a source should have; anything else in ptx/ is stale.
        expected = {f"{src.stem}.sm_{arch}.ptx" for src in sources for arch in ARCHS}
        if args.check:
            for name, _ in produced:
                committed = PTX_DIR / name
                new = (out_dir / name).read_bytes()
                if not committed.exists():
                    failures.append(f"{committed.relative_to(ROOT)} is missing: run scripts/build-ptx")
                elif committed.read_bytes() != new:
                    failures.append(f"{committed.relative_to(ROOT)} differs from what its source "
                                    f"compiles to (run scripts/build-ptx), at "
                                    f"{first_difference(committed.read_bytes(), new)}")
            for stale in sorted(PTX_DIR.glob("*.ptx")):
                if stale.name not in expected:
                    failures.append(f"{stale.relative_to(ROOT)} has no source: delete it")
        else:
            for stale in sorted(PTX_DIR.glob("*.ptx")):
                if stale.name not in expected:
                    stale.unlink()
                    print(f"removed stale {stale.relative_to(ROOT)}")

    for f in failures:
        print(f"error: {f}", file=sys.stderr)
    if failures:
        return 1
    print("PTX up to date" if args.check else f"wrote {PTX_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
