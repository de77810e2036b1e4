//! gRPC handlers for `persona.v1.PersonaService`: thin adapters from protobuf to the engine
//! and the vector store.

mod extract;
mod generate;
mod models;
mod project;
mod resolve;
mod vectors;

use crate::error::{ServiceError, ServiceResult};
use crate::scheduler::EngineHandle;
use crate::steering::store::VectorStore;
use pb::persona_service_server::PersonaService;
use persona_proto::v1 as pb;
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Everything the handlers share.
pub struct AppState {
    pub engines: BTreeMap<String, EngineHandle>,
    pub default_model: String,
    pub store: Arc<VectorStore>,
}

impl AppState {
    /// The engine for a model id; empty means the default model.
    pub fn engine(&self, id: &str) -> ServiceResult<&EngineHandle> {
        let id = if id.is_empty() { self.default_model.as_str() } else { id };
        self.engines.get(id).ok_or_else(|| {
            let known: Vec<&str> = self.engines.keys().map(String::as_str).collect();
            ServiceError::NotFound(format!("model `{id}` is not loaded (available: {})", known.join(", ")))
        })
    }
}

#[derive(Clone)]
pub struct PersonaSvc {
    state: Arc<AppState>,
}

impl PersonaSvc {
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl PersonaService for PersonaSvc {
    type GenerateStream = ResponseStream<pb::GenerateResponse>;
    type ExtractVectorStream = ResponseStream<pb::ExtractVectorResponse>;

    async fn generate(&self, req: Request<pb::GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        Ok(Response::new(generate::generate(&self.state, req.into_inner())?))
    }

    async fn project_activation(
        &self,
        req: Request<pb::ProjectActivationRequest>,
    ) -> Result<Response<pb::ProjectActivationResponse>, Status> {
        Ok(Response::new(project::project(&self.state, req.into_inner()).await?))
    }

    async fn extract_vector(
        &self,
        req: Request<pb::ExtractVectorRequest>,
    ) -> Result<Response<Self::ExtractVectorStream>, Status> {
        Ok(Response::new(extract::extract(self.state.clone(), req.into_inner())?))
    }

    async fn list_models(&self, _: Request<pb::ListModelsRequest>) -> Result<Response<pb::ListModelsResponse>, Status> {
        Ok(Response::new(models::list(&self.state)))
    }

    async fn list_vectors(
        &self,
        req: Request<pb::ListVectorsRequest>,
    ) -> Result<Response<pb::ListVectorsResponse>, Status> {
        Ok(Response::new(vectors::list(&self.state, req.into_inner())))
    }

    async fn get_vector(&self, req: Request<pb::GetVectorRequest>) -> Result<Response<pb::GetVectorResponse>, Status> {
        Ok(Response::new(vectors::get(&self.state, req.into_inner())?))
    }

    async fn put_vector(&self, req: Request<pb::PutVectorRequest>) -> Result<Response<pb::PutVectorResponse>, Status> {
        Ok(Response::new(vectors::put(&self.state, req.into_inner()).await?))
    }

    async fn delete_vector(
        &self,
        req: Request<pb::DeleteVectorRequest>,
    ) -> Result<Response<pb::DeleteVectorResponse>, Status> {
        Ok(Response::new(vectors::delete(&self.state, req.into_inner()).await?))
    }
}
