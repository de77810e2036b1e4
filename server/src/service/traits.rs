//! ListTraits and DraftTrait, and the conversions between trait definitions and protobuf.

use super::AppState;
use crate::error::{ServiceError, ServiceResult, invalid};
use crate::traits::{self, Instruction, TraitDef};
use persona_proto::v1 as pb;

pub fn to_pb(t: &TraitDef) -> pb::TraitDefinition {
    pb::TraitDefinition {
        trait_name: t.name.clone(),
        description: t.description.clone(),
        instruction: t
            .instruction
            .iter()
            .map(|p| pb::InstructionPair { pos: p.pos.clone(), neg: p.neg.clone() })
            .collect(),
        questions: t.questions.clone(),
        eval_questions: t.eval_questions.clone(),
        eval_prompt: t.eval_prompt.clone(),
    }
}

/// A definition sent with a request, checked like a library file.
pub fn from_pb(t: &pb::TraitDefinition) -> ServiceResult<TraitDef> {
    let def = TraitDef {
        name: t.trait_name.trim().to_string(),
        description: t.description.clone(),
        instruction: t.instruction.iter().map(|p| Instruction { pos: p.pos.clone(), neg: p.neg.clone() }).collect(),
        questions: t.questions.clone(),
        eval_questions: t.eval_questions.clone(),
        eval_prompt: t.eval_prompt.clone(),
    };
    def.validate().map_err(|e| invalid(e.to_string()))?;
    Ok(def)
}

pub fn list(state: &AppState) -> pb::ListTraitsResponse {
    pb::ListTraitsResponse { traits: state.traits.all().map(to_pb).collect() }
}

pub async fn draft(state: &AppState, req: pb::DraftTraitRequest) -> ServiceResult<pb::DraftTraitResponse> {
    let name = req.trait_name.trim();
    let description = req.description.trim();
    if description.is_empty() {
        return Err(invalid("description is required: say in a sentence what the trait looks like"));
    }
    let (def, generator) = if req.use_llm {
        let judge = state.judge.as_ref().ok_or_else(|| {
            ServiceError::FailedPrecondition("use_llm needs a judge endpoint: set [judge] url in the settings".into())
        })?;
        let reply = judge
            .chat(traits::llm_draft_prompt(name, description), 4096)
            .await
            .map_err(|e| ServiceError::Unavailable(e.to_string()))?;
        let def = traits::draft_from_llm_reply(name, description, &reply)
            .map_err(|e| ServiceError::Unavailable(format!("judge model `{}`: {e}", judge.model())))?;
        (def, format!("llm:{}", judge.model()))
    } else {
        (traits::draft_from_template(name, description), "template".to_string())
    };
    def.validate().map_err(|e| invalid(e.to_string()))?;
    Ok(pb::DraftTraitResponse { definition: Some(to_pb(&def)), generator })
}
