//! TransferVector: carries a stored vector to another served model through a linear map between
//! the two residual streams ([`transfer`](crate::steering::transfer)), fitted on a corpus both
//! models read: the prose of `scripts/data/fidelity-corpus.jsonl` (one text per paragraph, chat
//! markup removed) and every question of the trait library. A sample is a word end where both
//! tokenizers end a token; texts are split between fitting, choosing the ridge penalty and
//! testing, so every R² reported is on texts the map never saw.

use super::{AppState, ResponseStream, resolve, vectors};
use crate::error::{ServiceError, ServiceResult, invalid};
use crate::model::LoadedModel;
use crate::scheduler::{CaptureJob, EngineHandle, TokenStates};
use crate::steering::plan::SteeringPlan;
use crate::steering::store::{StoredVector, TransferredFrom, VectorMeta, validate_name};
use crate::steering::transfer::{Fit, Pairs, Split, fit_procrustes, fit_ridge, same_depth};
use crate::support::unix_now;
use persona_proto::v1 as pb;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tonic::Status;

const CORPUS: &str = include_str!("../../../scripts/data/fidelity-corpus.jsonl");
const DEFAULT_SAMPLES: usize = 3000;
const MAX_SAMPLES: usize = 20_000;

type Tx = mpsc::Sender<Result<pb::TransferVectorResponse, Status>>;

/// The shared texts: corpus paragraphs (chat markup removed) and the library's questions.
fn corpus(state: &AppState) -> Vec<String> {
    let mut texts = Vec::new();
    for line in CORPUS.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(doc) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let mut text = doc["text"].as_str().unwrap_or_default().to_string();
        for role in ["system", "user", "assistant"] {
            text = text.replace(&format!("<|im_start|>{role}\n"), "");
        }
        text = text.replace("<|im_end|>", "\n");
        texts.extend(text.split("\n\n").map(str::trim).filter(|p| p.split_whitespace().count() >= 4).map(String::from));
    }
    let mut questions: Vec<String> =
        state.traits.all().flat_map(|t| t.questions.iter().chain(&t.eval_questions).cloned()).collect();
    questions.sort();
    questions.dedup();
    texts.extend(questions);
    texts
}

/// Byte offsets in `text` where a word ends.
fn word_ends(text: &str) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut in_word = false;
    for (i, c) in text.char_indices() {
        if c.is_whitespace() {
            if in_word {
                ends.push(i);
            }
            in_word = false;
        } else {
            in_word = true;
        }
    }
    if in_word {
        ends.push(text.len());
    }
    ends
}

/// One text as both models read it: tokens, and per kept unit the token index in each.
struct Reading {
    text: usize,
    source: Vec<u32>,
    target: Vec<u32>,
    units: Vec<(usize, usize)>,
}

/// Tokenizes a text for both models and keeps the word ends where both end a token.
fn align(text_idx: usize, text: &str, source: &LoadedModel, target: &LoadedModel) -> ServiceResult<Reading> {
    let internal = |e: anyhow::Error| ServiceError::Internal(e.to_string());
    let (s_ids, s_ends) = source.tokenizer.encode_document_ends(text).map_err(internal)?;
    let (t_ids, t_ends) = target.tokenizer.encode_document_ends(text).map_err(internal)?;
    let index = |ends: &[Option<usize>], at: usize| ends.iter().position(|e| *e == Some(at));
    let units = word_ends(text).into_iter().filter_map(|at| Some((index(&s_ends, at)?, index(&t_ends, at)?))).collect();
    Ok(Reading { text: text_idx, source: s_ids, target: t_ids, units })
}

struct Plan {
    vector: Arc<StoredVector>,
    source: EngineHandle,
    target: EngineHandle,
    name: String,
    /// (source layer, target layer) pairs to fit.
    pairs: Vec<(usize, usize)>,
    /// The pair whose layer is recommended (and whose row alone is stored without `all_layers`);
    /// `None`: the best held-out R².
    chosen: Option<usize>,
    /// Store every pair's carried row, not only the chosen one's.
    all_layers: bool,
    procrustes: bool,
    max_samples: usize,
    overwrite: bool,
}

