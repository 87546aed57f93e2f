//! The sd_notify protocol (READY, STATUS, RELOADING, STOPPING, WATCHDOG) through the
//! `sd-notify` crate: a datagram to `$NOTIFY_SOCKET`, no libsystemd. Outside systemd every
//! call is a no-op.
//!
//! The sequence systemd sees from `run`:
//! `STATUS=` (per-site progress during the first pass) ... `READY=1` once every site has
//! been healed; `STATUS=` whenever a site starts or finishes a job; `WATCHDOG=1` every half
//! `WATCHDOG_USEC` from the start to the exit; on SIGHUP `RELOADING=1` +
//! `MONOTONIC_USEC`, then `READY=1` when the new config is in use (or was rejected);
//! on SIGTERM/SIGINT `STOPPING=1`, then, while a site is still at work that a stop does
//! not cut short (an activation's hooks and health check), `EXTEND_TIMEOUT_USEC=` for the
//! longest that work can still take, so systemd does not SIGKILL it halfway.

use std::sync::Mutex;
use std::time::Duration;

use sd_notify::NotifyState;

/// The last `STATUS=` line, re-sent with `READY=1` so the two never disagree.
static LAST_STATUS: Mutex<String> = Mutex::new(String::new());

/// True when running under systemd's notification protocol (`$NOTIFY_SOCKET` set).
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

fn send(states: &[NotifyState<'_>]) {
    if !enabled() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(reason = %e, "sd_notify failed");
    }
}

/// `READY=1`, with the current status line.
pub fn ready() {
    let line = LAST_STATUS.lock().map(|s| s.clone()).unwrap_or_default();
    if line.is_empty() {
        send(&[NotifyState::Ready]);
    } else {
        send(&[NotifyState::Ready, NotifyState::Status(&line)]);
    }
}

/// `STATUS=<line>` (one line: newlines would end the field).
pub fn status(line: &str) {
    let line = line.replace('\n', " ");
    if let Ok(mut last) = LAST_STATUS.lock() {
        if *last == line {
            return;
        }
        last.clone_from(&line);
    }
    send(&[NotifyState::Status(&line)]);
}

/// `RELOADING=1` with `MONOTONIC_USEC`, as Type=notify-reload expects.
pub fn reloading() {
    let usec = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| i128::from(t.tv_sec()) * 1_000_000 + i128::from(t.tv_nsec()) / 1000)
        .unwrap_or(0);
    send(&[
        NotifyState::Reloading,
        NotifyState::MonotonicUsec(usec),
        NotifyState::Status("reloading the config"),
    ]);
}

/// `STOPPING=1`.
pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: finishing or undoing in-flight work"),
    ]);
}

/// `EXTEND_TIMEOUT_USEC=`: the current state (here, stopping) may take `more` from now
/// before systemd gives up on it. Returns how much of `more` the message covers: the field
/// holds at most `u32::MAX` microseconds (about 71 minutes), so a longer wait needs the
/// message again before that runs out.
pub fn extend_timeout(more: Duration) -> Duration {
    let usec = u32::try_from(more.as_micros()).unwrap_or(u32::MAX);
    send(&[NotifyState::ExtendTimeoutUsec(usec)]);
    Duration::from_micros(u64::from(usec))
}

/// `WATCHDOG=1`.
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// Half the watchdog interval when systemd asked for pings (`WATCHDOG_USEC`, and
/// `WATCHDOG_PID` unset or ours).
pub fn watchdog_period() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Pings `WATCHDOG=1` every half `WATCHDOG_USEC` from a task of its own, so the pings
/// continue while the supervisor waits for a worker (a reload waits for the job in
/// progress, which may be a long hook): they prove the runtime is alive and not blocked.
/// Stops when dropped. Does nothing when systemd did not ask for pings.
pub struct Watchdog(Option<tokio::task::JoinHandle<()>>);

impl Watchdog {
    /// Starts pinging (the first ping is immediate). Call inside the tokio runtime.
    pub fn start() -> Watchdog {
        Watchdog(watchdog_period().map(|period| {
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    watchdog();
                }
            })
        }))
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}
