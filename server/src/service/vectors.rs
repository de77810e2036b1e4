//! ListVectors, GetVector, PutVector, DeleteVector.

use super::{AppState, resolve};
use crate::error::{ServiceError, ServiceResult};
use crate::steering::store::{StoredVector, VectorMeta, now_unix};
use persona_proto::v1 as pb;

pub fn list(state: &AppState, req: pb::ListVectorsRequest) -> pb::ListVectorsResponse {
    let model = (!req.model.is_empty()).then_some(req.model.as_str());
    pb::ListVectorsResponse { vectors: state.store.list(model).iter().map(|v| resolve::vector_info(v)).collect() }
}

pub fn get(state: &AppState, req: pb::GetVectorRequest) -> ServiceResult<pb::GetVectorResponse> {
    let v = state.store.get(&req.name)?;
    Ok(pb::GetVectorResponse {
        info: Some(resolve::vector_info(&v)),
        values: if req.include_values { v.values.clone() } else { Vec::new() },
    })
}

pub async fn put(state: &AppState, req: pb::PutVectorRequest) -> ServiceResult<pb::PutVectorResponse> {
    let engine = state.engine(&req.model)?;
    let c = engine.model().config();
    let meta = VectorMeta {
        name: req.name,
        model: engine.model().id.clone(),
        trait_name: req.trait_name,
        kind: resolve::kind_from_pb(req.kind)?,
        created_unix: now_unix(),
        description: req.description,
        n_rows: c.n_residual_rows(),
        d_model: c.hidden_size,
    };
    let store = state.store.clone();
    let vector = StoredVector { meta, values: req.values };
    let overwrite = req.overwrite;
    // File writes and fsync block; keep them off the async workers.
    let stored = tokio::task::spawn_blocking(move || store.put(vector, overwrite))
        .await
        .map_err(|e| ServiceError::Internal(e.to_string()))??;
    Ok(pb::PutVectorResponse { info: Some(resolve::vector_info(&stored)) })
}

pub async fn delete(state: &AppState, req: pb::DeleteVectorRequest) -> ServiceResult<pb::DeleteVectorResponse> {
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || store.delete(&req.name))
        .await
        .map_err(|e| ServiceError::Internal(e.to_string()))??;
    Ok(pb::DeleteVectorResponse {})
}
