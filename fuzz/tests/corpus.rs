//! Replays every committed fuzz input through its harness: the seed corpora under
//! `fuzz/corpus/<target>/` and the crashes found so far under `fuzz/regressions/<target>/`.
//! A harness that panics on any of them fails this test, naming the file.

use std::path::{Path, PathBuf};

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        files.extend(entries.filter_map(|e| e.ok()).map(|e| e.path()));
    }
    files.sort();
    files
}

fn replay(target: &str, harness: fn(&[u8]), at_least: usize) {
    let files = inputs(target);
    assert!(
        files.len() >= at_least,
        "{target}: expected at least {at_least} committed inputs, found {}",
        files.len()
    );
    for f in files {
        let data = std::fs::read(&f).unwrap();
        let r = std::panic::catch_unwind(|| harness(&data));
        assert!(r.is_ok(), "{target}: {} fails its harness", f.display());
    }
}

#[test]
fn openai_request_corpus() {
    replay("openai_request", sluice_fuzz::openai_request, 20);
}

#[test]
fn ws_message_corpus() {
    replay("ws_message", sluice_fuzz::ws_message, 8);
}

#[test]
fn chat_template_corpus() {
    replay("chat_template", sluice_fuzz::chat_template, 8);
}

#[test]
fn gguf_corpus() {
    replay("gguf", sluice_fuzz::gguf, 6);
}

/// Rewrites the GGUF seeds: a complete tiny model with a byte-level BPE tokenizer and
/// a chat template, and broken variants of it. Run with `--ignored` after changing it.
#[test]
#[ignore = "writes the committed GGUF seed corpus"]
fn write_gguf_seeds() {
    use sluice_engine::gguf::quant::quantize::quantize_row;
    use sluice_engine::gguf::quant::GgmlType;
    use sluice_engine::gguf::writer::{write, TensorData};
    use sluice_engine::gguf::MetaValue;

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/gguf");
    std::fs::create_dir_all(&dir).unwrap();
    // GPT-2's byte-to-symbol map, so every byte has a token.
    let mut symbols = Vec::new();
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut extra = 0;
    for b in 0..256u32 {
        let c = if printable(b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        symbols.push(char::from_u32(c).unwrap().to_string());
    }
    let mut tokens: Vec<MetaValue> = symbols.iter().cloned().map(MetaValue::Str).collect();
    tokens.push(MetaValue::Str("He".into()));
    tokens.push(MetaValue::Str("<|im_start|>".into()));
    tokens.push(MetaValue::Str("<|im_end|>".into()));
    let vocab = tokens.len();
    let mut types = vec![MetaValue::I32(1); vocab];
    types[vocab - 2] = MetaValue::I32(3);
    types[vocab - 1] = MetaValue::I32(3);
    let (dim, ff, heads, kv_heads) = (32usize, 64usize, 4u32, 2u32);
    let kv = dim / heads as usize * kv_heads as usize;
    let s = |v: &str| MetaValue::Str(v.into());
    let meta = vec![
        ("general.architecture".to_string(), s("llama")),
        ("llama.block_count".into(), MetaValue::U32(1)),
        ("llama.context_length".into(), MetaValue::U32(64)),
        ("llama.embedding_length".into(), MetaValue::U32(dim as u32)),
        (
            "llama.feed_forward_length".into(),
            MetaValue::U32(ff as u32),
        ),
        ("llama.attention.head_count".into(), MetaValue::U32(heads)),
        (
            "llama.attention.head_count_kv".into(),
            MetaValue::U32(kv_heads),
        ),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.tokens".into(), MetaValue::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), MetaValue::Array(types)),
        (
            "tokenizer.ggml.merges".into(),
            MetaValue::Array(vec![s("H e")]),
        ),
        (
            "tokenizer.ggml.bos_token_id".into(),
            MetaValue::U32(vocab as u32 - 2),
        ),
        (
            "tokenizer.ggml.eos_token_id".into(),
            MetaValue::U32(vocab as u32 - 1),
        ),
        (
            "tokenizer.chat_template".into(),
            s(sluice_fuzz::SMOLLM_TEMPLATE),
        ),
    ];
    let mut seed = 7u64;
    let mut rand = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.4
            })
            .collect()
    };
    let mut tensors = Vec::new();
    let mut mat = |name: &str, cols: usize, rows: usize, ty: GgmlType| {
        let w = rand(cols * rows);
        let bytes = w
            .chunks_exact(cols)
            .flat_map(|r| quantize_row(ty, r))
            .collect();
        tensors.push(TensorData {
            name: name.into(),
            dims: vec![cols as u64, rows as u64],
            ty,
            bytes,
        });
    };
    mat("token_embd.weight", dim, vocab, GgmlType::F32);
    mat("blk.0.attn_q.weight", dim, dim, GgmlType::Q8_0);
    mat("blk.0.attn_k.weight", dim, kv, GgmlType::Q4_1);
    mat("blk.0.attn_v.weight", dim, kv, GgmlType::F16);
    mat("blk.0.attn_output.weight", dim, dim, GgmlType::Q8_0);
    mat("blk.0.ffn_gate.weight", dim, ff, GgmlType::Q4_1);
    mat("blk.0.ffn_up.weight", dim, ff, GgmlType::Q8_0);
    mat("blk.0.ffn_down.weight", ff, dim, GgmlType::Q8_0);
    for name in [
        "blk.0.attn_norm.weight",
        "blk.0.ffn_norm.weight",
        "output_norm.weight",
    ] {
        tensors.push(TensorData {
            name: name.into(),
            dims: vec![dim as u64],
            ty: GgmlType::F32,
            bytes: quantize_row(GgmlType::F32, &vec![1.0; dim]),
        });
    }
    let whole = write(&meta, &tensors);
    let model = sluice_engine::backends::cpu::model::Model::from_gguf(
        std::sync::Arc::new(sluice_engine::gguf::GgufFile::from_bytes(whole.clone()).unwrap()),
        std::sync::Arc::new(sluice_engine::backends::cpu::thread_pool::ThreadPool::new(1).unwrap()),
    );
    assert!(
        model.is_ok(),
        "the complete seed must load: {:?}",
        model.err()
    );
    let put = |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes).unwrap();
    put("tiny-llama.gguf", &whole);
    put("truncated-half.gguf", &whole[..whole.len() / 2]);
    put("truncated-header.gguf", &whole[..20]);
    let mut lying = whole.clone();
    lying[8..16].copy_from_slice(&u64::MAX.to_le_bytes()); // tensor count
    put("lying-tensor-count.gguf", &lying);
    let mut lying = whole.clone();
    lying[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes()); // metadata count
    put("lying-metadata-count.gguf", &lying);
    let mut lying = whole.clone();
    lying[24..32].copy_from_slice(&(u64::MAX - 3).to_le_bytes()); // first key's length
    put("lying-string-length.gguf", &lying);
    // Dimensions that promise more data than the file holds.
    let mut big = tensors;
    big[0].dims = vec![dim as u64, 1 << 30];
    put("lying-dims.gguf", &write(&meta, &big));
    put("metadata-only.gguf", &write(&meta, &[]));
}
