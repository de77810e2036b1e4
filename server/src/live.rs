//! The live feed of monitored traffic: every generation that asked for monitors publishes one
//! event per token (its scores) and one when it ends (the per-monitor summary with alerts), and
//! every MonitorStream item one event with its projections. The
//! console's Monitor view reads it over `GET /api/live`: the recent backlog first, then new
//! events as they happen. Events are JSON encoded once, when published; a subscriber that falls
//! behind skips the events it missed.

use serde_json::{Value, json};
use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::broadcast;

/// How many recent events a new subscriber receives first.
const BACKLOG: usize = 2000;

pub struct LiveFeed {
    tx: broadcast::Sender<std::sync::Arc<str>>,
    recent: Mutex<VecDeque<std::sync::Arc<str>>>,
    next_request: AtomicU64,
}

impl Default for LiveFeed {
    fn default() -> Self {
        Self { tx: broadcast::channel(4096).0, recent: Mutex::new(VecDeque::new()), next_request: AtomicU64::new(1) }
    }
}

impl LiveFeed {
    /// A number that tells one request's events from another's.
    pub fn request_id(&self) -> u64 {
        self.next_request.fetch_add(1, Ordering::Relaxed)
    }

    /// Publishes `event` with the time (Unix milliseconds) added.
    pub fn publish(&self, mut event: Value) {
        let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        event["t"] = json!(ms as u64);
        let text: std::sync::Arc<str> = event.to_string().into();
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == BACKLOG {
            recent.pop_front();
        }
        recent.push_back(text.clone());
        // Sent under the lock, so a subscriber sees every event once: in the backlog or live.
        let _ = self.tx.send(text);
    }

    /// The backlog and a receiver of everything published after it.
    pub fn subscribe(&self) -> (Vec<std::sync::Arc<str>>, broadcast::Receiver<std::sync::Arc<str>>) {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        (recent.iter().cloned().collect(), self.tx.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn subscribers_get_the_backlog_then_new_events_once() {
        let feed = LiveFeed::default();
        for i in 0..BACKLOG + 5 {
            feed.publish(json!({"i": i}));
        }
        let (backlog, mut rx) = feed.subscribe();
        assert_eq!(backlog.len(), BACKLOG);
        let first: Value = serde_json::from_str(&backlog[0]).unwrap();
        assert_eq!(first["i"], 5);
        assert!(first["t"].as_u64().unwrap() > 0);
        feed.publish(json!({"i": "new"}));
        let next: Value = serde_json::from_str(&rx.recv().await.unwrap()).unwrap();
        assert_eq!(next["i"], "new");
        assert!(rx.try_recv().is_err());
    }
}
