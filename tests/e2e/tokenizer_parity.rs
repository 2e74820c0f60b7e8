//! Tokenizer parity with llama.cpp on two vocabularies: Gemma 3 270M (SentencePiece, 262k
//! pieces) and SmolLM2 (byte-level BPE), against the ids llama-server's `/tokenize`
//! returned for the same hard strings (tests/fixtures/llama_cpp_gemma3_tokens.json,
//! recorded by scripts/record-tokenizer-fixtures.py). Also: decoding gives the text back,
//! and Gemma's end-of-turn ends generation.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::Value;
use sluice_engine::gguf::GgufFile;
use sluice_engine::text::tokenizer::Tokenizer;

use crate::support::{gemma_model_path, model_path};

/// Writes past libtest's capture, so the suite's output shows the pass counts.
fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn fixture() -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/llama_cpp_gemma3_tokens.json");
    serde_json::from_str(&std::fs::read_to_string(&p).expect("tokenizer fixture file"))
        .expect("fixture JSON")
}

fn load(path: &Path) -> Tokenizer {
    let file = GgufFile::open(path).expect("the GGUF opens");
    Tokenizer::load(&file, Some(path)).expect("the tokenizer loads")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("an id array")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

/// Compares every recorded string; returns how many matched, after reporting each miss.
fn check(name: &str, tok: &Tokenizer) -> (usize, usize) {
    let f = fixture();
    let cases = f["models"][name]["tokenize"]
        .as_array()
        .unwrap_or_else(|| panic!("no cases for {name} in the fixture"));
    let mut same = 0;
    for c in cases {
        let text = c["text"].as_str().expect("text");
        let want = ids(&c["ids"]);
        let got = tok.encode(text, false).expect("encodes");
        if got == want {
            same += 1;
        } else {
            report(&format!(
                "tokenizer parity {name}: {text:?}\n  ours      {got:?}\n  llama.cpp {want:?}"
            ));
        }
        assert_eq!(
            tok.decode(&got, true),
            text,
            "{name}: decode(encode(s)) != s"
        );
    }
    report(&format!(
        "tokenizer parity {name}: {same}/{} strings give llama.cpp's ids ({})",
        cases.len(),
        f["llama_cpp"].as_str().unwrap_or("llama.cpp")
    ));
    (same, cases.len())
}

#[test]
fn gemma3_tokenizes_as_llama_cpp() {
    let tok = load(&gemma_model_path());
    let (same, total) = check("gemma-3-270m", &tok);
    assert!(total >= 12, "the fixture holds {total} strings");
    assert_eq!(same, total, "Gemma 3 ids differ from llama.cpp's");
    assert_eq!((tok.bos, tok.eos, tok.add_bos), (Some(2), Some(1), true));
    // llama.cpp's EOG set for this file (llama-tokenize -v: "printing all EOG tokens"):
    // <eos>, <end_of_turn>, and </s>, which it finds by its text.
    assert_eq!(tok.stop_tokens, vec![1, 106, 212]);
    assert_eq!(
        tok.encode("<start_of_turn>user\nhi<end_of_turn>", false)
            .unwrap()[..2],
        [105, 2364],
        "<start_of_turn> is one token, then `user`"
    );
}

#[test]
fn smollm2_tokenizes_as_llama_cpp() {
    let tok = load(&model_path());
    let (same, total) = check("smollm2-135m", &tok);
    assert_eq!(same, total, "SmolLM2 ids differ from llama.cpp's");
    // llama.cpp's EOG set: <|endoftext|>, <|im_end|>, and <reponame> (a FIM repo marker).
    assert_eq!(tok.stop_tokens, vec![0, 2, 4]);
}

#[test]
fn gemma3_tokenizes_100_kb_quickly() {
    let tok = load(&gemma_model_path());
    let f = fixture();
    let cases = f["models"]["gemma-3-270m"]["tokenize"].as_array().unwrap();
    let mut text = String::new();
    while text.len() < 100_000 {
        for c in cases {
            text.push_str(c["text"].as_str().unwrap());
            text.push(' ');
        }
    }
    let t = Instant::now();
    let ids = tok.encode(&text, false).unwrap();
    let secs = t.elapsed().as_secs_f64();
    report(&format!(
        "tokenizer speed gemma-3-270m: {} bytes → {} tokens in {:.1} ms ({:.0} tokens/s, one thread)",
        text.len(),
        ids.len(),
        secs * 1e3,
        ids.len() as f64 / secs
    ));
    assert_eq!(tok.decode(&ids, true), text);
    // Generous: a debug build of the merge loop does this in well under a second.
    assert!(secs < 5.0, "tokenizing 100 KB took {secs:.2} s");
}
