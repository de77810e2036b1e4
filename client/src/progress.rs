//! Progress of long calls on stderr. On a terminal, a bar drawn in place by indicatif; anywhere
//! else (a log file, CI, a pipe), one plain line when the stage changes and then at most one every
//! few seconds, so the log of an hour-long `persona eval` stays readable line by line.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// How often a progress line is written when stderr is not a terminal.
const LINE_EVERY: Duration = Duration::from_secs(5);

pub(crate) struct Progress {
    out: Out,
}

enum Out {
    Bar(ProgressBar),
    /// The stage and time of the last line written.
    Lines {
        stage: String,
        at: Option<Instant>,
    },
}

impl Progress {
    /// A bar on a terminal, lines otherwise.
    pub(crate) fn new() -> Self {
        Self::with_bar(std::io::stderr().is_terminal())
    }

    fn with_bar(bar: bool) -> Self {
        let out = if bar {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template("{prefix:<11} [{bar:30}] {pos:>5}/{len:<5} {msg}")
                .expect("the template is valid")
                .progress_chars("=> ");
            bar.set_style(style);
            Out::Bar(bar)
        } else {
            Out::Lines { stage: String::new(), at: None }
        };
        Self { out }
    }

    /// `done` of `total` in `stage`, with a free-form `detail` (elapsed time, ETA, loss …).
    pub(crate) fn update(&mut self, stage: &str, done: u64, total: u64, detail: &str) {
        if let Some(line) = self.line(stage, done, total, detail, Instant::now()) {
            eprintln!("{line}");
        }
    }

    /// What [`Self::update`] draws: the bar is redrawn in place (nothing to print); in line mode,
    /// the line to print now, if any — a new stage, the stage's end, or [`LINE_EVERY`] since the
    /// last line.
    fn line(&mut self, stage: &str, done: u64, total: u64, detail: &str, now: Instant) -> Option<String> {
        match &mut self.out {
            Out::Bar(bar) => {
                if bar.length() != Some(total) {
                    bar.set_length(total);
                }
                bar.set_prefix(stage.to_string());
                bar.set_position(done);
                bar.set_message(detail.to_string());
                None
            }
            Out::Lines { stage: last, at } => {
                let due = last != stage || done >= total || at.is_none_or(|t| now.duration_since(t) >= LINE_EVERY);
                if !due {
                    return None;
                }
                *last = stage.to_string();
                *at = Some(now);
                Some(format!("{stage} {done}/{total} {detail}").trim_end().to_string())
            }
        }
    }

    /// A line of its own on stderr, above the bar when there is one.
    pub(crate) fn println(&self, line: &str) {
        match &self.out {
            Out::Bar(bar) => bar.println(line),
            Out::Lines { .. } => eprintln!("{line}"),
        }
    }

    /// Leaves the bar as it is and moves on to a new line (before a result is printed, or an
    /// error).
    pub(crate) fn finish(&mut self) {
        if let Out::Bar(bar) = &self.out {
            bar.abandon();
        }
    }

    /// `elapsed` and `eta` seconds as the detail of a server's progress message.
    pub(crate) fn timed(&mut self, stage: &str, done: u32, total: u32, elapsed: f64, eta: f64) {
        self.update(stage, done.into(), total.into(), &format!("elapsed {elapsed:.1}s  eta {eta:.1}s"));
    }
}

impl Drop for Progress {
    /// The bar stays on screen as it last was, and what follows starts on a line of its own.
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Off a terminal: a line for each new stage and for the end of a stage, otherwise at most one
    /// every few seconds; never a carriage return.
    #[test]
    fn lines_come_at_stage_changes_ends_and_every_few_seconds() {
        let mut p = Progress::with_bar(false);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(p.line("rollouts", 1, 10, "eta 9s", at(0)).as_deref(), Some("rollouts 1/10 eta 9s"));
        assert_eq!(p.line("rollouts", 2, 10, "", at(1)), None);
        assert_eq!(p.line("rollouts", 3, 10, "", at(4)), None);
        assert_eq!(p.line("rollouts", 4, 10, "", at(5)).as_deref(), Some("rollouts 4/10"));
        assert_eq!(p.line("rollouts", 10, 10, "", at(6)).as_deref(), Some("rollouts 10/10"));
        assert_eq!(p.line("calibration", 1, 4, "", at(6)).as_deref(), Some("calibration 1/4"));
        assert_eq!(p.line("calibration", 2, 4, "", at(7)), None);
    }

    /// On a terminal the bar follows the updates and nothing is printed by hand.
    #[test]
    fn the_bar_follows_the_updates() {
        let mut p = Progress::with_bar(true);
        assert_eq!(p.line("sweep", 3, 568, "eta 10s", Instant::now()), None);
        let Out::Bar(bar) = &p.out else { panic!("a bar was asked for") };
        assert_eq!((bar.position(), bar.length()), (3, Some(568)));
        assert_eq!(bar.prefix(), "sweep");
    }
}
