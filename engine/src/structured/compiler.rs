//! One model's grammar compiler: llguidance's parser factory over its vocabulary.

use std::sync::{Arc, OnceLock};

use llguidance::{Matcher, ParserFactory};

use super::constraint::Constraint;
use super::format::{GrammarError, OutputFormat};
use super::tok_env::tok_env;
use crate::text::tokenizer::Tokenizer;

/// Compiles output formats into constraints for one model. The factory (a trie of the
/// vocabulary and its slices, some tens of ms to build) is built on first use, so
/// models that never see a structured request never pay for it.
pub struct GrammarCompiler {
    tokenizer: Arc<Tokenizer>,
    factory: OnceLock<Result<ParserFactory, String>>,
}

impl GrammarCompiler {
    /// A compiler for `tokenizer`'s vocabulary.
    pub fn new(tokenizer: Arc<Tokenizer>) -> Self {
        GrammarCompiler {
            tokenizer,
            factory: OnceLock::new(),
        }
    }

    fn factory(&self) -> Result<&ParserFactory, GrammarError> {
        self.factory
            .get_or_init(|| {
                let env = tok_env(&self.tokenizer);
                let mut f = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
                // Errors come back to the caller; nothing goes to stderr.
                f.quiet();
                Ok(f)
            })
            .as_ref()
            .map_err(|e| GrammarError(format!("structured output is unavailable: {e}")))
    }

    /// Compiles `format`; its cost grows with the grammar, bounded by llguidance's
    /// default limits (grammar size, lexer states, work per token). Call it off async
    /// workers.
    pub fn compile(&self, format: &OutputFormat) -> Result<Constraint, GrammarError> {
        let grammar = format.grammar()?;
        let parser = self
            .factory()?
            .create_parser(grammar)
            .map_err(|e| GrammarError(first_line(&e.to_string())))?;
        let mut matcher = Matcher::new(Ok(parser));
        // A grammar that admits no output at all is refused now rather than mid-stream.
        let first = matcher
            .compute_mask()
            .map_err(|e| GrammarError(first_line(&e.to_string())))?;
        if first.is_zero() {
            return Err(GrammarError("the grammar admits no output".into()));
        }
        Ok(Constraint::new(matcher, Some(first)))
    }
}

/// llguidance's errors may carry the parser state after the first line; the first line
/// says what is wrong.
fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or(s).trim().to_string()
}
