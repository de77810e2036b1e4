//! ListModels.

use super::AppState;
use persona_proto::v1 as pb;

pub fn list(state: &AppState) -> pb::ListModelsResponse {
    let models = state
        .engines
        .iter()
        .map(|(id, e)| {
            let m = e.model();
            let c = m.config();
            pb::ModelInfo {
                id: id.clone(),
                architecture: c.architecture.clone(),
                n_layers: c.n_layers as u32,
                d_model: c.hidden_size as u32,
                vocab_size: c.vocab_size as u32,
                context_length: c.context_length as u32,
                is_default: *id == state.default_model,
                source: m.source.clone(),
                weights: m.weights.clone(),
                device: m.device.clone(),
            }
        })
        .collect();
    pb::ListModelsResponse { models }
}
