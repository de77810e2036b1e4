//! The engine alone (no gRPC): failure isolation, panic recovery, crash loops and burst
//! admission, on the embedded model.

mod common;

use persona_server::scheduler::{EngineConfig, EngineError, EngineHandle, EventStream, GenEvent, GenerateJob};
use std::time::Duration;

fn job(prompt: Vec<u32>, max_tokens: usize) -> GenerateJob {
    GenerateJob::greedy(prompt, max_tokens)
}

fn prompt(text: &str) -> Vec<u32> {
    let m = common::served_model();
    m.tokenizer.encode(&format!("<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")).unwrap()
}

/// The token that trips the injected fault: the last piece of " zebra", which no other prompt
/// of these tests contains.
fn poison() -> u32 {
    let ids = common::served_model().tokenizer.encode(" zebra").unwrap();
    *ids.last().unwrap()
}

fn engine(configure: impl FnOnce(&mut EngineConfig)) -> EngineHandle {
    let mut cfg = EngineConfig::default();
    configure(&mut cfg);
    EngineHandle::spawn(common::served_model(), cfg).unwrap()
}

/// Generated token ids until the end, or the first error.
async fn drain(mut rx: EventStream) -> Result<Vec<u32>, EngineError> {
    let mut ids = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev? {
            GenEvent::Token { id, .. } => ids.push(id),
            GenEvent::Done(_) => return Ok(ids),
        }
    }
    Err(EngineError::Stopped)
}

/// Waits for the first token of a stream, keeping it for `drain` afterwards.
async fn first_token(rx: &mut EventStream) -> u32 {
    match rx.recv().await {
        Some(Ok(GenEvent::Token { id, .. })) => id,
        other => panic!("expected a first token, got {other:?}"),
    }
}

async fn until(what: &str, pred: impl Fn() -> bool) {
    for _ in 0..400 {
        if pred() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

/// A row the model cannot run (here a token id outside the vocabulary, which the services
/// never let through) fails alone: the generation batched with it finishes with the same tokens
/// it produces alone, and the status counts one failure, not a completion.
#[tokio::test]
async fn a_row_the_model_cannot_run_fails_alone() {
    let e = engine(|_| {});
    let good = prompt("Write a short story about a lighthouse.");
    let alone = drain(e.generate(job(good.clone(), 24)).unwrap()).await.unwrap();

    let mut rx = e.generate(job(good, 24)).unwrap();
    let first = first_token(&mut rx).await;
    let bad = e.generate(job(vec![1, 2, 999_999], 8)).unwrap();
    let err = drain(bad).await.unwrap_err();
    assert!(matches!(&err, EngineError::Compute(m) if m.contains("999999") && m.contains("vocabulary")), "{err:?}");
    let mut batched = vec![first];
    batched.extend(drain(rx).await.unwrap());
    assert_eq!(batched, alone);
    until("the status to settle", || e.status().running == 0).await;
    let s = e.status();
    assert_eq!((s.completed, s.failed), (2, 1), "{s:?}");
}

/// A panic inside the engine thread (injected for a token id) ends the requests that were
/// running with an error saying so, instead of leaving their streams hanging; the engine
/// restarts and serves the next request exactly as before.
#[tokio::test]
async fn an_engine_panic_fails_the_running_requests_and_the_engine_restarts() {
    let poison = poison();
    let e = engine(|c| c.panic_on_token = Some(poison));
    let good = prompt("Name three colours.");
    let before = drain(e.generate(job(good.clone(), 16)).unwrap()).await.unwrap();
    let mut health = e.health();
    assert!(health.borrow_and_update().serving);

    let mut long = e.generate(job(prompt("Write a long story about a dragon."), 200)).unwrap();
    first_token(&mut long).await;
    let poisoned = e.generate(job(vec![poison, poison], 4)).unwrap();
    for rx in [long, poisoned] {
        let err = drain(rx).await.unwrap_err();
        assert!(matches!(&err, EngineError::Panicked(m) if m.contains("injected fault")), "{err:?}");
    }
    until("the restart", || e.health().borrow().restarts == 1 && e.health().borrow().serving).await;
    assert!(health.has_changed().unwrap(), "health watchers were told");
    assert_eq!(drain(e.generate(job(good, 16)).unwrap()).await.unwrap(), before);
    let s = e.status();
    assert_eq!((s.failed, s.restarts, s.serving), (2, 1, true), "{s:?}");
    assert!(e.health().borrow().last_panic.as_deref().is_some_and(|m| m.contains("injected fault")));
}

/// Five panics within a minute are a crash loop: the engine stops restarting, reports
/// NOT_SERVING, and refuses new work so a supervisor replaces the process.
#[tokio::test]
async fn a_crash_loop_leaves_the_engine_not_serving() {
    let poison = poison();
    let e = engine(|c| c.panic_on_token = Some(poison));
    for i in 0..5 {
        let err = drain(e.generate(job(vec![poison], 2)).unwrap()).await.unwrap_err();
        assert!(matches!(err, EngineError::Panicked(_)), "panic {i}: {err:?}");
    }
    until("the engine to give up", || !e.health().borrow().serving).await;
    assert_eq!(e.health().borrow().restarts, 5);
    let refused = e.generate(job(prompt("Hello"), 2)).unwrap_err();
    assert_eq!(refused, EngineError::Stopped);
    assert!(!e.status().serving);
}

/// `max_queue` counts requests waiting beyond the running batch: a burst of batch + queue
/// requests at an idle engine is admitted whole, and only the next one is refused.
#[tokio::test]
async fn a_burst_fills_the_batch_before_the_queue() {
    let e = engine(|c| {
        c.max_batch = 4;
        c.max_queue = 4;
    });
    let mut streams = Vec::new();
    for i in 0..8 {
        let rx = e.generate(job(prompt(&format!("Count from {i} to one hundred.")), 48));
        streams.push(rx.unwrap_or_else(|err| panic!("request {i} of the burst refused: {err}")));
    }
    let refused = e.generate(job(prompt("One more?"), 4)).unwrap_err();
    assert_eq!(refused, EngineError::QueueFull(4));
    for rx in streams {
        assert!(!drain(rx).await.unwrap().is_empty());
    }
    until("the status to settle", || e.status().running == 0).await;
    let s = e.status();
    assert_eq!((s.rejected, s.completed, s.failed), (1, 8, 0), "{s:?}");
}
