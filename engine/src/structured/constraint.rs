//! One request's constraint: the allowed-token mask before each draw, and the parser
//! following what was drawn.

use llguidance::toktrie::SimpleVob;
use llguidance::Matcher;

/// A compiled output format following one request's output. Cloning gives an
/// independent copy (each choice of an `n > 1` request follows its own output).
pub struct Constraint {
    /// Boxed: the parser state is large, and requests move through channels.
    matcher: Box<Matcher>,
    /// The mask for the next draw, when already computed.
    next_mask: Option<SimpleVob>,
}

impl Clone for Constraint {
    fn clone(&self) -> Self {
        Constraint {
            matcher: Box::new(self.matcher.deep_clone()),
            next_mask: self.next_mask.clone(),
        }
    }
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

impl Constraint {
    pub(crate) fn new(matcher: Matcher, next_mask: Option<SimpleVob>) -> Self {
        Constraint {
            matcher: Box::new(matcher),
            next_mask,
        }
    }

    /// Writes `logits` with every token the format does not allow next set to -inf
    /// into `out`. Fails when the parser is in an error state.
    pub fn mask(&mut self, logits: &[f32], out: &mut Vec<f32>) -> Result<(), String> {
        let mask = match self.next_mask.take() {
            Some(m) => m,
            None => self.matcher.compute_mask().map_err(|e| e.to_string())?,
        };
        out.clear();
        out.resize(logits.len(), f32::NEG_INFINITY);
        for (w, &bits) in mask.as_slice().iter().enumerate() {
            let base = w * 32;
            if bits == 0 || base >= logits.len() {
                continue;
            }
            let end = (base + 32).min(logits.len());
            if bits == u32::MAX {
                out[base..end].copy_from_slice(&logits[base..end]);
                continue;
            }
            let mut b = bits;
            while b != 0 {
                let i = base + b.trailing_zeros() as usize;
                if i < end {
                    out[i] = logits[i];
                }
                b &= b - 1;
            }
        }
        Ok(())
    }

    /// Follows token `id`, drawn under the last mask.
    pub fn advance(&mut self, id: u32) -> Result<(), String> {
        self.next_mask = None;
        self.matcher.consume_token(id).map_err(|e| e.to_string())
    }

    /// Whether the output is complete and the format allows nothing more: generation
    /// ends here, as if an end token were drawn.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::{json, Value};

    use super::super::{GrammarCompiler, OutputFormat};
    use crate::text::tokenizer::test_vocab::gemma_like;
    use crate::text::tokenizer::Tokenizer;

    fn compiler() -> (GrammarCompiler, Arc<Tokenizer>) {
        let tok = Arc::new(Tokenizer::load(&gemma_like(&[]), None).unwrap());
        (GrammarCompiler::new(tok.clone()), tok)
    }

