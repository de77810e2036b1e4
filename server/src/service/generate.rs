//! Generate: validate, queue on the model's engine, stream token deltas.

use super::{AppState, ResponseStream, resolve};
use crate::error::ServiceResult;
use crate::scheduler::{FinishReason, GenEvent, GenerateJob};
use persona_proto::v1 as pb;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Status;

pub fn generate(
    state: &AppState,
    req: pb::GenerateRequest,
    deadline: Option<std::time::Instant>,
) -> ServiceResult<ResponseStream<pb::GenerateResponse>> {
    let engine = state.engine(&req.model)?;
    let model = engine.model();
    let prompt = resolve::prompt_tokens(model, req.prompt.as_ref())?;
    let sampling = resolve::sampling(req.sampling.as_ref(), resolve::DEFAULT_MAX_TOKENS)?;
    let steering = resolve::steering(&state.store, model, &req.steering)?;
    let model_id = model.id.clone();
    tracing::debug!(model = %model_id, prompt_tokens = prompt.len(), steered = !steering.is_empty(), "generate");
    let rx = engine.generate(GenerateJob {
        prompt,
        max_tokens: sampling.max_tokens,
        sampling: sampling.config,
        stop: sampling.stop,
        steering,
        deadline,
    })?;
    // Dropping this stream (client gone, deadline passed) drops the receiver, which the engine
    // notices at its next step and frees the sequence.
    let stream = UnboundedReceiverStream::new(rx).map(move |ev| match ev {
        Ok(GenEvent::Token { text, id }) => {
            Ok(pb::GenerateResponse { delta: text, token_ids: vec![id], summary: None })
        }
        Ok(GenEvent::Done(s)) => Ok(pb::GenerateResponse {
            delta: String::new(),
            token_ids: Vec::new(),
            summary: Some(pb::GenerateSummary {
                finish_reason: match s.finish_reason {
                    FinishReason::Length => pb::FinishReason::Length,
                    FinishReason::Stop => pb::FinishReason::Stop,
                    FinishReason::Context => pb::FinishReason::Context,
                } as i32,
                prompt_tokens: s.prompt_tokens as u32,
                completion_tokens: s.completion_tokens as u32,
                prefill_ms: s.prefill_ms,
                decode_ms: s.decode_ms,
                model: model_id.clone(),
            }),
        }),
        Err(e) => Err(Status::from(crate::error::ServiceError::from(e))),
    });
    Ok(Box::pin(stream))
}
