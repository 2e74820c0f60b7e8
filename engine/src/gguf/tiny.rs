//! Small random models of every supported architecture (llama, qwen2, qwen3, gemma3),
//! for tests and the CUDA self-check (`sluice check cuda`).
//!
//! They live outside test code because the self-check runs from the release binary on
//! a GPU machine that has no Rust toolchain: it compares the CUDA forward pass with the
//! CPU's on these files. Their bytes are fixed (a seeded generator), and tests compare
//! against behaviour recorded on them, so changing anything here changes those tests.

use super::quant::{quantize::quantize_row, GgmlType};
use super::writer::{write, TensorData};
use super::MetaValue;

/// `n` pseudo-random floats uniform in `[-scale, scale)` from the LCG state `seed`
/// (advanced in place): a fixed generator, so the numbers (and the models made from
/// them) are the same on every machine and in every build.
pub fn rand_vec(n: usize, seed: &mut u64, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (((*seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0) * scale
        })
        .collect()
}

/// A `layers`-layer GGUF of `arch` with random weights in several quant types and the
/// architecture's own metadata and tensors: Qwen3 and Gemma 3 get a head size that is
/// not dim / heads, Q/K norms, and (Gemma 3) post norms and a sliding `window`.
pub fn tiny_model(arch: &str, skip: Option<&str>, layers: usize, window: Option<u32>) -> Vec<u8> {
    let (dim, ff, heads, kv_heads, vocab) = (256usize, 512usize, 4u32, 2u32, 48usize);
    let qk_norm = matches!(arch, "qwen3" | "gemma3");
    let gemma = arch == "gemma3";
    let hd = if qk_norm { 128 } else { dim / heads as usize };
    let (qd, kv) = (hd * heads as usize, hd * kv_heads as usize);
    let mut seed = 42u64;
    let mut meta = vec![
        (
            "general.architecture".to_string(),
            MetaValue::Str(arch.into()),
        ),
        (format!("{arch}.block_count"), MetaValue::U32(layers as u32)),
        (format!("{arch}.context_length"), MetaValue::U32(256)),
        (
            format!("{arch}.embedding_length"),
            MetaValue::U32(dim as u32),
        ),
        (
            format!("{arch}.feed_forward_length"),
            MetaValue::U32(ff as u32),
        ),
        (
            format!("{arch}.attention.head_count"),
            MetaValue::U32(heads),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            MetaValue::U32(kv_heads),
        ),
        (format!("{arch}.vocab_size"), MetaValue::U32(vocab as u32)),
    ];
    if qk_norm {
        for k in ["key_length", "value_length"] {
            meta.push((format!("{arch}.attention.{k}"), MetaValue::U32(hd as u32)));
        }
    }
    if let Some(w) = window {
        meta.push((
            format!("{arch}.attention.sliding_window"),
            MetaValue::U32(w),
        ));
    }
    let mut tensors = Vec::new();
    let mut mat = |name: String, cols: usize, rows: usize, ty: GgmlType, seed: &mut u64| {
        let w = rand_vec(cols * rows, seed, 0.3);
        let bytes = w
            .chunks_exact(cols)
            .flat_map(|r| quantize_row(ty, r))
            .collect();
        tensors.push(TensorData {
            name,
            dims: vec![cols as u64, rows as u64],
            ty,
            bytes,
        });
    };
    mat(
        "token_embd.weight".into(),
        dim,
        vocab,
        GgmlType::Q8_0,
        &mut seed,
    );
    let mut norm_names = vec!["output_norm.weight".to_string()];
    for l in 0..layers {
        let (ty, ty_small) = if l % 2 == 0 {
            (GgmlType::Q4_1, GgmlType::Q4_0)
        } else {
            (GgmlType::Q4K, GgmlType::F16)
        };
        mat(
            format!("blk.{l}.attn_q.weight"),
            dim,
            qd,
            ty_small,
            &mut seed,
        );
        mat(
            format!("blk.{l}.attn_k.weight"),
            dim,
            kv,
            ty_small,
            &mut seed,
        );
        mat(
            format!("blk.{l}.attn_v.weight"),
            dim,
            kv,
            GgmlType::Q8_0,
            &mut seed,
        );
        mat(
            format!("blk.{l}.attn_output.weight"),
            qd,
            dim,
            GgmlType::Q6K,
            &mut seed,
        );
        mat(format!("blk.{l}.ffn_gate.weight"), dim, ff, ty, &mut seed);
        mat(
            format!("blk.{l}.ffn_up.weight"),
            dim,
            ff,
            GgmlType::Q5K,
            &mut seed,
        );
        mat(format!("blk.{l}.ffn_down.weight"), ff, dim, ty, &mut seed);
        norm_names.push(format!("blk.{l}.attn_norm.weight"));
        norm_names.push(format!("blk.{l}.ffn_norm.weight"));
        if gemma {
            norm_names.push(format!("blk.{l}.post_attention_norm.weight"));
            norm_names.push(format!("blk.{l}.post_ffw_norm.weight"));
        }
    }
    let mut norms = Vec::new();
    let mut norm = |name: String, len: usize, seed: &mut u64| {
        let v: Vec<f32> = rand_vec(len, seed, 0.2).iter().map(|x| 1.0 + x).collect();
        norms.push(TensorData {
            name,
            dims: vec![len as u64],
            ty: GgmlType::F32,
            bytes: quantize_row(GgmlType::F32, &v),
        });
    };
    for name in norm_names {
        norm(name, dim, &mut seed);
    }
    if qk_norm {
        for l in 0..layers {
            norm(format!("blk.{l}.attn_q_norm.weight"), hd, &mut seed);
            norm(format!("blk.{l}.attn_k_norm.weight"), hd, &mut seed);
        }
    }
    tensors.extend(norms);
    tensors.retain(|t| Some(t.name.as_str()) != skip);
    write(&meta, &tensors)
}
