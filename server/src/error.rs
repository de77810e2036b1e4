//! Service-layer errors and their single mapping to gRPC status codes.

use crate::scheduler::EngineError;
use crate::steering::store::StoreError;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    /// A request named a model that is not served: NOT_FOUND, marked so the HTTP API can answer
    /// OpenAI's `model_not_found` without reading the message.
    #[error("{0}")]
    ModelNotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The server is not set up for the request (e.g. no judge configured).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A service the request depends on did not answer properly (e.g. the judge endpoint).
    #[error("{0}")]
    Unavailable(String),
    /// The client went away (a streaming call's receiver is gone); nothing failed.
    #[error("{0}")]
    Cancelled(String),
    #[error("{0}")]
    Internal(String),
}

impl ServiceError {
    /// The error of a streamed message that could not be delivered: the client left.
    pub fn client_left() -> Self {
        Self::Cancelled("the client went away".into())
    }
}

pub type ServiceResult<T> = Result<T, ServiceError>;

/// Status metadata naming the kind of an error where the code alone does not (see
/// [`MODEL_NOT_FOUND`]).
pub const ERROR_KIND: &str = "persona-error-kind";
/// [`ERROR_KIND`] of an unknown model.
pub const MODEL_NOT_FOUND: &str = "model-not-found";

pub fn invalid(msg: impl Into<String>) -> ServiceError {
    ServiceError::InvalidArgument(msg.into())
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        let code = match &e {
            ServiceError::InvalidArgument(_) => Code::InvalidArgument,
            ServiceError::NotFound(_) | ServiceError::ModelNotFound(_) => Code::NotFound,
            ServiceError::AlreadyExists(_) => Code::AlreadyExists,
            ServiceError::Store(s) => match s {
                StoreError::InvalidName(_) | StoreError::Malformed(_) => Code::InvalidArgument,
                StoreError::NotFound(_) => Code::NotFound,
                StoreError::Exists(_) => Code::AlreadyExists,
                StoreError::Io { .. } => Code::Internal,
            },
            ServiceError::Engine(g) => match g {
                EngineError::QueueFull(_) | EngineError::TooLarge { .. } => Code::ResourceExhausted,
                EngineError::DeadlineExceeded(_) => Code::DeadlineExceeded,
                EngineError::Stopped => Code::Unavailable,
                EngineError::Compute(_) | EngineError::Panicked(_) => Code::Internal,
            },
            ServiceError::FailedPrecondition(_) => Code::FailedPrecondition,
            ServiceError::Unavailable(_) => Code::Unavailable,
            ServiceError::Cancelled(_) => Code::Cancelled,
            ServiceError::Internal(_) => Code::Internal,
        };
        if code == Code::Internal {
            tracing::error!(error = %e, "internal error");
        }
        let mut status = Status::new(code, e.to_string());
        if matches!(e, ServiceError::ModelNotFound(_)) {
            status.metadata_mut().insert(ERROR_KIND, tonic::metadata::MetadataValue::from_static(MODEL_NOT_FOUND));
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_leaving_is_a_cancellation() {
        let s: Status = ServiceError::client_left().into();
        assert_eq!(s.code(), Code::Cancelled);
    }

    #[test]
    fn codes_are_precise() {
        let s: Status = ServiceError::from(StoreError::NotFound("v".into())).into();
        assert_eq!(s.code(), Code::NotFound);
        assert!(s.message().contains("`v`"));
        let s: Status = ServiceError::from(EngineError::QueueFull(8)).into();
        assert_eq!(s.code(), Code::ResourceExhausted);
        let s: Status = invalid("layer 99 out of range").into();
        assert_eq!(s.code(), Code::InvalidArgument);
    }
}
