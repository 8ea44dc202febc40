//! Progress of the long listings (`sync`, `verify`): a line per listing,
//! redrawn in place, when a person watches (stderr is a terminal); a plain
//! line every 10 s otherwise, for logs. Counts per phase and the rate; the
//! total is not known ahead (AWS lists page by page), so there is no ETA.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the plain form prints.
const PLAIN_EVERY: Duration = Duration::from_secs(10);

/// The listings of one command.
pub struct Progress {
    bars: Option<MultiProgress>,
}

impl Progress {
    /// Bars when stderr is a terminal, plain lines otherwise.
    pub fn for_stderr() -> Arc<Progress> {
        let bars =
            std::io::stderr().is_terminal().then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Arc::new(Progress { bars })
    }

    pub fn listing(&self, label: &str) -> Arc<Listing> {
        let bar = self.bars.as_ref().map(|bars| {
            let bar = bars.add(ProgressBar::new_spinner());
            bar.set_style(
                ProgressStyle::with_template("{spinner} {prefix:.bold} {msg} [{elapsed}]").expect("a valid template"),
            );
            bar.set_prefix(label.to_string());
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        let now = Instant::now();
        let counts = Counts { started: now, printed: now, phases: Vec::new() };
        Arc::new(Listing { label: label.to_string(), bar, counts: Mutex::new(counts) })
    }
}

/// One listing's counts.
pub struct Listing {
    label: String,
    bar: Option<ProgressBar>,
    counts: Mutex<Counts>,
}

struct Counts {
    started: Instant,
    /// When the last plain line was printed.
    printed: Instant,
    /// Per phase, in the order first seen.
    phases: Vec<(&'static str, u64)>,
}

impl Listing {
    /// `n` more entities listed in `phase`.
    pub fn add(&self, phase: &'static str, n: u64) {
        let mut counts = self.counts.lock().expect("progress lock");
        match counts.phases.iter_mut().find(|(p, _)| *p == phase) {
            Some((_, count)) => *count += n,
            None => counts.phases.push((phase, n)),
        }
        let message = message(&counts.phases, counts.started.elapsed());
        match &self.bar {
            Some(bar) => bar.set_message(message),
            None if counts.printed.elapsed() >= PLAIN_EVERY => {
                counts.printed = Instant::now();
                eprintln!("{}: {message}", self.label);
            }
            None => {}
        }
    }

    /// The listing is complete.
    pub fn finish(&self) {
        let counts = self.counts.lock().expect("progress lock");
        let message = format!("{} (done)", message(&counts.phases, counts.started.elapsed()));
        match &self.bar {
            Some(bar) => bar.finish_with_message(message),
            None => eprintln!("{}: {message}", self.label),
        }
    }
}

fn message(phases: &[(&'static str, u64)], elapsed: Duration) -> String {
    let total: u64 = phases.iter().map(|(_, n)| n).sum();
    let parts: Vec<String> = phases.iter().map(|(phase, n)| format!("{phase} {n}")).collect();
    let rate = total as f64 / elapsed.as_secs_f64().max(0.001);
    format!("{} · {rate:.0} entities/s", parts.join(" · "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_per_phase_in_the_order_seen() {
        let progress = Progress { bars: None };
        let listing = progress.listing("sync us-east-1");
        listing.add("types", 3);
        listing.add("things", 100);
        listing.add("things", 50);
        let counts = listing.counts.lock().unwrap();
        let text = message(&counts.phases, Duration::from_secs(1));
        assert_eq!(text, "types 3 · things 150 · 153 entities/s");
    }
}