    /// Decodes under `format` with pseudo-random logits (a different "model" per seed),
    /// taking the likeliest allowed token each step: the text, and whether it ended on
    /// its own (an end token, or the format complete).
    fn decode(format: &OutputFormat, seed: u64) -> (String, bool) {
        let (c, tok) = compiler();
        let mut constraint = c.compile(format).unwrap();
        let n = tok.vocab_size();
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut masked = Vec::new();
        let mut out = Vec::new();
        for _ in 0..200 {
            let logits: Vec<f32> = (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state % 1000) as f32 / 100.0
                })
                .collect();
            constraint.mask(&logits, &mut masked).unwrap();
            let id = (0..n)
                .max_by(|&a, &b| masked[a].total_cmp(&masked[b]))
                .unwrap() as u32;
            assert!(masked[id as usize].is_finite(), "nothing allowed");
            if tok.stop_tokens.contains(&id) {
                return (String::from_utf8(out).unwrap(), true);
            }
            out.extend_from_slice(tok.token_bytes(id));
            constraint.advance(id).unwrap();
            if constraint.is_finished() {
                return (String::from_utf8(out).unwrap(), true);
            }
        }
        (String::from_utf8(out).unwrap(), false)
    }

    #[test]
    fn outputs_follow_choices_regexes_and_schemas_whatever_the_logits() {
        let choices = OutputFormat::Choice(vec!["hi".into(), "user".into(), "é!".into()]);
        let schema = OutputFormat::JsonSchema(json!({
            "type": "object",
            "properties": {"ok": {"type": "boolean"}, "tag": {"enum": ["a", "bb"]}},
            "required": ["ok", "tag"], "additionalProperties": false,
        }));
        let regex = OutputFormat::Regex("h[iu]{2,3}r".into());
        let lark = OutputFormat::Lark("start: \"<\" WORD \">\"\nWORD: /[a-z]{1,3}/".into());
        for seed in 0..12 {
            let (text, ended) = decode(&choices, seed);
            assert!(
                ended && ["hi", "user", "é!"].contains(&text.as_str()),
                "{text:?}"
            );

            let (text, ended) = decode(&schema, seed);
            assert!(ended, "{text:?}");
            let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
            assert!(v["ok"].is_boolean() && ["a", "bb"].contains(&v["tag"].as_str().unwrap()));
            assert_eq!(v.as_object().unwrap().len(), 2, "{text}");
            assert!(!text.contains(' '), "compact JSON: {text:?}");

            let (text, ended) = decode(&regex, seed);
            let ok = text.len() >= 4
                && text.starts_with('h')
                && text.ends_with('r')
                && text[1..text.len() - 1]
                    .chars()
                    .all(|c| c == 'i' || c == 'u');
            assert!(ended && ok, "{text:?}");

            let (text, ended) = decode(&lark, seed);
            let inner = text.strip_prefix('<').and_then(|t| t.strip_suffix('>'));
            assert!(
                ended && inner.is_some_and(|w| (1..=3).contains(&w.len())),
                "{text:?}"
            );
        }
        // Any object: random logits may not close it within 200 steps, but what there is
        // opens an object, and a closed one parses.
        for seed in 0..4 {
            let (text, ended) = decode(&OutputFormat::JsonObject, seed);
            assert!(text.starts_with('{'), "{text:?}");
            if ended {
                let v: Value = serde_json::from_str(&text).unwrap();
                assert!(v.is_object(), "{text}");
            }
        }
    }

    #[test]
    fn clones_follow_their_own_output() {
        let (c, tok) = compiler();
        let mut a = c
            .compile(&OutputFormat::Choice(vec!["hi".into(), "user".into()]))
            .unwrap();
        let b = a.clone();
        let h = tok.encode("h", false).unwrap()[0];
        a.advance(h).unwrap();
        let mut masked = Vec::new();
        let mut b = b;
        let logits = vec![0.0; tok.vocab_size()];
        b.mask(&logits, &mut masked).unwrap();
        let u = tok.encode("u", false).unwrap()[0];
        assert!(
            masked[u as usize].is_finite(),
            "the clone still allows `user`"
        );
        a.mask(&logits, &mut masked).unwrap();
        assert!(
            !masked[u as usize].is_finite(),
            "after `h`, `u` is not allowed"
        );
    }

    #[test]
    fn bad_formats_are_refused_with_the_problem_named() {
        let (c, _) = compiler();
        for (format, says) in [
            (OutputFormat::Regex("a(".into()), "regex"),
            (OutputFormat::Lark("root ::= \"a\"".into()), "GBNF"),
            (
                OutputFormat::Lark("start: nothing_defined".into()),
                "nothing_defined",
            ),
            (
                OutputFormat::JsonSchema(json!({"type": "no-such-type"})),
                "no-such-type",
            ),
            (OutputFormat::JsonSchema(json!("string")), "object"),
            (OutputFormat::Choice(vec![]), "at least one"),
        ] {
            let e = c.compile(&format).unwrap_err().to_string();
            assert!(
                e.to_lowercase().contains(&says.to_lowercase()),
                "{format:?}: {e}"
            );
        }
    }
}
