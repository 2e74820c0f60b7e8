//! The ONNX Runtime backend end to end: `sluice model export-onnx` on the default model
//! (the exporter's own checks are `scripts/check_onnx_export.py`), the export served by
//! `sluice serve` beside the same GGUF on the CPU runtime, and the cross-runtime
//! consistency check: the same greedy text until a near-tie, the same outputs alone or
//! batched, streamed or whole, constrained or not.

use std::path::PathBuf;
use std::process::Command;

use futures_util::future::join_all;
use serde_json::{json, Value};

use crate::gateway::new_key;
use crate::support::{model_path, Server};

/// Exports the default model into a fresh folder under target/ named after `test`.
fn export(test: &str) -> PathBuf {
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!(
        "../target/onnx-export-{}-{test}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&out);
    let o = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["model", "export-onnx", "--model"])
        .arg(model_path())
        .arg("--out")
        .arg(&out)
        .output()
        .expect("sluice model export-onnx");
    assert!(
        o.status.success(),
        "export failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    for f in [
        "model.onnx",
        "model.onnx.data",
        "tokenizer.gguf",
        "manifest.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    // The exporter's own checks, in the venv the export made: ONNX Runtime's logits
    // against a numpy forward pass of the GGUF, and incremental decoding with past K/V
    // against one run over the whole sequence.
    let python = sluice_gateway::model_store::sluice_cache_dir()
        .expect("a cache folder")
        .join("onnx-export-venv/bin/python");
    let o = Command::new(python)
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/check_onnx_export.py"))
        .arg("--model")
        .arg(model_path())
        .arg("--onnx")
        .arg(&out)
        .output()
        .expect("scripts/check_onnx_export.py");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "the export's checks failed:\n{said}");
    println!("{said}");
    out
}

async fn chat(server: &Server, key: &str, model: &str, content: &str, extra: Value) -> Value {
    let mut body = json!({"model": model, "messages": [{"role": "user", "content": content}],
                          "max_tokens": 40, "temperature": 0});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let r = Server::client()
        .post(format!("{}/v1/chat/completions", server.base))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{v}");
    v
}

