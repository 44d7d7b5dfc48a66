//! Progress of long work: an indicatif bar with ETA on a terminal, and plain log lines (at most
//! one every few seconds, plus the last) when stderr is a file or a pipe, where a bar would draw
//! nothing.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Seconds between plain progress lines.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

pub struct Progress {
    name: String,
    bar: ProgressBar,
    /// `Some` when stderr is not a terminal: the last time a line was written.
    plain: Option<Mutex<Option<Instant>>>,
    started: Instant,
}

impl Progress {
    pub fn new(name: &str, total: u64) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let bar = if terminal {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {msg} (ETA {eta})")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_prefix(name.to_string());
            bar
        } else {
            ProgressBar::hidden()
        };
        bar.set_length(total);
        Self {
            name: name.to_string(),
            bar,
            plain: (!terminal).then(|| Mutex::new(None)),
            started: Instant::now(),
        }
    }

    pub fn set_position(&self, pos: u64) {
        self.bar.set_position(pos);
        self.plain_line(false);
    }

    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
        self.plain_line(false);
    }

    pub fn set_message(&self, msg: impl Into<String>) {
        self.bar.set_message(msg.into());
    }

    /// Lines printed while the bar is drawn appear above it.
    pub fn println(&self, line: &str) {
        if self.plain.is_some() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    pub fn finish(&self) {
        self.plain_line(true);
        self.bar.finish_and_clear();
    }

    fn plain_line(&self, last: bool) {
        let Some(state) = &self.plain else {
            return;
        };
        let mut at = state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if !last && at.is_some_and(|t| now - t < PLAIN_EVERY) {
            return;
        }
        *at = Some(now);
        let (pos, len) = (self.bar.position(), self.bar.length().unwrap_or(0));
        let elapsed = self.started.elapsed();
        let eta = (pos > 0 && pos < len).then(|| elapsed.mul_f64((len - pos) as f64 / pos as f64));
        let msg = self.bar.message();
        log::info!(
            "{}: {pos}/{len}{}{}{}",
            self.name,
            if msg.is_empty() {
                String::new()
            } else {
                format!(" {msg}")
            },
            format_args!(", {:.0} s", elapsed.as_secs_f64()),
            eta.map_or(String::new(), |e| format!(", about {:.0} s left", e.as_secs_f64()))
        );
    }
}
