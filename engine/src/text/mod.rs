//! Text in and out of the model: the tokenizer, the incremental detokenizer that streams
//! whole characters, the chat template and stop strings. None of it depends on the
//! runtime that computes the model.

pub mod chat_template;
pub mod detokenizer;
pub mod stop;
pub mod tokenizer;
