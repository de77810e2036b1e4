//! ScoreText: teacher-forced log-probabilities of a response after a prompt, as one prefill
//! (capture) pass on the batched engine.

use super::{AppState, resolve};
use crate::error::{ServiceResult, invalid};
use crate::model::LoadedModel;
use crate::model::sampling::Logprobs;
use persona_proto::v1 as pb;

/// Most alternatives per position a request may ask for (as the OpenAI API).
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// `None` when log-probabilities are off; otherwise how many alternatives to report.
pub fn top_count(logprobs: bool, top: u32) -> ServiceResult<Option<usize>> {
    if top > MAX_TOP_LOGPROBS {
        return Err(invalid(format!("top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {top}")));
    }
    Ok((logprobs || top > 0).then_some(top as usize))
}

fn token_text(model: &LoadedModel, id: u32) -> String {
    model.tokenizer.decode(&[id]).unwrap_or_default()
}

pub fn token_logprob_pb(model: &LoadedModel, l: &Logprobs) -> pb::TokenLogprob {
    pb::TokenLogprob {
        token_id: l.token,
        token: token_text(model, l.token),
        logprob: l.logprob,
        top_logprobs: l
            .top
            .iter()
            .map(|&(id, logprob)| pb::TopLogprob { token_id: id, token: token_text(model, id), logprob })
            .collect(),
    }
}

/// Mean log-probability per token (0 for no tokens).
pub fn mean_logprob(lps: &[Logprobs]) -> f64 {
    if lps.is_empty() {
        return 0.0;
    }
    lps.iter().map(|l| l.logprob as f64).sum::<f64>() / lps.len() as f64
}

pub async fn score_text(state: &AppState, req: pb::ScoreTextRequest) -> ServiceResult<pb::ScoreTextResponse> {
    let engine = state.engine(&req.model)?;
    let model = engine.model();
    let prompt = resolve::prompt_tokens(model, req.prompt.as_ref())?;
    let vocab = model.config().vocab_size as u32;
    let response = if !req.response_token_ids.is_empty() {
        if let Some(bad) = req.response_token_ids.iter().find(|&&t| t >= vocab) {
            return Err(invalid(format!("response_token_ids: token {bad} is outside the vocabulary (0..{vocab})")));
        }
        req.response_token_ids.clone()
    } else if !req.response.is_empty() {
        resolve::tokenize(model, &req.response)?
    } else {
        return Err(invalid("give the response to score, as text or token ids"));
    };
    let ctx = model.config().context_length;
    if prompt.len() + response.len() > ctx {
        return Err(invalid(format!(
            "prompt ({}) and response ({}) tokens exceed the context window of `{}` ({ctx})",
            prompt.len(),
            response.len(),
            model.id
        )));
    }
    let top = top_count(true, req.top_logprobs)?.unwrap_or(0);
    let steering = resolve::steering(&state.store, model, &req.steering)?;
    let prompt_tokens = prompt.len() as u32;
    let cap = engine
        .capture(crate::scheduler::CaptureJob {
            prompt_len: prompt.len(),
            tokens: [prompt, response].concat(),
            steering: steering.plan,
            probes: Vec::new(),
            logprobs: Some(top),
            token_states: None,
        })
        .await?;
    let sum: f64 = cap.logprobs.iter().map(|l| l.logprob as f64).sum();
    let mean = mean_logprob(&cap.logprobs);
    Ok(pb::ScoreTextResponse {
        tokens: cap.logprobs.iter().map(|l| token_logprob_pb(model, l)).collect(),
        prompt_tokens,
        sum_logprob: sum,
        mean_logprob: mean,
        perplexity: (-mean).exp(),
        steering: steering.applied,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_counts_are_bounded_and_imply_logprobs() {
        assert_eq!(top_count(false, 0).unwrap(), None);
        assert_eq!(top_count(true, 0).unwrap(), Some(0));
        assert_eq!(top_count(false, 5).unwrap(), Some(5));
        assert!(top_count(true, 21).is_err());
    }
}
