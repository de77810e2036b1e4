//! How a model *reads* a question and an answer someone else wrote: reading-mode extraction
//! (a base model does not role-play a system prompt, so its vectors come from reading trait and
//! helpful answers teacher-forced) and the shared texts of a transfer fit.

use super::resolve;
use crate::error::{ServiceError, ServiceResult};
use crate::model::LoadedModel;
use crate::model::chat::Message;
use persona_proto::v1 as pb;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFormat {
    /// The question as the user turn of the model's chat template, the answer as the reply.
    Chat,
    /// `Question: …\nAnswer: …` as a document.
    Plain,
}

impl ReadFormat {
    /// `AUTO` reads as chat where the model's file ships a chat template (an instruction-tuned
    /// model), as plain text otherwise (a base model).
    pub fn resolve(f: pb::ReadingFormat, model: &LoadedModel) -> Self {
        match f {
            pb::ReadingFormat::Chat => Self::Chat,
            pb::ReadingFormat::Plain => Self::Plain,
            pb::ReadingFormat::Auto if model.native_template => Self::Chat,
            pb::ReadingFormat::Auto => Self::Plain,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Chat => "chat turns",
            Self::Plain => "plain text",
        }
    }

    /// The question's tokens (what comes before the answer) and the answer's.
    pub fn tokens(self, model: &LoadedModel, question: &str, answer: &str) -> ServiceResult<(Vec<u32>, Vec<u32>)> {
        let internal = |e: anyhow::Error| ServiceError::Internal(e.to_string());
        let prompt = match self {
            Self::Chat => resolve::tokenize(model, &resolve::render_chat(model, &[Message::new("user", question)])?)?,
            Self::Plain => {
                model.tokenizer.encode_document(&format!("Question: {}\nAnswer:", question.trim())).map_err(internal)?
            }
        };
        let answer = answer.trim();
        let answer = match self {
            Self::Chat => model.tokenizer.encode(answer).map_err(internal)?,
            Self::Plain if answer.is_empty() => Vec::new(),
            Self::Plain => model.tokenizer.encode(&format!(" {answer}")).map_err(internal)?,
        };
        Ok((prompt, answer))
    }
}
