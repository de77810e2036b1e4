//! ListVectors, GetVector, PutVector, DeleteVector, ImportVector, ExportVector.

use super::{AppState, resolve};
use crate::error::{ServiceError, ServiceResult, invalid};
use crate::steering::interop::{self, Format};
use crate::steering::store::{StoredVector, VectorMeta, VectorStore};
use crate::support::unix_now;
use persona_proto::v1 as pb;
use std::sync::Arc;

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

/// Stores a vector off the async workers (the file write and fsync block).
pub async fn store_put(
    store: &Arc<VectorStore>,
    vector: StoredVector,
    overwrite: bool,
) -> ServiceResult<Arc<StoredVector>> {
    let store = store.clone();
    Ok(tokio::task::spawn_blocking(move || store.put(vector, overwrite))
        .await
        .map_err(|e| ServiceError::Internal(e.to_string()))??)
}

pub async fn put(state: &AppState, req: pb::PutVectorRequest) -> ServiceResult<pb::PutVectorResponse> {
    let engine = state.engine(&req.model)?;
    let c = engine.model().config();
    let meta = VectorMeta {
        name: req.name,
        model: engine.model().id.clone(),
        trait_name: req.trait_name,
        kind: resolve::kind_from_pb(req.kind)?,
        created_unix: unix_now(),
        description: req.description,
        n_rows: c.n_residual_rows(),
        d_model: c.hidden_size,
        recommended_layer: None,
        layer_scores: Vec::new(),
        calibration: Vec::new(),
        steering: None,
        transferred_from: None,
    };
    let stored = store_put(&state.store, StoredVector { meta, values: req.values }, req.overwrite).await?;
    Ok(pb::PutVectorResponse { info: Some(resolve::vector_info(&stored)) })
}

pub async fn delete(state: &AppState, req: pb::DeleteVectorRequest) -> ServiceResult<pb::DeleteVectorResponse> {
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || store.delete(&req.name))
        .await
        .map_err(|e| ServiceError::Internal(e.to_string()))??;
    Ok(pb::DeleteVectorResponse {})
}

pub async fn import(state: &AppState, req: pb::ImportVectorRequest) -> ServiceResult<pb::ImportVectorResponse> {
    let engine = state.engine(&req.model)?;
    let model = engine.model();
    let c = model.config();
    let (n_rows, d) = (c.n_residual_rows(), c.hidden_size);
    if req.data.is_empty() {
        return Err(invalid("data is empty: send the file's bytes"));
    }
    let format = match pb::VectorFormat::try_from(req.format) {
        Ok(pb::VectorFormat::Unspecified) => Format::detect(&req.data)
            .ok_or_else(|| invalid("cannot tell the file's format (not GGUF, PyTorch zip or safetensors)"))?,
        Ok(pb::VectorFormat::Safetensors) => Format::Safetensors,
        Ok(pb::VectorFormat::Gguf) => Format::Gguf,
        Ok(pb::VectorFormat::Torch) => Format::Torch,
        Err(_) => return Err(invalid(format!("unknown vector format {}", req.format))),
    };
    let recommended_layer = req.recommended_layer.map(|l| resolve::check_layer(model, l)).transpose()?;
    let mut meta = VectorMeta {
        name: req.name.clone(),
        model: model.id.clone(),
        trait_name: req.trait_name.clone(),
        kind: resolve::kind_from_pb(req.kind)?,
        created_unix: unix_now(),
        description: req.description.clone(),
        n_rows,
        d_model: d,
        recommended_layer,
        layer_scores: Vec::new(),
        calibration: Vec::new(),
        steering: None,
        transferred_from: None,
    };
    let values = match format {
        Format::Gguf => interop::import_gguf(&req.data, n_rows, d)?,
        Format::Torch => interop::import_torch(&req.data, n_rows, d)?,
        Format::Safetensors => {
            // Our own file: keep its metadata, but it must fit this model.
            let v = crate::steering::store::decode(&req.name, &req.data)?;
            if (v.meta.n_rows, v.meta.d_model) != (n_rows, d) {
                return Err(invalid(format!(
                    "vector has shape [{}, {}], model `{}` needs [{n_rows}, {d}]",
                    v.meta.n_rows, v.meta.d_model, model.id
                )));
            }
            meta.layer_scores = v.meta.layer_scores;
            meta.recommended_layer = meta.recommended_layer.or(v.meta.recommended_layer);
            // Calibration and steering recommendation describe this vector on the model it was
            // extracted from; on another model they would mislead, so only raw scores remain.
            if v.meta.model == model.id {
                meta.calibration = v.meta.calibration;
                meta.steering = v.meta.steering;
                meta.transferred_from = v.meta.transferred_from;
            }
            if meta.trait_name.is_empty() {
                meta.trait_name = v.meta.trait_name;
            }
            if meta.description.is_empty() {
                meta.description = v.meta.description;
            }
            v.values
        }
    };
    let stored = store_put(&state.store, StoredVector { meta, values }, req.overwrite).await?;
    Ok(pb::ImportVectorResponse { info: Some(resolve::vector_info(&stored)) })
}

pub fn export(state: &AppState, req: pb::ExportVectorRequest) -> ServiceResult<pb::ExportVectorResponse> {
    let v = state.store.get(&req.name)?;
    let m = &v.meta;
    match pb::VectorFormat::try_from(req.format) {
        Ok(pb::VectorFormat::Unspecified | pb::VectorFormat::Safetensors) => {
            Ok(pb::ExportVectorResponse { data: crate::steering::store::encode(&v)?, extension: "safetensors".into() })
        }
        Ok(pb::VectorFormat::Gguf) => {
            let hint =
                state.engine(&m.model).ok().map_or("llama".to_string(), |e| e.model().config().architecture.clone());
            Ok(pb::ExportVectorResponse {
                data: interop::export_gguf(&v.values, m.n_rows, m.d_model, &hint)?,
                extension: "gguf".into(),
            })
        }
        Ok(pb::VectorFormat::Torch) => {
            Err(invalid("export to PyTorch files is not supported; use GGUF or safetensors"))
        }
        Err(_) => Err(invalid(format!("unknown vector format {}", req.format))),
    }
}
