//! A progress bar on stderr for long `--apply` runs, drawn only when stderr is a terminal.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

const WIDTH: usize = 30;
const REDRAW: Duration = Duration::from_millis(100);

pub struct Progress {
    enabled: bool,
    total: usize,
    done: usize,
    started: Instant,
    drawn: Option<Instant>,
}

impl Progress {
    /// `wanted`: the caller's choice (e.g. not with `--format json` to a pipe); also needs a terminal.
    pub fn new(wanted: bool) -> Self {
        Progress {
            enabled: wanted && std::io::stderr().is_terminal(),
            total: 0,
            done: 0,
            started: Instant::now(),
            drawn: None,
        }
    }

    pub fn add_total(&mut self, n: usize) {
        self.total += n;
        self.draw(false);
    }

    pub fn advance(&mut self, n: usize) {
        self.done += n;
        self.draw(false);
    }

    pub fn finish(&mut self) {
        if self.drawn.is_some() {
            self.draw(true);
            eprintln!();
        }
    }

    fn draw(&mut self, force: bool) {
        if !self.enabled || self.total == 0 || (!force && self.drawn.is_some_and(|d| d.elapsed() < REDRAW)) {
            return;
        }
        self.drawn = Some(Instant::now());
        eprint!("\r{}", bar(self.done, self.total, self.started.elapsed()));
        let _ = std::io::stderr().flush();
    }
}

/// `[#########.....................]  300/1000 writes  12.3 s`
pub fn bar(done: usize, total: usize, elapsed: Duration) -> String {
    let filled = (done.min(total) * WIDTH).checked_div(total).unwrap_or(WIDTH);
    format!(
        "[{}{}] {done:>6}/{total} writes to Stripe  {:.1} s",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled),
        elapsed.as_secs_f64()
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn bar_fills_proportionally() {
        let b = super::bar(15, 30, std::time::Duration::from_secs(2));
        assert!(b.starts_with(&format!("[{}{}]", "#".repeat(15), ".".repeat(15))), "{b}");
        assert!(b.contains("15/30"));
    }
}
