//! Chat templates: a model's Jinja template (Hugging Face's `chat_template`, GGUF's
//! `tokenizer.chat_template`) rendered with minijinja, as transformers' `apply_chat_template`
//! renders it.

use crate::{DataError, TextTokenizer};

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// A tokenizer's chat template, ready to render.
pub struct ChatTemplate<'a> {
    tokenizer: &'a TextTokenizer,
    source: &'a str,
}

impl<'a> ChatTemplate<'a> {
    /// The chat template of `tokenizer`'s settings.
    pub fn of(tokenizer: &'a TextTokenizer) -> Result<Self, DataError> {
        let source = tokenizer
            .settings()
            .and_then(|settings| settings.chat_template.as_deref())
            .ok_or_else(|| {
                DataError::Chat(
                    "the tokenizer has no chat template (`chat_template` in the \
                     tokenizer_config.json beside its tokenizer.json)"
                        .into(),
                )
            })?;
        Ok(Self { tokenizer, source })
    }

    /// The conversation as the model reads it; with `add_generation_prompt`, followed by the
    /// opening of the assistant's turn.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, DataError> {
        let mut environment = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut environment);
        environment
            .set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        environment.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        environment
            .add_template("chat", self.source)
            .map_err(|error| {
                DataError::Chat(format!("the chat template does not parse: {error:#}"))
            })?;
        let token = |id: Option<u32>| {
            id.and_then(|id| self.tokenizer.token(id))
                .unwrap_or_default()
        };
        environment
            .get_template("chat")
            .and_then(|template| {
                template.render(minijinja::context! {
                    messages => messages,
                    add_generation_prompt => add_generation_prompt,
                    bos_token => token(self.tokenizer.bos_token_id()),
                    eos_token => token(self.tokenizer.eos_token_id()),
                })
            })
            .map_err(|error| DataError::Chat(format!("rendering the chat template: {error:#}")))
    }

    /// The special token that closes a turn: the one the template writes right after an
    /// assistant's words (ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`).
    pub fn end_of_turn(&self) -> Result<Option<u32>, DataError> {
        const WORDS: &str = "distillery-end-of-turn-probe";
        let rendered = self.render(
            &[
                Message::new("user", "hello"),
                Message::new("assistant", WORDS),
            ],
            false,
        )?;
        let Some(at) = rendered.rfind(WORDS) else {
            return Ok(None);
        };
        let after = self.tokenizer.encode(&rendered[at + WORDS.len()..])?;
        Ok(after
            .first()
            .copied()
            .filter(|&id| self.tokenizer.is_special(id)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::chatml_tokenizer;

    #[test]
    fn chat_templates_render_as_transformers_does_and_name_their_end_of_turn() {
        let dir = tempfile::tempdir().unwrap();
        let tokenizer = chatml_tokenizer(dir.path());
        let template = ChatTemplate::of(&tokenizer).unwrap();
        let rendered = template
            .render(&[Message::new("user", " hello there ")], true)
            .unwrap();
        assert_eq!(
            rendered,
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"
        );
        let id = |token: &str| tokenizer.inner().token_to_id(token).unwrap();
        let (start, end) = (id("<|im_start|>"), id("<|im_end|>"));
        assert_eq!(template.end_of_turn().unwrap(), Some(end));
        assert_eq!(tokenizer.eos_token_id(), Some(end));
        let ids = tokenizer.encode(&rendered).unwrap();
        // Three turns open (system, user, assistant) as special tokens, two close.
        let count = |wanted: u32| ids.iter().filter(|&&token| token == wanted).count();
        assert_eq!((ids[0], count(start), count(end)), (start, 3, 2), "{ids:?}");
    }

    #[test]
    fn templates_that_fail_say_so() {
        let dir = tempfile::tempdir().unwrap();
        let tokenizer = chatml_tokenizer(dir.path());
        let mut config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        config["chat_template"] = "{{ raise_exception('roles must alternate') }}".into();
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        let tokenizer_again = TextTokenizer::load(&dir.path().join("tokenizer.json")).unwrap();
        let error = ChatTemplate::of(&tokenizer_again)
            .unwrap()
            .render(&[Message::new("user", "hi")], true)
            .unwrap_err()
            .to_string();
        assert!(error.contains("roles must alternate"), "{error}");
        std::fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
        let plain = TextTokenizer::load(&dir.path().join("tokenizer.json")).unwrap();
        assert!(ChatTemplate::of(&plain).is_err());
        drop(tokenizer);
    }
}
