//! The model's vocabulary as llguidance sees it: a trie of every token's bytes.

use std::sync::Arc;

use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};

use crate::text::tokenizer::Tokenizer;

/// llguidance's view of `tok`. Control tokens (chat markers, BOS, EOS) are spelled with
/// llguidance's special-token marker, so that no text can produce them; the model's
/// end-of-generation tokens end the grammar.
pub(crate) fn tok_env(tok: &Tokenizer) -> TokEnv {
    let n = tok.vocab_size();
    let words: Vec<Vec<u8>> = (0..n as u32)
        .map(|id| {
            if tok.is_control(id) {
                let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                w.extend_from_slice(tok.decode(&[id], true).as_bytes());
                w
            } else {
                tok.token_bytes(id).to_vec()
            }
        })
        .collect();
    let ends: Vec<u32> = if tok.stop_tokens.is_empty() {
        tok.eos.into_iter().collect()
    } else {
        tok.stop_tokens.clone()
    };
    let info = TokRxInfo::new(n as u32, ends.first().copied().unwrap_or(0));
    let mut trie = TokTrie::from(&info, &words);
    if !ends.is_empty() {
        trie = trie.with_eos_tokens(&ends);
    }
    // Greedy tokenization by the trie, marked non-canonical: llguidance then never forces
    // tokens by tokenizing text itself, and only masks what the model draws.
    Arc::new(ApproximateTokEnv::new(trie))
}