pub fn transfer(
    state: Arc<AppState>,
    req: pb::TransferVectorRequest,
) -> ServiceResult<ResponseStream<pb::TransferVectorResponse>> {
    if req.vector.is_empty() {
        return Err(invalid("vector is required: the stored vector to transfer"));
    }
    let vector = state.store.get(&req.vector)?;
    if !req.from_model.is_empty() && req.from_model != vector.meta.model {
        return Err(invalid(format!(
            "vector `{}` belongs to model `{}`, not `{}`",
            req.vector, vector.meta.model, req.from_model
        )));
    }
    let source = state.engine(&vector.meta.model).map_err(|_| {
        ServiceError::FailedPrecondition(format!(
            "vector `{}` belongs to model `{}`, which this server does not serve",
            req.vector, vector.meta.model
        ))
    })?;
    let target = state.engine(&req.to_model)?;
    let (s_rows, t_rows) = (source.model().config().n_residual_rows(), target.model().config().n_residual_rows());
    let source_layer = match req.source_layer {
        Some(l) => resolve::check_layer(source.model(), l)?,
        None => vector.meta.recommended_layer.unwrap_or(s_rows / 2),
    };
    let target_layer = req.target_layer.map(|l| resolve::check_layer(target.model(), l)).transpose()?;
    let (pairs, chosen) = if req.all_layers {
        if req.source_layer.is_some() || req.search_target_layer {
            return Err(invalid(
                "all_layers pairs every target layer with the source layer at its depth: give neither source_layer \
                 nor search_target_layer with it",
            ));
        }
        // The embeddings (row 0) carry no context: every block output, from the source's block
        // output at the same relative depth.
        let pairs: Vec<(usize, usize)> = (1..t_rows).map(|t| (same_depth(t, t_rows, s_rows).max(1), t)).collect();
        let pick = target_layer.unwrap_or_else(|| same_depth(source_layer, s_rows, t_rows).max(1));
        let chosen = pairs.iter().position(|&(_, t)| t == pick);
        if chosen.is_none() {
            return Err(invalid(format!("target_layer {pick} is the embedding row: all_layers starts at layer 1")));
        }
        (pairs, chosen)
    } else {
        match (target_layer, req.search_target_layer) {
            (Some(_), true) => return Err(invalid("give target_layer or search_target_layer, not both")),
            (Some(l), false) => (vec![(source_layer, l)], Some(0)),
            // The embeddings (row 0) carry no context: search the blocks' outputs.
            (None, true) => ((1..t_rows).map(|t| (source_layer, t)).collect(), None),
            (None, false) => (vec![(source_layer, same_depth(source_layer, s_rows, t_rows))], Some(0)),
        }
    };
    let d = vector.meta.d_model;
    if let Some(&(l, _)) = pairs.iter().find(|&&(l, _)| vector.values[l * d..(l + 1) * d].iter().all(|&x| x == 0.0)) {
        return Err(invalid(format!("vector `{}` is zero at layer {l}: nothing to transfer", req.vector)));
    }
    let procrustes = match pb::TransferMethod::try_from(req.method) {
        Ok(pb::TransferMethod::Ridge) => false,
        Ok(pb::TransferMethod::Procrustes) => true,
        Err(_) => return Err(invalid(format!("unknown transfer method {}", req.method))),
    };
    let max_samples = match req.max_samples as usize {
        0 => DEFAULT_SAMPLES,
        n if n > MAX_SAMPLES => return Err(invalid(format!("max_samples {n} is above the limit of {MAX_SAMPLES}"))),
        n if n < 100 => return Err(invalid(format!("max_samples {n} is too few to fit a map (at least 100)"))),
        n => n,
    };
    let name = if req.name.is_empty() { format!("{}.{}", req.vector, req.to_model) } else { req.name.clone() };
    validate_name(&name)?;
    if !req.overwrite && state.store.get(&name).is_ok() {
        return Err(ServiceError::AlreadyExists(format!(
            "vector `{name}` already exists (set overwrite to replace it)"
        )));
    }
    let plan = Plan {
        vector,
        source,
        target,
        name,
        pairs,
        chosen,
        all_layers: req.all_layers,
        procrustes,
        max_samples,
        overwrite: req.overwrite,
    };
    let name = plan.name.clone();
    Ok(super::spawn_job("transfer", name, move |tx| async move { run(state, plan, &tx).await }))
}

