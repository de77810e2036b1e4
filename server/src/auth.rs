//! API keys: `authorization: Bearer <key>` on every call, checked against SHA-256 hashes of the
//! configured keys, each with scopes.
//!
//! - `generate`: Generate, ScoreText, SteeringSpectrum;
//! - `monitor`: ProjectActivation, MonitorStream, ScreenDataset, MeasureShift;
//! - `read`: listing, GetVector, ExportVector, GetServerStatus, ListTraits, WatchJob, ListJobs;
//! - `write`: PutVector, DeleteVector, ImportVector, ExtractVector, DraftTrait, EvaluateSteering,
//!   StartFineTune, CancelJob, LoadAdapter, TransferVector.
//!
//! Health is always open; reflection, when served, needs a valid key of any scope. A missing or
//! unknown key is UNAUTHENTICATED, a key without the method's scope PERMISSION_DENIED. Keys are
//! hashed before comparison and compared with every configured hash in constant time; neither
//! keys nor their hashes are logged (key names are).

use sha2::{Digest, Sha256};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use subtle::ConstantTimeEq;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    Generate,
    Monitor,
    Read,
    Write,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Generate, Scope::Monitor, Scope::Read, Scope::Write];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Generate => "generate",
            Scope::Monitor => "monitor",
            Scope::Read => "read",
            Scope::Write => "write",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// The scope a method of `persona.v1.PersonaService` needs; `None` for a method this build
/// does not know (it then needs a valid key and answers UNIMPLEMENTED).
pub fn scope_of(method: &str) -> Option<Scope> {
    Some(match method {
        "Generate" | "ScoreText" | "SteeringSpectrum" => Scope::Generate,
        "ProjectActivation" | "MonitorStream" | "ScreenDataset" | "MeasureShift" => Scope::Monitor,
        "ListModels" | "ListVectors" | "GetVector" | "ExportVector" | "GetServerStatus" | "ListTraits" | "WatchJob"
        | "ListJobs" => Scope::Read,
        "PutVector" | "DeleteVector" | "ImportVector" | "ExtractVector" | "DraftTrait" | "EvaluateSteering"
        | "StartFineTune" | "CancelJob" | "LoadAdapter" | "TransferVector" => Scope::Write,
        _ => return None,
    })
}

/// One configured key: its name (for logs and errors), the SHA-256 of the key, its scopes.
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub name: String,
    pub hash: [u8; 32],
    pub scopes: Vec<Scope>,
}