fn text(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

const PROMPTS: [&str; 6] = [
    "Name three colors.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain gravity in one sentence.",
    "Tell me a fun fact about cats.",
    "How do I boil an egg?",
];

/// Logprobs two runtimes may differ by and still be the same model: ONNX Runtime
/// computes in f32 from exactly dequantized weights, the CPU runtime rounds activations
/// to 8 bits before its quantized products (as llama.cpp does), which moves logprobs by
/// up to ~0.1 nats (measured 0.006-0.11 on the first token of these prompts).
const NEAR_TIE: f64 = 0.2;

#[tokio::test]
async fn an_export_serves_the_same_api_and_agrees_with_the_cpu_runtime() {
    let dir = export("serve");
    let (ops, ops_entry) = new_key("ops", "admin = true");
    let server = Server::with_config(
        &format!(
            "[[models]]\nname = \"onnx\"\npath = \"{}\"\n\n[[models]]\nname = \"cpu\"\npath = \"{{model}}\"\n\n{ops_entry}",
            dir.display()
        ),
        &[],
    );
    let admin = server.get_json("/admin/models", &ops).await;
    let backend = |name: &str| {
        admin["data"]
            .as_array()
            .and_then(|l| l.iter().find(|m| m["id"] == name))
            .map(|m| m["backend"].clone())
    };
    assert_eq!(backend("onnx"), Some(json!("onnx")), "{admin}");
    assert_eq!(backend("cpu"), Some(json!("cpu")), "{admin}");

    // Same greedy text until the runtimes part at a near-tie.
    let lp = json!({"logprobs": true, "top_logprobs": 5});
    let mut report = Vec::new();
    let mut whole = 0;
    for p in PROMPTS {
        let (a, b) = (
            chat(&server, &ops, "onnx", p, lp.clone()).await,
            chat(&server, &ops, "cpu", p, lp.clone()).await,
        );
        let la = a["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap()
            .clone();
        let lb = b["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap()
            .clone();
        let first_gap =
            (la[0]["logprob"].as_f64().unwrap() - lb[0]["logprob"].as_f64().unwrap()).abs();
        let split = la
            .iter()
            .zip(&lb)
            .position(|(x, y)| x["token"] != y["token"]);
        match split {
            None => {
                whole += 1;
                report.push(format!("{p:?}: same {} tokens", la.len().min(lb.len())));
            }
            Some(i) => {
                // ONNX's own logprob of the token the CPU runtime chose there.
                let other = la[i]["top_logprobs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|t| t["token"] == lb[i]["token"])
                    .and_then(|t| t["logprob"].as_f64());
                let gap = other.map(|o| la[i]["logprob"].as_f64().unwrap() - o);
                report.push(format!(
                    "{p:?}: same {i} tokens, then onnx {:?} vs cpu {:?}, {} nats apart in onnx's logprobs",
                    la[i]["token"].as_str().unwrap_or_default(),
                    lb[i]["token"].as_str().unwrap_or_default(),
                    gap.map_or("more than its top 5".into(), |g| format!("{g:.3}"))
                ));
                assert!(
                    gap.is_some_and(|g| g <= NEAR_TIE),
                    "not a near-tie:\n{}",
                    report.join("\n")
                );
            }
        }
        assert!(
            first_gap <= NEAR_TIE,
            "{p:?}: first token's logprob {first_gap} apart"
        );
    }
    println!(
        "onnx vs cpu ({whole} of {} whole):\n  {}",
        PROMPTS.len(),
        report.join("\n  ")
    );

    // The same outputs alone or batched, streamed or whole.
    // Decodes of several sequences run as one ONNX Runtime batch (pasts padded to the
    // longest): logits move by float rounding only (~1e-4), so the texts are the same
    // unless a step is a near-exact tie.
    let lp = json!({"logprobs": true, "top_logprobs": 2});
    let mut alone = Vec::new();
    for p in PROMPTS {
        alone.push(chat(&server, &ops, "onnx", p, lp.clone()).await);
    }
    let batched: Vec<Value> = join_all(
        PROMPTS
            .iter()
            .map(|p| chat(&server, &ops, "onnx", p, lp.clone())),
    )
    .await;
    for (a, b) in alone.iter().zip(&batched) {
        let la = a["choices"][0]["logprobs"]["content"].as_array().unwrap();
        let lb = b["choices"][0]["logprobs"]["content"].as_array().unwrap();
        if let Some(i) = la
            .iter()
            .zip(lb)
            .position(|(x, y)| x["token"] != y["token"])
        {
            let tops = la[i]["top_logprobs"].as_array().unwrap();
            let gap = tops[0]["logprob"].as_f64().unwrap() - tops[1]["logprob"].as_f64().unwrap();
            assert!(
                gap < 0.01,
                "batched parted from alone at token {i}, {gap} nats from a tie"
            );
        }
    }
    let alone: Vec<String> = alone.iter().map(text).collect();
    let sse = Server::client()
        .post(format!("{}/v1/chat/completions", server.base))
        .bearer_auth(&ops)
        .json(
            &json!({"model": "onnx", "messages": [{"role": "user", "content": PROMPTS[0]}],
                      "max_tokens": 40, "temperature": 0, "stream": true}),
        )
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let streamed: String = sse
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| {
            let v: Value = serde_json::from_str(d).unwrap();
            v["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(streamed, alone[0]);

    // Structured output works the same on it (the mask is applied on the host).
    let v = chat(
        &server,
        &ops,
        "onnx",
        "Pick a color.",
        json!({"structured_outputs": {"choice": ["red", "green", "blue"]}}),
    )
    .await;
    assert!(["red", "green", "blue"].contains(&text(&v).as_str()), "{v}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--numerics f32`: the native engine keeps activations in f32, reports it, and its
/// greedy chats are the export's on ONNX Runtime, token for token; a `[[models]]` entry
/// may keep the int8 arithmetic for the same file under another name.
#[tokio::test]
async fn with_f32_numerics_the_cpu_runtime_gives_the_exports_greedy_text() {
    let dir = export("f32");
    let (ops, ops_entry) = new_key("ops", "admin = true");
    let server = Server::with_config(
        &format!(
            "[[models]]\nname = \"onnx\"\npath = \"{}\"\n\n[[models]]\nname = \"cpu\"\npath = \"{{model}}\"\n\n[[models]]\nname = \"cpu-int8\"\npath = \"{{model}}\"\nnumerics = \"int8\"\n\n{ops_entry}",
            dir.display()
        ),
        &["--numerics", "f32"],
    );
    let admin = server.get_json("/admin/models", &ops).await;
    let device = |name: &str| {
        admin["data"]
            .as_array()
            .and_then(|l| l.iter().find(|m| m["id"] == name))
            .and_then(|m| m["device"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    assert!(device("cpu").ends_with("(f32 numerics)"), "{admin}");
    assert!(
        !device("cpu-int8").is_empty() && !device("cpu-int8").contains("numerics"),
        "{admin}"
    );
    let mut same = 0;
    let mut report = Vec::new();
    for p in PROMPTS {
        let (a, b) = (
            text(&chat(&server, &ops, "onnx", p, json!({})).await),
            text(&chat(&server, &ops, "cpu", p, json!({})).await),
        );
        if a == b {
            same += 1;
        } else {
            report.push(format!("{p:?}: onnx {a:?} vs cpu {b:?}"));
        }
    }
    // Measured here: 6 of 6 (and 8 of 8 prompts over 64 tokens in the check below).
    assert!(
        same >= PROMPTS.len() - 1,
        "{same} of {} the same:\n{}",
        PROMPTS.len(),
        report.join("\n")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `sluice check consistency ARGS` and returns its JSON report.
fn check(args: &[&str]) -> Value {
    let json = std::env::temp_dir().join(format!(
        "sluice-consistency-{}-{}.json",
        std::process::id(),
        args.join("_").replace('/', "_")
    ));
    let o = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["check", "consistency", "--model"])
        .arg(model_path())
        .args(args)
        .arg("--json")
        .arg(&json)
        .output()
        .expect("sluice check consistency");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    println!("{said}");
    assert!(o.status.success(), "the check failed:\n{said}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("the JSON report")).unwrap();
    let _ = std::fs::remove_file(&json);
    report
}

#[test]
fn the_consistency_check_runs_alone_vs_batched_simd_vs_scalar_and_gguf_vs_onnx() {
    // The same model alone or inside a batch of 16 others: identical, bit for bit.
    let r = check(&["--against", "batched", "--steps", "32"]);
    assert_eq!(r["identical"], 8, "{r}");
    assert_eq!(r["max_abs_logprob_diff"], 0.0, "{r}");
    // SIMD kernels vs the scalar ones, and the native engine vs its ONNX export: the
    // same text until a near-tie. The tolerance is above the 0.15 nats the ONNX issue
    // targets: on an AVX-512 CPU one of the eight prompts parts at 0.229 nats in the
    // SIMD kernels' logprobs, where the scalar kernels and ONNX Runtime (f32) agree with
    // each other (`sluice check consistency` prints every divergence).
    let r = check(&[
        "--against",
        "scalar",
        "--steps",
        "16",
        "--tolerance",
        "0.25",
    ]);
    assert!(r["identical"].as_u64().unwrap() >= 1, "{r}");
    let dir = export("check");
    let r = check(&[
        "--against",
        dir.to_str().unwrap(),
        "--steps",
        "64",
        "--tolerance",
        "0.25",
    ]);
    assert!(r["identical"].as_u64().unwrap() >= 1, "{r}");
    // With f32 activations (`--numerics f32`) those differences stay in the last bits
    // instead of crossing 8-bit rounding boundaries: SIMD and scalar kernels, and the
    // native engine and ONNX Runtime, give the same 64 tokens on (at least) 7 of the 8
    // prompts, and any divergence is a near-tie under the default 0.15 nats (the check
    // exits 1 otherwise). Measured here: 8 of 8 both ways, max |Δ logprob| 0.014 and 0.024.
    for against in ["scalar", dir.to_str().unwrap()] {
        let r = check(&["--against", against, "--steps", "64", "--numerics", "f32"]);
        assert_eq!(r["numerics"], "f32", "{r}");
        assert!(r["identical"].as_u64().unwrap() >= 7, "{r}");
        assert!(r["max_gap_nats"].as_f64().unwrap() <= 0.15, "{r}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
