//! gRPC handlers for `persona.v1.PersonaService`: thin adapters from protobuf to the engine
//! and the vector store.

mod evaluate;
mod extract;
mod finetune;
mod generate;
mod models;
mod project;
mod reading;
mod resolve;
mod score;
mod screen;
mod shift;
mod traits;
mod transfer;
mod vectors;

use crate::error::{ServiceError, ServiceResult};
use crate::judge::Judge;
use crate::scheduler::EngineHandle;
use crate::steering::store::VectorStore;
use crate::traits::TraitLibrary;
use pb::persona_service_server::PersonaService;
use persona_proto::v1 as pb;
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

pub use resolve::DEFAULT_MAX_TOKENS;

/// The loaded models, as ListModels answers.
pub fn list_models(state: &AppState) -> pb::ListModelsResponse {
    models::list(state)
}

pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Runs a long server-streaming job (extraction, evaluation, transfer) on a task of its own. The
/// job sends its events on the sender it is given; an error ends the stream with its status, and
/// a client that went away (the job's sends fail) is only logged. `what` and `name` label the logs.
fn spawn_job<T, F>(
    what: &'static str,
    name: String,
    job: impl FnOnce(tokio::sync::mpsc::Sender<Result<T, Status>>) -> F,
) -> ResponseStream<T>
where
    T: Send + 'static,
    F: std::future::Future<Output = ServiceResult<()>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let run = job(tx.clone());
    tokio::spawn(async move {
        match run.await {
            Ok(()) => {}
            Err(ServiceError::Cancelled(why)) => tracing::info!(vector = %name, "{what} cancelled: {why}"),
            Err(e) => {
                tracing::warn!(vector = %name, error = %e, "{what} failed");
                let _ = tx.send(Err(Status::from(e))).await;
            }
        }
        // The job's buffers (a transfer's hidden states: hundreds of MB) are freed by now.
        let _ = tokio::task::spawn_blocking(release_free_heap).await;
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// Hands the heap's free pages back to the system. glibc keeps memory freed by other threads in
/// their arenas, so without this a server that ran one transfer stays hundreds of MB larger.
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; 0 keeps no extra padding.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Everything the handlers share.
pub struct AppState {
    /// Served models by id; adapters loaded at runtime join them.
    pub engines: std::sync::RwLock<BTreeMap<String, EngineHandle>>,
    pub default_model: String,
    pub store: Arc<VectorStore>,
    pub started: std::time::Instant,
    pub traits: TraitLibrary,
    /// The configured judge, if any.
    pub judge: Option<Arc<Judge>>,
    /// The models' own responses to screened prompts.
    pub own_responses: screen::OwnResponses,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Monitored generations as they happen, for the console.
    pub live: Arc<crate::live::LiveFeed>,
    /// Fine-tuning jobs.
    pub jobs: Arc<crate::jobs::Jobs>,
    /// Counts the models added while serving, so that health reporting picks them up.
    pub models_added: tokio::sync::watch::Sender<u64>,
}

impl AppState {
    /// The engine for a model id; empty means the default model.
    pub fn engine(&self, id: &str) -> ServiceResult<EngineHandle> {
        let id = if id.is_empty() { self.default_model.as_str() } else { id };
        let engines = self.engines.read().unwrap_or_else(|p| p.into_inner());
        engines.get(id).cloned().ok_or_else(|| {
            let known: Vec<&str> = engines.keys().map(String::as_str).collect();
            ServiceError::ModelNotFound(format!("model `{id}` is not loaded (available: {})", known.join(", ")))
        })
    }

    /// Every served model's id and engine, in id order.
    pub fn engines(&self) -> Vec<(String, EngineHandle)> {
        let engines = self.engines.read().unwrap_or_else(|p| p.into_inner());
        engines.iter().map(|(id, e)| (id.clone(), e.clone())).collect()
    }

    /// Serves another model; ALREADY_EXISTS when the id is taken.
    pub fn add_engine(&self, id: &str, engine: EngineHandle) -> ServiceResult<()> {
        let mut engines = self.engines.write().unwrap_or_else(|p| p.into_inner());
        if engines.contains_key(id) {
            return Err(ServiceError::AlreadyExists(format!("model `{id}` is already served")));
        }
        engines.insert(id.to_string(), engine);
        drop(engines);
        self.models_added.send_modify(|n| *n += 1);
        Ok(())
    }
}

/// Seconds since `started`, and the seconds left at the pace so far (0 until something is done).
fn elapsed_and_eta(started: std::time::Instant, done: usize, total: usize) -> (f64, f64) {
    let elapsed = started.elapsed().as_secs_f64();
    let eta = if done == 0 { 0.0 } else { elapsed / done as f64 * total.saturating_sub(done) as f64 };
    (elapsed, eta)
}

/// The call's deadline from its `grpc-timeout` header ("<digits><H|M|S|m|u|n>"), which tonic
/// does not enforce once a response stream has started.
fn deadline_of<T>(req: &Request<T>) -> Result<Option<std::time::Instant>, Status> {
    let Some(v) = req.metadata().get("grpc-timeout") else { return Ok(None) };
    let v = v.to_str().map_err(|_| Status::invalid_argument("grpc-timeout is not ASCII"))?;
    let timeout = parse_grpc_timeout(v).ok_or_else(|| Status::invalid_argument(format!("bad grpc-timeout `{v}`")))?;
    Ok(Some(std::time::Instant::now() + timeout))
}

fn parse_grpc_timeout(v: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The service; it answers UNAVAILABLE until its state (loaded models) is set.
#[derive(Clone, Default)]
pub struct PersonaSvc {
    state: Arc<std::sync::OnceLock<Arc<AppState>>>,
}

impl PersonaSvc {
    /// A service over loaded models.
    pub fn new(state: Arc<AppState>) -> Self {
        let svc = Self::default();
        svc.set_ready(state);
        svc
    }

    /// A service that starts answering once [`Self::set_ready`] is called.
    pub fn loading() -> Self {
        Self::default()
    }

    /// Makes the service answer with `state`; later calls are ignored.
    pub fn set_ready(&self, state: Arc<AppState>) {
        let _ = self.state.set(state);
    }

    /// The state once the models are loaded.
    pub fn ready_state(&self) -> Option<&Arc<AppState>> {
        self.state.get()
    }

    /// The state, or UNAVAILABLE while the models load.
    pub(crate) fn state(&self) -> Result<&Arc<AppState>, Status> {
        self.state.get().ok_or_else(|| Status::unavailable("the server is still loading its models; retry shortly"))
    }
}

#[tonic::async_trait]
impl PersonaService for PersonaSvc {
    type GenerateStream = ResponseStream<pb::GenerateResponse>;
    type ExtractVectorStream = ResponseStream<pb::ExtractVectorResponse>;
    type MonitorStreamStream = ResponseStream<pb::MonitorResponse>;
    type ScreenDatasetStream = ResponseStream<pb::ScreenResponse>;
    type EvaluateSteeringStream = ResponseStream<pb::EvaluateSteeringResponse>;
    type WatchJobStream = ResponseStream<pb::JobStatus>;
    type TransferVectorStream = ResponseStream<pb::TransferVectorResponse>;

    async fn generate(&self, req: Request<pb::GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        let deadline = deadline_of(&req)?;
        Ok(Response::new(generate::generate(self.state()?, req.into_inner(), deadline)?))
    }

    async fn project_activation(
        &self,
        req: Request<pb::ProjectActivationRequest>,
    ) -> Result<Response<pb::ProjectActivationResponse>, Status> {
        Ok(Response::new(project::project(self.state()?, req.into_inner()).await?))
    }

    async fn monitor_stream(
        &self,
        req: Request<tonic::Streaming<pb::MonitorRequest>>,
    ) -> Result<Response<Self::MonitorStreamStream>, Status> {
        Ok(Response::new(project::monitor(self.state()?.clone(), req.into_inner())))
    }

    async fn screen_dataset(
        &self,
        req: Request<tonic::Streaming<pb::ScreenRequest>>,
    ) -> Result<Response<Self::ScreenDatasetStream>, Status> {
        Ok(Response::new(screen::start(self.state()?.clone(), req.into_inner()).await?))
    }

    async fn extract_vector(
        &self,
        req: Request<pb::ExtractVectorRequest>,
    ) -> Result<Response<Self::ExtractVectorStream>, Status> {
        Ok(Response::new(extract::extract(self.state()?.clone(), req.into_inner())?))
    }

    async fn list_models(&self, _: Request<pb::ListModelsRequest>) -> Result<Response<pb::ListModelsResponse>, Status> {
        Ok(Response::new(models::list(self.state()?)))
    }

    async fn list_vectors(
        &self,
        req: Request<pb::ListVectorsRequest>,
    ) -> Result<Response<pb::ListVectorsResponse>, Status> {
        Ok(Response::new(vectors::list(self.state()?, req.into_inner())))
    }

    async fn get_vector(&self, req: Request<pb::GetVectorRequest>) -> Result<Response<pb::GetVectorResponse>, Status> {
        Ok(Response::new(vectors::get(self.state()?, req.into_inner())?))
    }

    async fn put_vector(&self, req: Request<pb::PutVectorRequest>) -> Result<Response<pb::PutVectorResponse>, Status> {
        Ok(Response::new(vectors::put(self.state()?, req.into_inner()).await?))
    }

    async fn get_server_status(
        &self,
        _: Request<pb::GetServerStatusRequest>,
    ) -> Result<Response<pb::GetServerStatusResponse>, Status> {
        Ok(Response::new(models::status(self.state()?)))
    }

    async fn delete_vector(
        &self,
        req: Request<pb::DeleteVectorRequest>,
    ) -> Result<Response<pb::DeleteVectorResponse>, Status> {
        Ok(Response::new(vectors::delete(self.state()?, req.into_inner()).await?))
    }

    async fn list_traits(&self, _: Request<pb::ListTraitsRequest>) -> Result<Response<pb::ListTraitsResponse>, Status> {
        Ok(Response::new(traits::list(self.state()?)))
    }

    async fn draft_trait(
        &self,
        req: Request<pb::DraftTraitRequest>,
    ) -> Result<Response<pb::DraftTraitResponse>, Status> {
        Ok(Response::new(traits::draft(self.state()?, req.into_inner()).await?))
    }

    async fn import_vector(
        &self,
        req: Request<pb::ImportVectorRequest>,
    ) -> Result<Response<pb::ImportVectorResponse>, Status> {
        Ok(Response::new(vectors::import(self.state()?, req.into_inner()).await?))
    }

    async fn export_vector(
        &self,
        req: Request<pb::ExportVectorRequest>,
    ) -> Result<Response<pb::ExportVectorResponse>, Status> {
        Ok(Response::new(vectors::export(self.state()?, req.into_inner())?))
    }

    async fn score_text(&self, req: Request<pb::ScoreTextRequest>) -> Result<Response<pb::ScoreTextResponse>, Status> {
        Ok(Response::new(score::score_text(self.state()?, req.into_inner()).await?))
    }

    async fn evaluate_steering(
        &self,
        req: Request<pb::EvaluateSteeringRequest>,
    ) -> Result<Response<Self::EvaluateSteeringStream>, Status> {
        Ok(Response::new(evaluate::evaluate(self.state()?.clone(), req.into_inner())?))
    }

    async fn steering_spectrum(
        &self,
        req: Request<pb::SteeringSpectrumRequest>,
    ) -> Result<Response<pb::SteeringSpectrumResponse>, Status> {
        Ok(Response::new(evaluate::spectrum(self.state()?, req.into_inner()).await?))
    }

    async fn start_fine_tune(
        &self,
        req: Request<pb::StartFineTuneRequest>,
    ) -> Result<Response<pb::StartFineTuneResponse>, Status> {
        let state = self.state()?.clone();
        let req = req.into_inner();
        // Reading and tokenizing a dataset is work: off the async threads.
        let res = tokio::task::spawn_blocking(move || finetune::start(&state, req))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(res))
    }

    async fn watch_job(&self, req: Request<pb::WatchJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        Ok(Response::new(finetune::watch(self.state()?, req.into_inner())?))
    }

    async fn cancel_job(&self, req: Request<pb::CancelJobRequest>) -> Result<Response<pb::CancelJobResponse>, Status> {
        Ok(Response::new(finetune::cancel(self.state()?, req.into_inner())?))
    }

    async fn list_jobs(&self, _: Request<pb::ListJobsRequest>) -> Result<Response<pb::ListJobsResponse>, Status> {
        Ok(Response::new(finetune::list(self.state()?)))
    }

    async fn load_adapter(
        &self,
        req: Request<pb::LoadAdapterRequest>,
    ) -> Result<Response<pb::LoadAdapterResponse>, Status> {
        Ok(Response::new(finetune::load_adapter(self.state()?, req.into_inner()).await?))
    }

    async fn measure_shift(
        &self,
        req: Request<pb::MeasureShiftRequest>,
    ) -> Result<Response<pb::MeasureShiftResponse>, Status> {
        Ok(Response::new(shift::measure(self.state()?, req.into_inner()).await?))
    }

    async fn transfer_vector(
        &self,
        req: Request<pb::TransferVectorRequest>,
    ) -> Result<Response<Self::TransferVectorStream>, Status> {
        Ok(Response::new(transfer::transfer(self.state()?.clone(), req.into_inner())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn calls_are_unavailable_until_the_models_are_loaded() {
        let svc = PersonaSvc::loading();
        let e = svc.list_models(Request::new(pb::ListModelsRequest {})).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(e.message().contains("still loading"));
        let e = svc.generate(Request::new(pb::GenerateRequest::default())).await.err().unwrap();
        assert_eq!(e.code(), tonic::Code::Unavailable);
    }

    #[test]
    fn grpc_timeouts_parse_per_the_spec() {
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "S", "10", "10x", "123456789S", "-1S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }
}