impl ApiKey {
    /// A key from its name, the hex SHA-256 of the secret, and scope names.
    pub fn from_hex(name: &str, sha256_hex: &str, scopes: &[String]) -> anyhow::Result<Self> {
        let hex = sha256_hex.trim();
        anyhow::ensure!(
            hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
            "key `{name}`: sha256 must be 64 hex digits (the SHA-256 of the key, e.g. from `printf %s KEY | sha256sum`)"
        );
        let mut hash = [0u8; 32];
        for (i, byte) in hash.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)?;
        }
        anyhow::ensure!(!scopes.is_empty(), "key `{name}` has no scopes (use generate, monitor, read, write)");
        let scopes = scopes
            .iter()
            .map(|s| {
                Scope::parse(s.trim()).ok_or_else(|| {
                    anyhow::anyhow!("key `{name}`: unknown scope `{s}` (use generate, monitor, read, write)")
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { name: name.to_string(), hash, scopes })
    }
}

/// The SHA-256 of a secret, as hex (what the configuration stores).
pub fn hash_hex(secret: &str) -> String {
    Sha256::digest(secret.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// The keys in effect; replaced whole on reload.
#[derive(Debug, Default)]
pub struct KeySet {
    keys: Vec<ApiKey>,
}

impl KeySet {
    pub fn new(keys: Vec<ApiKey>) -> Self {
        Self { keys }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// The key whose hash matches `secret`'s. Every configured hash is compared, in constant
    /// time each, whichever matches.
    fn find(&self, secret: &[u8]) -> Option<&ApiKey> {
        let h = Sha256::digest(secret);
        let mut found = None;
        for k in &self.keys {
            if bool::from(k.hash.ct_eq(h.as_slice())) {
                found = found.or(Some(k));
            }
        }
        found
    }

    /// Whether a call to `path` with these request headers may go on.
    pub fn check(&self, path: &str, headers: &http::HeaderMap) -> Result<(), tonic::Status> {
        let mut parts = path.trim_start_matches('/').splitn(2, '/');
        let (service, method) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        if self.keys.is_empty() || service == "grpc.health.v1.Health" {
            return Ok(());
        }
        let Some(value) = headers.get(http::header::AUTHORIZATION) else {
            return Err(tonic::Status::unauthenticated(
                "missing API key: send the metadata `authorization: Bearer <key>`",
            ));
        };
        let secret = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .ok_or_else(|| tonic::Status::unauthenticated("the authorization metadata must be `Bearer <key>`"))?;
        let Some(key) = self.find(secret.as_bytes()) else {
            tracing::debug!(method, "unknown API key");
            return Err(tonic::Status::unauthenticated("unknown API key"));
        };
        if service != "persona.v1.PersonaService" {
            return Ok(()); // reflection: any valid key
        }
        match scope_of(method) {
            Some(scope) if !key.scopes.contains(&scope) => {
                tracing::debug!(key = %key.name, method, scope = scope.as_str(), "permission denied");
                Err(tonic::Status::permission_denied(format!(
                    "API key `{}` lacks the `{}` scope that {method} needs",
                    key.name,
                    scope.as_str()
                )))
            }
            _ => Ok(()),
        }
    }
}

/// Shared, reloadable keys.
pub type Keys = Arc<RwLock<Arc<KeySet>>>;

/// The tower layer that checks keys before any handler runs.
#[derive(Clone)]
pub struct AuthLayer {
    keys: Keys,
}

impl AuthLayer {
    pub fn new(keys: Keys) -> Self {
        Self { keys }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Authenticated<S>;
    fn layer(&self, inner: S) -> Authenticated<S> {
        Authenticated { inner, keys: self.keys.clone() }
    }
}

#[derive(Clone)]
pub struct Authenticated<S> {
    inner: S,
    keys: Keys,
}

impl<S, ReqBody> tower::Service<http::Request<ReqBody>> for Authenticated<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner()).clone();
        match keys.check(req.uri().path(), req.headers()) {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> KeySet {
        let all: Vec<String> = Scope::ALL.iter().map(|s| s.as_str().to_string()).collect();
        KeySet::new(vec![
            ApiKey::from_hex("reader", &hash_hex("r-secret"), &["read".into()]).unwrap(),
            ApiKey::from_hex("admin", &hash_hex("a-secret"), &all).unwrap(),
        ])
    }

    fn call(keys: &KeySet, path: &str, auth: Option<&str>) -> Result<(), tonic::Code> {
        let mut h = http::HeaderMap::new();
        if let Some(a) = auth {
            h.insert(http::header::AUTHORIZATION, a.parse().unwrap());
        }
        keys.check(path, &h).map_err(|s| s.code())
    }

    #[test]
    fn keys_and_scopes_decide_each_call() {
        let k = keys();
        let put = "/persona.v1.PersonaService/PutVector";
        let list = "/persona.v1.PersonaService/ListVectors";
        assert_eq!(call(&k, put, None), Err(tonic::Code::Unauthenticated));
        assert_eq!(call(&k, put, Some("Bearer wrong")), Err(tonic::Code::Unauthenticated));
        assert_eq!(call(&k, put, Some("r-secret")), Err(tonic::Code::Unauthenticated), "no Bearer prefix");
        assert_eq!(call(&k, put, Some("Bearer r-secret")), Err(tonic::Code::PermissionDenied));
        assert_eq!(call(&k, list, Some("Bearer r-secret")), Ok(()));
        assert_eq!(call(&k, put, Some("Bearer a-secret")), Ok(()));
        assert_eq!(call(&k, "/grpc.health.v1.Health/Check", None), Ok(()), "health stays open");
        let reflect = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
        assert_eq!(call(&k, reflect, None), Err(tonic::Code::Unauthenticated));
        assert_eq!(call(&k, reflect, Some("Bearer r-secret")), Ok(()));
        assert_eq!(call(&KeySet::default(), put, None), Ok(()), "no keys configured: open");
    }

    #[test]
    fn every_rpc_of_the_proto_has_a_scope() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/persona/v1");
        let mut methods = Vec::new();
        for f in std::fs::read_dir(dir).unwrap() {
            let text = std::fs::read_to_string(f.unwrap().path()).unwrap();
            for line in text.lines().map(str::trim).filter(|l| l.starts_with("rpc ")) {
                methods.push(line[4..].split('(').next().unwrap().trim().to_string());
            }
        }
        assert!(methods.len() >= 18, "{methods:?}");
        for m in methods {
            assert!(scope_of(&m).is_some(), "{m} has no scope");
        }
    }

    #[test]
    fn bad_key_configuration_is_explained() {
        let e = ApiKey::from_hex("k", "abc", &["read".into()]).unwrap_err().to_string();
        assert!(e.contains("64 hex digits"), "{e}");
        let e = ApiKey::from_hex("k", &hash_hex("x"), &["admin".into()]).unwrap_err().to_string();
        assert!(e.contains("unknown scope `admin`"), "{e}");
        let e = ApiKey::from_hex("k", &hash_hex("x"), &[]).unwrap_err().to_string();
        assert!(e.contains("no scopes"), "{e}");
    }
}
