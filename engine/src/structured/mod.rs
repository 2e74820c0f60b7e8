//! Structured outputs: output constrained to a JSON schema, a regular expression, a list
//! of choices or a Lark grammar, with llguidance (the constrained-decoding library that
//! llama.cpp and vLLM use).
//!
//! A request's [`OutputFormat`] is compiled once, at submission, by the model's
//! [`GrammarCompiler`] into a [`Constraint`]: a parser that, before each token is drawn,
//! gives the set of tokens that keep the output valid (the mask) and follows the tokens
//! drawn. The engine loop applies the mask in each row's sampling job, which the
//! runtime spreads over its worker threads with the other rows of the step.

mod compiler;
mod constraint;
mod format;
mod tok_env;

pub use compiler::GrammarCompiler;
pub use constraint::Constraint;
pub use format::{GrammarError, OutputFormat};
