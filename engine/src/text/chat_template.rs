//! Chat templates: the model's own Jinja template (`tokenizer.chat_template`), rendered
//! in a sandbox.
//!
//! The template is text from a file we did not write, so rendering is bounded: minijinja
//! has no file or network access, a fuel limit stops runaway loops, and the output size
//! is capped.

use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

use crate::error::ModelError;

/// Gemma's turn format, for Gemma files that carry no template (the base Gemma 3 270M
/// GGUF has none): what llama.cpp's built-in `gemma` template (`--chat-template gemma`)
/// renders. Contents are trimmed, "assistant" is "model", system messages are joined and
/// put before the first user turn; BOS comes from the tokenizer, not the template.
pub const GEMMA_TEMPLATE: &str = "{%- set ns = namespace(system='') -%}\
{%- for message in messages -%}\
{%- if message['role'] == 'system' -%}\
{%- set ns.system = ns.system + (message['content'] | trim) -%}\
{%- else -%}\
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}\
{{- '<start_of_turn>' + role + '\n' -}}\
{%- if ns.system and role != 'model' -%}{{- ns.system + '\n\n' -}}{%- set ns.system = '' -%}{%- endif -%}\
{{- (message['content'] | trim) + '<end_of_turn>\n' -}}\
{%- endif -%}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}";

/// The template a model without `tokenizer.chat_template` gets, by architecture.
pub fn builtin_template(architecture: &str) -> Option<&'static str> {
    match architecture {
        "gemma" | "gemma2" | "gemma3" => Some(GEMMA_TEMPLATE),
        _ => None,
    }
}

/// Instruction budget for one render; generous for real templates, fatal for loops.
const FUEL: u64 = 5_000_000;
/// Largest rendered prompt we accept, in bytes.
pub const MAX_RENDERED_BYTES: usize = 4 << 20;

/// One chat message as the template sees it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

fn raise_exception(msg: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    /// Compiles `source`; `bos`/`eos` are the texts of those tokens.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self, ModelError> {
        let mut env = Environment::new();
        env.set_fuel(Some(FUEL));
        env.set_recursion_limit(64);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
        Ok(ChatTemplate {
            env,
            bos: bos.to_string(),
            eos: eos.to_string(),
        })
    }

    /// Renders the conversation into a prompt.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ModelError> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
        let ctx = context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos,
            eos_token => self.eos,
        };
        // minijinja can panic on some inputs (fuzzing found `''[::-1]` indexing out of
        // bounds in 2.24); a template is untrusted code, so a panic is a failed render,
        // not a failed request handler. Rendering only reads the compiled templates.
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| tmpl.render(ctx)))
            .map_err(|_| {
                ModelError::ChatTemplate("the chat template failed on this conversation".into())
            })?
            .map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
        if out.len() > MAX_RENDERED_BYTES {
            return Err(ModelError::ChatTemplate(format!(
                "rendered prompt exceeds {MAX_RENDERED_BYTES} bytes"
            )));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn renders_smollm_template_like_llama_cpp() {
        let t = ChatTemplate::new(SMOLLM, "<|im_start|>", "<|im_end|>").unwrap();
        // The exact prompt llama-server's /apply-template returned for this input.
        assert_eq!(
            t.render(&[msg("user", "Hi")], true).unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let with_system = t
            .render(&[msg("system", "Be brief."), msg("user", "Hi")], false)
            .unwrap();
        assert_eq!(
            with_system,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn renders_gemma_turns_like_llama_cpps_builtin_gemma_template() {
        let t = ChatTemplate::new(builtin_template("gemma3").unwrap(), "<bos>", "<eos>").unwrap();
        // llama.cpp's llm_chat_apply_template (LLM_CHAT_TEMPLATE_GEMMA) on the same input.
        assert_eq!(
            t.render(
                &[
                    msg("system", " Be brief. "),
                    msg("user", "  Hi\n"),
                    msg("assistant", "Hello!"),
                    msg("user", "Name a colour.")
                ],
                true
            )
            .unwrap(),
            "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n<start_of_turn>user\nName a colour.<end_of_turn>\n<start_of_turn>model\n"
        );
        assert_eq!(
            t.render(&[msg("user", "Hi")], false).unwrap(),
            "<start_of_turn>user\nHi<end_of_turn>\n"
        );
        assert!(builtin_template("llama").is_none());
    }

    #[test]
    fn hostile_templates_fail_cleanly() {
        let looping =
            ChatTemplate::new("{% for i in range(100000000) %}{{ i }}{% endfor %}", "", "")
                .unwrap();
        assert!(looping.render(&[], true).is_err());
        let huge = ChatTemplate::new(
            "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        assert!(huge.render(&[], true).is_err());
        let raising = ChatTemplate::new("{{ raise_exception('no system role') }}", "", "").unwrap();
        assert!(raising
            .render(&[], true)
            .unwrap_err()
            .to_string()
            .contains("no system role"));
        assert!(ChatTemplate::new("{% for %}", "", "").is_err());
        // Found by fuzzing: minijinja 2.24 panics reversing an empty string.
        let reverse = ChatTemplate::new("{{ messages[0]['content'][::-1] }}", "", "").unwrap();
        assert!(reverse.render(&[msg("user", "")], true).is_err());
        assert_eq!(reverse.render(&[msg("user", "ab")], true).unwrap(), "ba");
        let attr = ChatTemplate::new("{{ messages.__class__.__mro__ }}", "", "").unwrap();
        // Python internals are not reachable: the lookup is an error, not a leak.
        assert!(attr.render(&[], true).is_err());
    }
}
