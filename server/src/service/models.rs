//! ListModels and GetServerStatus.

use super::AppState;
use persona_proto::v1 as pb;

pub fn list(state: &AppState) -> pb::ListModelsResponse {
    let models = state
        .engines()
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
                adapter: m.adapter.as_ref().map(|a| a.display().to_string()).unwrap_or_default(),
                base_model: m.base.clone().unwrap_or_default(),
            }
        })
        .collect();
    pb::ListModelsResponse { models }
}

/// Resident and peak resident memory of this process from /proc (Linux), in bytes.
fn memory() -> (u64, u64) {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return (0, 0) };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

pub fn status(state: &AppState) -> pb::GetServerStatusResponse {
    let engines = state
        .engines()
        .iter()
        .map(|(id, e)| {
            let s = e.status();
            let last_panic = e.health().borrow().last_panic.clone().unwrap_or_default();
            pb::EngineStatus {
                model: id.clone(),
                running: s.running as u32,
                waiting: s.waiting as u32,
                kv_cache_reserved_bytes: s.kv_reserved_bytes as u64,
                kv_cache_budget_bytes: s.kv_budget_bytes as u64,
                completed: s.completed,
                cancelled: s.cancelled,
                rejected: s.rejected,
                generated_tokens: s.generated_tokens,
                max_batch: e.max_batch() as u32,
                failed: s.failed,
                restarts: s.restarts,
                serving: s.serving,
                last_panic,
                kv_pool_bytes: s.kv_pool_bytes as u64,
            }
        })
        .collect();
    let (rss_bytes, peak_rss_bytes) = memory();
    pb::GetServerStatusResponse {
        engines,
        rss_bytes,
        peak_rss_bytes,
        uptime_secs: state.started.elapsed().as_secs_f64(),
    }
}
