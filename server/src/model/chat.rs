//! Chat templates: the model's own Jinja template, rendered with minijinja.

use anyhow::{Result, anyhow, bail};
use minijinja::{Environment, ErrorKind, context};
use serde::Serialize;

/// ChatML, used when a model ships no template of its own.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self { role: role.to_string(), content: content.into() }
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

fn raise_exception(msg: String) -> Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    /// Compiles `source` (or ChatML when `None`).
    pub fn new(source: Option<String>, bos: Option<&str>, eos: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", source.unwrap_or_else(|| CHATML.to_string()))
            .map_err(|e| anyhow!("invalid chat template: {e}"))?;
        Ok(Self { env, bos: bos.unwrap_or_default().to_string(), eos: eos.unwrap_or_default().to_string() })
    }

    /// Renders a conversation, ending with the header of the assistant's turn.
    pub fn render(&self, messages: &[Message]) -> Result<String> {
        if messages.is_empty() {
            bail!("a conversation needs at least one message");
        }
        for (i, m) in messages.iter().enumerate() {
            if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
                bail!("message {i} has role `{}`; expected system, user or assistant", m.role);
            }
        }
        let tmpl = self.env.get_template("chat").map_err(|e| anyhow!("{e}"))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|e| anyhow!("rendering chat template: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_fallback_ends_with_assistant_header() {
        let t = ChatTemplate::new(None, None, None).unwrap();
        let s = t.render(&[Message::new("user", "hi")]).unwrap();
        assert_eq!(s, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn unknown_roles_and_empty_conversations_are_rejected() {
        let t = ChatTemplate::new(None, None, None).unwrap();
        assert!(t.render(&[]).is_err());
        let err = t.render(&[Message::new("wizard", "x")]).unwrap_err().to_string();
        assert!(err.contains("wizard"), "{err}");
    }

    #[test]
    fn raise_exception_surfaces_as_an_error() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}ok";
        let t = ChatTemplate::new(Some(src.into()), None, None).unwrap();
        assert!(t.render(&[Message::new("user", "a")]).unwrap().ends_with("ok"));
        let err = t.render(&[Message::new("system", "a")]).unwrap_err().to_string();
        assert!(err.contains("user first"), "{err}");
    }
}
