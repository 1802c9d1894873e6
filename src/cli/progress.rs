//! The command line's [`Progress`]: indicatif bars on a terminal; on a log (stderr not a
//! terminal: a background run, CI) a plain status line every 30 s and at the end of each phase,
//! so long work stays visible there too. Notes are printed above the bar.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use specauf::util::progress::{Progress, Unit};

const LOG_EVERY: Duration = Duration::from_secs(30);

pub struct Bars {
    tty: bool,
    state: Mutex<Phase>,
}

struct Phase {
    bar: ProgressBar,
    name: String,
    total: Option<u64>,
    unit: Unit,
    started: Instant,
    last_log: Instant,
    done: u64,
    status: String,
}

impl Bars {
    pub fn new() -> Self {
        let now = Instant::now();
        let idle = Phase {
            bar: ProgressBar::hidden(),
            name: String::new(),
            total: None,
            unit: Unit::Items,
            started: now,
            last_log: now,
            done: 0,
            status: String::new(),
        };
        Bars { tty: std::io::stderr().is_terminal(), state: Mutex::new(idle) }
    }
}

impl Default for Bars {
    fn default() -> Self {
        Self::new()
    }
}

fn style(name: &str, total: Option<u64>, unit: Unit) -> ProgressStyle {
    let counts = match unit {
        Unit::Bytes => "{bytes}/{total_bytes} {bytes_per_sec}",
        Unit::Tokens => "{pos}/{len} tok {per_sec}",
        Unit::Items => "{pos}/{len}",
    };
    let template = match total {
        Some(_) => format!("{name:>10} [{{bar:30}}] {counts} {{msg}} ({{elapsed}}, eta {{eta}})"),
        None => format!("{{spinner}} {name} {{msg}} ({{elapsed}})"),
    };
    ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> ")
}

impl Phase {
    fn log_line(&self) {
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        if self.total.is_none() {
            eprintln!("{}: {secs:.0} s {}", self.name, self.status);
            return;
        }
        let rate = self.done as f64 / secs;
        let total = self.total.map(|t| format!("/{t}")).unwrap_or_default();
        let eta = match self.total {
            Some(t) if rate > 0.0 => format!(", eta {:.0} s", t.saturating_sub(self.done) as f64 / rate),
            _ => String::new(),
        };
        eprintln!("{}: {}{total} in {secs:.0} s ({rate:.2}/s{eta}) {}", self.name, self.done, self.status);
    }
}

impl Progress for Bars {
    fn phase(&self, name: &str, total: Option<u64>, done: u64, unit: Unit) {
        let Ok(mut p) = self.state.lock() else { return };
        p.bar.finish_and_clear();
        let bar = if !self.tty {
            ProgressBar::hidden()
        } else if let Some(t) = total {
            ProgressBar::new(t)
        } else {
            let s = ProgressBar::new_spinner();
            s.enable_steady_tick(Duration::from_millis(120));
            s
        };
        bar.set_style(style(name, total, unit));
        bar.set_position(done);
        let now = Instant::now();
        *p = Phase { bar, name: name.to_string(), total, unit, started: now, last_log: now, done, status: String::new() };
    }

    fn update(&self, done: u64, status: &str) {
        let Ok(mut p) = self.state.lock() else { return };
        p.done = done;
        p.status = status.to_string();
        p.bar.set_position(done);
        p.bar.set_message(status.to_string());
        if !self.tty && p.last_log.elapsed() >= LOG_EVERY {
            p.last_log = Instant::now();
            p.log_line();
        }
    }

    fn note(&self, line: &str) {
        match self.state.lock() {
            Ok(p) if !p.bar.is_hidden() => p.bar.println(line),
            _ => eprintln!("{line}"),
        }
    }

    fn finish(&self, keep: bool) {
        let Ok(p) = self.state.lock() else { return };
        if keep {
            p.bar.finish();
        } else {
            p.bar.finish_and_clear();
        }
        if !self.tty && !p.name.is_empty() && p.unit != Unit::Bytes {
            p.log_line();
        }
    }
}