async fn progress(tx: &Tx, stage: &str, done: usize, total: usize, started: Instant) -> ServiceResult<()> {
    let event = pb::transfer_vector_response::Event::Progress(pb::TransferProgress {
        stage: stage.to_string(),
        done: done as u32,
        total: total as u32,
        elapsed_secs: started.elapsed().as_secs_f64(),
    });
    tx.send(Ok(pb::TransferVectorResponse { event: Some(event) }))
        .await
        .map_err(|_| ServiceError::Cancelled("the client went away".into()))
}

/// Hidden states at `positions` and `layers` of one reading, `positions.len()` rows of
/// `layers.len() * d` values.
async fn read(
    engine: &EngineHandle,
    tokens: Vec<u32>,
    positions: Vec<usize>,
    layers: Vec<usize>,
) -> ServiceResult<Vec<Vec<f32>>> {
    let rows = engine.model().config().n_residual_rows();
    let job = CaptureJob {
        prompt_len: tokens.len(),
        tokens,
        steering: SteeringPlan::new(rows),
        probes: Vec::new(),
        logprobs: None,
        token_states: Some(TokenStates { positions, layers }),
    };
    Ok(engine.capture(job).await?.token_states)
}

async fn run(state: Arc<AppState>, plan: Plan, tx: &Tx) -> ServiceResult<()> {
    let started = Instant::now();
    let (src, dst) = (plan.source.model().clone(), plan.target.model().clone());
    let (dx, dy) = (src.config().hidden_size, dst.config().hidden_size);
    // Align every text, then keep an even spread of at most max_samples units.
    let texts = corpus(&state);
    let mut readings = Vec::with_capacity(texts.len());
    for (i, t) in texts.iter().enumerate() {
        let r = align(i, t, &src, &dst)?;
        if !r.units.is_empty() {
            readings.push(r);
        }
    }
    let total: usize = readings.iter().map(|r| r.units.len()).sum();
    let stride = total.div_ceil(plan.max_samples).max(1);
    let mut seen = 0;
    for r in &mut readings {
        let units = std::mem::take(&mut r.units);
        r.units = units
            .into_iter()
            .filter(|_| {
                seen += 1;
                (seen - 1) % stride == 0
            })
            .collect();
    }
    readings.retain(|r| !r.units.is_empty());
    let n_texts = readings.len();
    progress(tx, "read", 0, n_texts, started).await?;
    let permits = Arc::new(Semaphore::new(plan.source.max_batch().min(plan.target.max_batch()).max(1)));
    // The distinct layers each side is read at; a pair indexes into them.
    let distinct = |side: fn(&(usize, usize)) -> usize| {
        let mut l: Vec<usize> = plan.pairs.iter().map(side).collect();
        l.sort_unstable();
        l.dedup();
        l
    };
    let (source_layers, target_layers) = (distinct(|p| p.0), distinct(|p| p.1));
    let mut tasks = JoinSet::new();
    for r in readings {
        let (source, target, permits) = (plan.source.clone(), plan.target.clone(), permits.clone());
        let (ls, lts) = (source_layers.clone(), target_layers.clone());
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await.map_err(|e| ServiceError::Internal(e.to_string()))?;
            let (sp, tp): (Vec<usize>, Vec<usize>) = r.units.iter().copied().unzip();
            let (x, y) = tokio::join!(read(&source, r.source, sp, ls), read(&target, r.target, tp, lts));
            Ok::<_, ServiceError>((r.text, x?, y?))
        });
    }
    let mut gathered = Vec::with_capacity(n_texts);
    while let Some(joined) = tasks.join_next().await {
        gathered.push(joined.map_err(|e| ServiceError::Internal(e.to_string()))??);
        progress(tx, "read", gathered.len(), n_texts, started).await?;
    }
    gathered.sort_by_key(|g| g.0);
    let (mut x, mut y, mut text_of) = (Vec::new(), Vec::new(), Vec::new());
    for (text, xs, ys) in gathered {
        for (a, b) in xs.into_iter().zip(ys) {
            x.extend(a);
            y.extend(b);
            text_of.push(text);
        }
    }
    let n = text_of.len();
    let n_pairs = plan.pairs.len();
    progress(tx, "fit", 0, n_pairs, started).await?;
    // Per pair: its index into each side's layers, and the source row it carries.
    let index = |layers: &[usize], l: usize| layers.iter().position(|&m| m == l).expect("pair layers are read");
    let jobs: Vec<(usize, usize, Vec<f32>)> = plan
        .pairs
        .iter()
        .map(|&(ls, lt)| {
            (index(&source_layers, ls), index(&target_layers, lt), plan.vector.values[ls * dx..(ls + 1) * dx].to_vec())
        })
        .collect();
    let (chosen, all_layers, procrustes) = (plan.chosen, plan.all_layers, plan.procrustes);
    let (sw, tw) = (source_layers.len() * dx, target_layers.len() * dy);
    // Dense algebra on a blocking thread: seconds per pair for a few thousand samples.
    let fitted = tokio::task::spawn_blocking(move || -> Result<_, String> {
        let split = Split::by_text(&text_of);
        let column = |m: &[f32], width: usize, k: usize, d: usize| -> Vec<f32> {
            (0..n).flat_map(|i| m[i * width + k * d..i * width + (k + 1) * d].to_vec()).collect()
        };
        let mut fits = Vec::with_capacity(jobs.len());
        for (ks, kt, _) in &jobs {
            let (x_ls, y_lt) = (column(&x, sw, *ks, dx), column(&y, tw, *kt, dy));
            fits.push(fit_ridge(&Pairs { x: &x_ls, dx, y: &y_lt, dy }, &split)?);
        }
        let best =
            chosen.unwrap_or_else(|| (0..fits.len()).max_by(|&a, &b| fits[a].r2.total_cmp(&fits[b].r2)).unwrap_or(0));
        // Procrustes at the chosen pair (reported beside ridge), or at every pair it carries.
        let mut rotations: Vec<Option<Fit>> = (0..jobs.len()).map(|_| None).collect();
        for (k, (ks, kt, _)) in jobs.iter().enumerate() {
            if k == best || (procrustes && all_layers) {
                let (x_ls, y_lt) = (column(&x, sw, *ks, dx), column(&y, tw, *kt, dy));
                rotations[k] = Some(fit_procrustes(&Pairs { x: &x_ls, dx, y: &y_lt, dy }, &split)?);
            }
        }
        let carried: Vec<Option<Vec<f32>>> = jobs
            .iter()
            .enumerate()
            .map(|(k, (_, _, row))| {
                let fit = if procrustes { rotations[k].as_ref() } else { Some(&fits[k]) };
                fit.filter(|_| all_layers || k == best).map(|f| f.map.carry(row))
            })
            .collect();
        Ok((fits, rotations, best, carried, split))
    })
    .await
    .map_err(|e| ServiceError::Internal(e.to_string()))?
    .map_err(ServiceError::FailedPrecondition)?;
    let (fits, rotations, best, carried, split) = fitted;
    progress(tx, "fit", n_pairs, n_pairs, started).await?;
    let (source_layer, target_layer) = plan.pairs[best];
    let method = if procrustes { "procrustes" } else { "ridge" };
    let chosen_r2 = if procrustes { rotations[best].as_ref().map_or(0.0, |f| f.r2) } else { fits[best].r2 };
    let source_row = &plan.vector.values[source_layer * dx..(source_layer + 1) * dx];
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let best_row = carried[best].as_deref().unwrap_or_default();
    let norm_ratio = norm(best_row) / norm(source_row).max(f32::MIN_POSITIVE);
    let t_rows = dst.config().n_residual_rows();
    let mut values = vec![0f32; t_rows * dy];
    for (&(_, lt), row) in plan.pairs.iter().zip(&carried) {
        if let Some(row) = row {
            values[lt * dy..(lt + 1) * dy].copy_from_slice(row);
        }
    }
    let m = &plan.vector.meta;
    let carried_what = if plan.all_layers {
        format!(
            "carried to every layer 1-{} of `{}` from the layer at the same depth, each by its own {method} fit \
             (recommended layer {target_layer} from layer {source_layer}, held-out R² {chosen_r2:.3})",
            t_rows - 1,
            dst.id
        )
    } else {
        format!(
            "(layer {source_layer}) carried to layer {target_layer} of `{}` by {method} (held-out R² {chosen_r2:.3})",
            dst.id
        )
    };
    let description = format!(
        "`{}` of `{}` {carried_what}, fitted on {} word ends of {} texts, tested on {} of other texts",
        m.name,
        m.model,
        split.train.len() + split.val.len(),
        n_texts,
        split.test.len()
    );
    let stored = StoredVector {
        meta: VectorMeta {
            name: plan.name.clone(),
            model: dst.id.clone(),
            trait_name: m.trait_name.clone(),
            kind: m.kind,
            created_unix: unix_now(),
            description,
            n_rows: t_rows,
            d_model: dy,
            recommended_layer: Some(target_layer),
            layer_scores: Vec::new(),
            calibration: Vec::new(),
            steering: None,
            transferred_from: Some(TransferredFrom {
                model: m.model.clone(),
                vector: m.name.clone(),
                source_layer,
                target_layer,
                method: method.to_string(),
                r2: chosen_r2 as f32,
                samples: n,
            }),
        },
        values,
    };
    let stored = vectors::store_put(&state.store, stored, plan.overwrite).await?;
    let fits = fits
        .iter()
        .zip(&rotations)
        .zip(&plan.pairs)
        .map(|((f, rotation), &(ls, lt))| pb::LayerPairFit {
            source_layer: ls as u32,
            target_layer: lt as u32,
            ridge_r2: f.r2 as f32,
            ridge_lambda: f.lambda as f32,
            procrustes_r2: rotation.as_ref().map(|r| r.r2 as f32),
        })
        .collect();
    tracing::info!(vector = %plan.name, samples = n, r2 = chosen_r2, "transfer done");
    let result = pb::TransferResult {
        vector: Some(resolve::vector_info(&stored)),
        fits,
        samples: n as u32,
        texts: n_texts as u32,
        norm_ratio,
        elapsed_secs: started.elapsed().as_secs_f64(),
    };
    tx.send(Ok(pb::TransferVectorResponse { event: Some(pb::transfer_vector_response::Event::Result(result)) }))
        .await
        .map_err(|_| ServiceError::Cancelled("the client went away".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_ends_are_byte_offsets_after_each_word() {
        assert_eq!(word_ends("One  two\nthree"), vec![3, 8, 14]);
        assert_eq!(word_ends(" café au lait "), vec![6, 9, 14]);
        assert!(word_ends("   ").is_empty());
    }
}
