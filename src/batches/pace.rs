//! How batch lines share the gateway's CPU with interactive traffic.
//!
//! The admission gate keeps batch lines out of the upstream slots interactive requests
//! need, but against a fast upstream a batch is CPU work (parsing, translating, storing
//! each result), and on the gateway's own cores it lengthens every interactive request's
//! wait for a thread. So while interactive requests are being served *and* the process
//! uses most of the CPU it may use, a batch runs one line at a time and rests after each
//! for as long as the line took: it gets at most about half of what it would take alone.
//! Otherwise (no interactive traffic, or a slow upstream that leaves the CPU idle) lines
//! run `[batches] concurrency` at a time. `[batches] yield_cpu = false` turns this off.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::telemetry::stats::LiveStats;

/// Interactive requests that finished this recently count as traffic being served.
const INTERACTIVE_WINDOW: Duration = Duration::from_secs(1);
/// How often the process's CPU use is read.
const CPU_WINDOW: Duration = Duration::from_millis(200);
/// The share of the CPU the process may use above which batch lines step back.
const CPU_BUSY: f64 = 0.6;
/// Linux reports process CPU time in ticks of 1/100 s (USER_HZ on every architecture).
const TICKS_PER_SEC: f64 = 100.0;

/// One batch run's pacing.
pub struct Pacer {
    /// Off: lines always run `[batches] concurrency` at a time.
    enabled: bool,
    /// Cores the process may run on (its affinity and cgroup quota).
    cores: f64,
    cpu: Mutex<CpuReading>,
    /// Lines of this batch started and not yet rested.
    running: AtomicUsize,
}

struct CpuReading {
    at: Instant,
    ticks: Option<u64>,
    busy: bool,
}

/// A line's turn: ends the line's count when dropped.
pub struct Turn<'a> {
    pacer: &'a Pacer,
    /// Whether the line must rest after running.
    pub paced: bool,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.pacer.running.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pacer {
    pub fn new(enabled: bool) -> Pacer {
        Pacer {
            enabled,
            cores: std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64),
            cpu: Mutex::new(CpuReading {
                at: Instant::now(),
                ticks: cpu_ticks(),
                busy: false,
            }),
            running: AtomicUsize::new(0),
        }
    }

    /// A turn for the next line, or `None` when it should wait: while stepping back for
    /// interactive traffic, only one line runs (or rests) at a time.
    pub fn turn(&self, stats: &LiveStats) -> Option<Turn<'_>> {
        let paced = self.enabled && stats.active_within(INTERACTIVE_WINDOW) && self.cpu_busy();
        if paced {
            self.running
                .compare_exchange(0, 1, Ordering::Relaxed, Ordering::Relaxed)
                .ok()?;
        } else {
            self.running.fetch_add(1, Ordering::Relaxed);
        }
        Some(Turn { pacer: self, paced })
    }

    /// Whether the process used more than [`CPU_BUSY`] of its cores over the last window.
    fn cpu_busy(&self) -> bool {
        let mut cpu = self.cpu.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = cpu.at.elapsed();
        if elapsed >= CPU_WINDOW {
            let now = cpu_ticks();
            if let (Some(before), Some(now)) = (cpu.ticks, now) {
                let used = now.saturating_sub(before) as f64 / TICKS_PER_SEC;
                cpu.busy = used / elapsed.as_secs_f64() / self.cores >= CPU_BUSY;
            }
            cpu.at = Instant::now();
            cpu.ticks = now;
        }
        cpu.busy
    }
}

/// The process's user and system CPU time so far, in ticks (`None` off Linux).
fn cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces: count fields after its closing ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ').skip(11); // field 14 (utime) is the 12th after ')'
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_and_grows() {
        let before = cpu_ticks().expect("/proc/self/stat");
        let started = Instant::now();
        let mut x = 0u64;
        while started.elapsed() < Duration::from_millis(100) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(cpu_ticks().unwrap() > before);
    }

    #[test]
    fn lines_run_freely_without_interactive_traffic() {
        let pacer = Pacer::new(true);
        let stats = LiveStats::default();
        let turns: Vec<_> = (0..8).map(|_| pacer.turn(&stats).unwrap()).collect();
        assert!(turns.iter().all(|t| !t.paced));
        drop(turns);
        assert_eq!(pacer.running.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn one_line_at_a_time_while_interactive_traffic_has_the_cpu() {
        let pacer = Pacer::new(true);
        pacer.cpu.lock().unwrap().busy = true;
        pacer.cpu.lock().unwrap().at = Instant::now();
        let stats = LiveStats::default();
        stats.record("chat", "m", Duration::from_millis(1), false);
        let first = pacer.turn(&stats).expect("the first line runs");
        assert!(first.paced);
        assert!(pacer.turn(&stats).is_none(), "the next one waits");
        drop(first);
        assert!(pacer.turn(&stats).is_some());
    }
}
