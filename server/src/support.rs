//! Small helpers that several modules need and none owns: the Unix time, the text of a caught
//! panic, and a task handle that aborts its task when dropped.

/// Seconds since the Unix epoch (0 if the clock is set before it).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// The message of a caught panic (`panic!` payloads are a `&str` or a `String`).
pub fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
        (Some(s), _) => (*s).to_string(),
        (_, Some(s)) => s.clone(),
        _ => "unknown panic".to_string(),
    }
}

/// Aborts its task when dropped: a watcher that must not outlive what it watches, or a stream's
/// producer whose client left.
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_payloads_read_as_text() {
        let caught = |f: fn()| std::panic::catch_unwind(f).unwrap_err();
        assert_eq!(panic_text(&*caught(|| panic!("plain"))), "plain");
        assert_eq!(panic_text(&*caught(|| panic!("formatted {}", 7))), "formatted 7");
        assert_eq!(panic_text(&*caught(|| std::panic::panic_any(3u8))), "unknown panic");
    }
}
