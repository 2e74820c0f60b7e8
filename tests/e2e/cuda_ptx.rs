//! The CUDA backend's committed PTX (engine/src/backends/cuda/kernels/ptx) is what its
//! sources compile to, and provides every kernel the ABI lists. Runs without a GPU:
//! scripts/build-ptx compiles with NVRTC from PyPI (installed on first use) and checks
//! with ptxas that the hot kernels do not spill.

use std::path::{Path, PathBuf};
use std::process::Command;

const TYPES: [&str; 10] = [
    "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k", "f16", "f32",
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the sluice crate lives in the repository root")
        .to_path_buf()
}

fn kernels_dir() -> PathBuf {
    repo_root().join("engine/src/backends/cuda/kernels")
}

/// `scripts/build-ptx --check`: regenerates the PTX in a temporary folder and fails if
/// it differs from the committed files, if a kernel does not compile, or if a hot
/// kernel spills registers.
#[test]
fn committed_ptx_matches_the_kernel_sources() {
    let root = repo_root();
    let out = Command::new(root.join("scripts/build-ptx"))
        .arg("--check")
        .current_dir(&root)
        .output()
        .expect("running scripts/build-ptx");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        out.status.success(),
        "scripts/build-ptx --check failed ({}): {stderr}",
        out.status
    );
}

/// Kernel names ABI.md lists: the identifier before `(` in the backticked signature
/// opening each list item, with `<t>` expanded to every weight type.
fn abi_kernel_names(abi: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in abi.lines() {
        let Some(rest) = line.trim_start().strip_prefix("- `") else {
            continue;
        };
        let Some((name, _)) = rest.split_once('(') else {
            continue;
        };
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_<>".contains(c))
        {
            continue;
        }
        if name.contains("<t>") {
            names.extend(TYPES.iter().map(|t| name.replace("<t>", t)));
        } else {
            names.push(name.to_string());
        }
    }
    names
}

/// Every kernel of ABI.md is an entry point of the committed PTX, for both
/// architectures, so the Rust side's launches and the PTX cannot drift apart.
#[test]
fn every_abi_kernel_is_in_the_ptx() {
    let dir = kernels_dir();
    let abi = std::fs::read_to_string(dir.join("ABI.md")).expect("reading ABI.md");
    let names = abi_kernel_names(&abi);
    // 3 families x 10 types + rms_norm, add, add_bias, swiglu, geglu, softcap, rope,
    // kv_store, the two attention kernels and argmax: a parse that finds fewer is broken.
    assert!(names.len() >= 41, "parsed only {names:?} from ABI.md");
    for arch in ["sm_80", "sm_90"] {
        let mut ptx = String::new();
        for entry in std::fs::read_dir(dir.join("ptx")).expect("reading the ptx folder") {
            let path = entry.expect("ptx folder entry").path();
            if path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(&format!(".{arch}.ptx")))
            {
                ptx += &std::fs::read_to_string(&path).expect("reading PTX");
            }
        }
        let missing: Vec<&String> = names
            .iter()
            .filter(|n| !ptx.contains(&format!(".entry {n}(")))
            .collect();
        assert!(
            missing.is_empty(),
            "kernels in ABI.md without a .entry in the {arch} PTX: {missing:?}"
        );
    }
}

/// The kernels' logic, without a GPU: `kernels/emulator/kernels_test.cc` compiles the
/// CUDA sources for the host (one thread per CUDA thread, barriers for `__syncthreads`
/// and warp shuffles; see its shim/) and checks every kernel against plain references
/// (a port of quant.rs's dequantization, naive attention, RoPE and norms) at odd sizes.
/// It catches indexing and arithmetic bugs, not GPU-only ones (alignment faults, real
/// warp scheduling, speed): `sluice check cuda` on a GPU does those.
#[test]
fn every_kernel_matches_its_reference_under_host_emulation() {
    let emu = kernels_dir().join("emulator");
    let bin = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cuda-kernels-emulated");
    let built = Command::new("g++")
        .args(["-std=c++20", "-O1", "-w", "-I"])
        .arg(emu.join("shim"))
        .arg("-I")
        .arg(kernels_dir())
        .arg(emu.join("kernels_test.cc"))
        .arg("-o")
        .arg(&bin)
        .arg("-lpthread")
        .output()
        .expect("running g++ (the machine's C++ compiler)");
    assert!(
        built.status.success(),
        "the kernels do not compile for host emulation:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let out = Command::new(&bin)
        .output()
        .expect("running the emulated kernels");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let failed: Vec<&str> = stdout.lines().filter(|l| l.contains(" FAIL ")).collect();
    let checks = stdout.lines().filter(|l| l.contains(" ok (")).count();
    println!("{checks} kernel checks passed under emulation");
    assert!(
        out.status.success() && failed.is_empty() && stdout.contains("0 failures"),
        "emulated kernels differ from their references:\n{}\n{}",
        failed.join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(checks > 100, "too few checks ran:\n{stdout}");
}
