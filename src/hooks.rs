//! Running the site's hooks: argv arrays (no shell), cwd = the release, a clean
//! environment plus the documented variables, bounded by `hook_timeout`. The hook runs in
//! its own process group so that at the limit the whole group is killed, not just the
//! first process (a `sh -c` wrapper would otherwise leave its children running). When the
//! first process ends by itself, what it left in the group gets SIGTERM, then SIGKILL
//! after the grace: only a daemon that detached (`setsid`) outlives its hook.
//!
//! A keeper killed outright takes the hook's first process with it (`PR_SET_PDEATHSIG`),
//! not what that process started. So while a hook runs, its process group is noted in the
//! site's state (`HookEnv::record`), and whoever next holds the site's lock (the healing
//! pass at the restart, or the next hook) kills what is left of that group before anything
//! runs the hook again: a redone activation must not run a migration beside the one it
//! redoes.

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// How long a hook that reached `hook_timeout` has, after SIGTERM, to finish before
/// SIGKILL (as systemd gives a service): a migration may want to roll its transaction back.
/// Never more than the timeout itself (`grace`).
const TERM_GRACE: Duration = Duration::from_secs(5);

/// The grace after SIGTERM of a hook bounded by `timeout`.
fn grace(timeout: Duration) -> Duration {
    TERM_GRACE.min(timeout)
}

/// The longest one run of a hook bounded by `timeout` can take: the timeout, then the
/// grace after SIGTERM.
pub fn bound(timeout: Duration) -> Duration {
    timeout.saturating_add(grace(timeout))
}

/// Bytes of stderr/stdout kept for the log.
const TAIL_BYTES: usize = 2048;

/// The fixed `PATH` hooks run with; a program named without a `/` is looked up in it.
pub const HOOK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The variables a hook sees (besides a fixed PATH).
#[derive(Debug, Clone)]
pub struct HookEnv {
    /// `RELEASE_ID`.
    pub release_id: String,
    /// `RELEASE_PATH`: absolute path of `releases/<id>`.
    pub release_path: PathBuf,
    /// `PREVIOUS_RELEASE_ID` (empty when none).
    pub previous: Option<String>,
    /// `SITE_NAME`.
    pub site_name: String,
    /// `SITE_ROOT`.
    pub site_root: PathBuf,
    /// Run as this user (config `hook_user`; needs the service to run as root).
    pub user: Option<String>,
    /// Where the running hook's process group is noted (`Site::hook_record`).
    pub record: Option<PathBuf>,
}

/// How a hook ended when it did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookFailure {
    /// Which hook (`before_activate`, `after_activate`, `health_check`).
    pub hook: String,
    /// Exit status text (`exit status 3`, `killed by signal 9`, `timed out after 5s`, `cannot start: ...`).
    pub status: String,
    /// The end of its stderr (or stdout when stderr is empty).
    pub stderr_tail: String,
}

impl std::fmt::Display for HookFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed: {}", self.hook, self.status)?;
        if !self.stderr_tail.is_empty() {
            write!(f, ": {}", self.stderr_tail.trim_end())?;
        }
        Ok(())
    }
}

/// The end of one of the hook's output pipes. The pipe is non-blocking and read from the
/// waiting loop as `poll(2)` says it holds data, not by a thread reading to EOF: a
/// descendant that left the process group (`setsid`, a daemon launcher) keeps its copy of
/// the pipe open after the hook exits or is killed, and waiting for EOF would hold the
/// keeper (and the site's lock) for as long as that process lives, far past
/// `hook_timeout`. Only the last `TAIL_BYTES` are kept, however much the hook writes.
struct Tail {
    pipe: Option<std::fs::File>,
    bytes: Vec<u8>,
}

/// Bytes asked for by one read: a whole default pipe buffer, so a chatty hook's pipe is
/// emptied by one call.
const READ_CHUNK: usize = 64 * 1024;

/// Reads `Tail::finish` makes at most: enough for what a pipe can hold (1 MiB by
/// default), and a bound against a detached writer that never stops.
const FINAL_READS: usize = 32;

impl Tail {
    fn new(pipe: Option<std::os::fd::OwnedFd>) -> Tail {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let pipe = pipe.and_then(|fd| {
            // A pipe that cannot be made non-blocking is dropped (its output is lost, the
            // hook then gets EPIPE) rather than risking a read that never returns.
            fcntl(&fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
                .ok()
                .map(|_| std::fs::File::from(fd))
        });
        Tail {
            pipe,
            bytes: Vec::new(),
        }
    }

    /// Reads once from the pipe, keeping the last `TAIL_BYTES`; true when it got bytes
    /// (false: empty now, or closed and dropped). One read, not "until empty", so a hook
    /// that writes without end cannot keep the loop from its deadline.
    fn read_once(&mut self, buf: &mut [u8]) -> bool {
        let Some(pipe) = self.pipe.as_mut() else {
            return false;
        };
        loop {
            match pipe.read(buf) {
                Ok(0) => {
                    self.pipe = None;
                    return false;
                }
                Ok(n) => {
                    self.keep(&buf[..n]);
                    return true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(_) => {
                    self.pipe = None;
                    return false;
                }
            }
        }
    }

    /// Appends the end of `chunk`; trims in batches so the kept bytes are not moved at
    /// every read.
    fn keep(&mut self, chunk: &[u8]) {
        let chunk = &chunk[chunk.len().saturating_sub(TAIL_BYTES)..];
        self.bytes.extend_from_slice(chunk);
        if self.bytes.len() > TAIL_BYTES * 2 {
            self.bytes.drain(..self.bytes.len() - TAIL_BYTES);
        }
    }

    /// What was read, as text, after reading what the pipe still holds (bounded); closes
    /// the pipe (a detached writer gets EPIPE from now on).
    fn finish(mut self, buf: &mut [u8]) -> String {
        for _ in 0..FINAL_READS {
            if !self.read_once(buf) {
                break;
            }
        }
        self.pipe = None;
        if self.bytes.len() > TAIL_BYTES {
            self.bytes.drain(..self.bytes.len() - TAIL_BYTES);
        }
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// Waits up to `wait` for output on the pipes still open, and reads once from each that
/// has some (or was closed). Returns at once when there is output: the hook is never left
/// blocked on a full pipe while the keeper sleeps. With no pipe open, just sleeps.
fn wait_for_output(tails: &mut [&mut Tail], buf: &mut [u8], wait: Duration) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let ready: Vec<bool> = {
        let mut fds: Vec<PollFd<'_>> = tails
            .iter()
            .filter_map(|t| t.pipe.as_ref())
            .map(|p| PollFd::new(p.as_fd(), PollFlags::POLLIN))
            .collect();
        if fds.is_empty() {
            std::thread::sleep(wait);
            return;
        }
        let timeout = PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, timeout) {
            Ok(n) if n > 0 => fds
                .iter()
                .map(|fd| fd.revents().is_some_and(|r| !r.is_empty()))
                .collect(),
            // Timed out, or interrupted by a signal: the caller looks at the hook again.
            _ => return,
        }
    };
    // `ready` is in the order of the open pipes, which is the order of `tails` skipping
    // the closed ones.
    let mut ready = ready.into_iter();
    for tail in tails.iter_mut().filter(|t| t.pipe.is_some()) {
        if ready.next().unwrap_or(false) {
            // POLLHUP/POLLERR/POLLNVAL too: the read then finds EOF or an error and drops
            // the pipe, so it is not polled again.
            tail.read_once(buf);
        }
    }
}

fn status_text(st: ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "unknown status".into(),
    }
}

/// Process group of the hook running now (0: none), for `forward_interrupts`.
static RUNNING_GROUP: AtomicI32 = AtomicI32::new(0);

/// For a command run from a terminal or a script (not the service, which finishes or
/// undoes its work on a signal): SIGINT, SIGTERM and SIGHUP are passed on to the running
/// hook, then end the command as they would have. A hook runs in a process group of its
/// own, which Ctrl-C at the terminal does not reach: an interrupted `activate` left its
/// `before_activate` (a migration) running on, orphaned, with nothing to record how it
/// ended. What the interruption leaves in the journal is resolved like a crash.
///
/// `note` gives, for each of those signals, the line written to stderr as the command
/// ends (an interrupted `activate` otherwise ended without a word, `current` possibly
/// switched and unchecked); it is made now, since the handler cannot format anything.
pub fn forward_interrupts(note: impl Fn(Signal) -> Vec<u8>) {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet};
    let _ = INTERRUPT_NOTES.set(INTERRUPTS.map(note));
    let action = SigAction::new(
        SigHandler::Handler(on_interrupt),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in INTERRUPTS {
        // SAFETY: the handler only makes async-signal-safe calls (atomic loads, kill,
        // write, signal, raise).
        let old = unsafe { sigaction(sig, &action) };
        // An ignored signal stays ignored (`nohup`, a background job of a script): it
        // would not have ended the command, so it must not end the hook either.
        if let Some(old) = old
            .ok()
            .filter(|o| matches!(o.handler(), SigHandler::SigIgn))
        {
            // SAFETY: restores the disposition the process was started with.
            let _ = unsafe { sigaction(sig, &old) };
        }
    }
}

/// The signals `forward_interrupts` handles.
const INTERRUPTS: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

/// The lines `on_interrupt` writes, in the order of `INTERRUPTS`.
static INTERRUPT_NOTES: std::sync::OnceLock<[Vec<u8>; 3]> = std::sync::OnceLock::new();

extern "C" fn on_interrupt(sig: libc::c_int) {
    let group = RUNNING_GROUP.load(Ordering::SeqCst);
    let note = INTERRUPT_NOTES.get().and_then(|notes| {
        INTERRUPTS
            .iter()
            .position(|s| *s as libc::c_int == sig)
            .map(|i| &notes[i])
    });
    // SAFETY: kill, write, signal and raise are async-signal-safe; the note is a buffer
    // made before the handler was installed, only read here.
    unsafe {
        if group > 0 {
            libc::kill(-group, sig);
        }
        if let Some(n) = note {
            libc::write(2, n.as_ptr().cast(), n.len());
        }
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// Runs `argv` for hook `name`; `Ok(())` on exit status 0.
pub fn run(
    name: &str,
    argv: &[String],
    env: &HookEnv,
    timeout: Duration,
) -> Result<(), HookFailure> {
    let fail = |status: String, tail: String| HookFailure {
        hook: name.to_string(),
        status,
        stderr_tail: tail,
    };
    let Some((program, args)) = argv.split_first() else {
        return Err(fail("empty command".into(), String::new()));
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(&env.release_path)
        .env_clear()
        .env("PATH", HOOK_PATH)
        .env("LANG", "C.UTF-8")
        .env("RELEASE_ID", &env.release_id)
        .env("RELEASE_PATH", &env.release_path)
        .env("PREVIOUS_RELEASE_ID", env.previous.as_deref().unwrap_or(""))
        .env("SITE_NAME", &env.site_name)
        .env("SITE_ROOT", &env.site_root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // A keeper killed outright (-9, the OOM killer) outside systemd, whose cgroup would
    // otherwise take the hook with it, must not leave the hook running beside the one its
    // restart runs again (two migrations at once). The kernel kills the hook when the
    // thread that started it dies, and that thread waits here until the hook has ended.
    let keeper = std::process::id();
    // SAFETY: between fork and exec the closure makes only async-signal-safe calls
    // (prctl, getppid) and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Died before the prctl: nobody waits for this hook any more.
            if libc::getppid() as u32 != keeper {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    if let Some(name) = &env.user {
        let user = match nix::unistd::User::from_name(name) {
            Ok(Some(u)) => u,
            Ok(None) => {
                return Err(fail(
                    format!("hook_user {name:?} does not exist"),
                    String::new(),
                ))
            }
            Err(e) => {
                return Err(fail(
                    format!("cannot look up hook_user {name:?}: {e}"),
                    String::new(),
                ))
            }
        };
        let euid = nix::unistd::geteuid();
        if !euid.is_root() && euid != user.uid {
            return Err(fail(
                format!("hook_user {name:?} needs the service to run as root"),
                String::new(),
            ));
        }
        // std drops supplementary groups (setgroups(0)) when root sets a uid.
        cmd.uid(user.uid.as_raw())
            .gid(user.gid.as_raw())
            .env("HOME", &user.dir)
            .env("USER", name)
            .env("LOGNAME", name);
    }
    if let Some(record) = &env.record {
        reap_and_log(record, &env.site_name);
    }
    let mut child: Child = cmd
        .spawn()
        .map_err(|e| fail(format!("cannot start {program:?}: {e}"), String::new()))?;
    let mut out = Tail::new(child.stdout.take().map(std::os::fd::OwnedFd::from));
    let mut err = Tail::new(child.stderr.take().map(std::os::fd::OwnedFd::from));
    let pgid = Pid::from_raw(child.id() as i32);
    let noted = env
        .record
        .as_deref()
        .filter(|record| note_group(record, name, pgid, &env.site_name));
    RUNNING_GROUP.store(pgid.as_raw(), Ordering::SeqCst);
    let deadline = Instant::now() + timeout;
    // Set once SIGTERM was sent at the deadline; SIGKILL follows at this instant.
    let mut kill_at: Option<Instant> = None;
    let timed_out = || format!("timed out after {}", crate::clock::format_duration(timeout));
    let mut buf = vec![0u8; READ_CHUNK];
    let status = loop {
        let now = Instant::now();
        match child.try_wait() {
            Ok(Some(_)) if kill_at.is_some() => break Err(timed_out()),
            Ok(Some(st)) => break Ok(st),
            Ok(None) if kill_at.is_some_and(|at| now >= at) => {
                let _ = killpg(pgid, Signal::SIGKILL);
                let _ = child.wait();
                break Err(format!(
                    "{}; killed (SIGKILL) {} after SIGTERM",
                    timed_out(),
                    crate::clock::format_duration(grace(timeout))
                ));
            }
            Ok(None) if kill_at.is_none() && now >= deadline => {
                let _ = killpg(pgid, Signal::SIGTERM);
                kill_at = Some(now + grace(timeout));
            }
            // The exit is looked for at least every 10 ms; output wakes the loop sooner,
            // so a chatty hook is read as fast as it writes.
            Ok(None) => wait_for_output(
                &mut [&mut out, &mut err],
                &mut buf,
                Duration::from_millis(10),
            ),
            Err(e) => break Err(format!("cannot wait: {e}")),
        }
    };
    // Stray members of the group must not outlive the hook (a daemon must detach with
    // `setsid` to survive it). A hook that ended by itself left them no warning yet: they
    // get SIGTERM and the grace, as at the timeout, so a background job can finish its
    // write; one killed at the timeout already had both.
    let leftovers = match &status {
        Ok(_) => stop_leftovers(pgid, grace(timeout), &mut [&mut out, &mut err], &mut buf),
        Err(_) => {
            let _ = killpg(pgid, Signal::SIGKILL);
            Leftovers::None
        }
    };
    RUNNING_GROUP.store(0, Ordering::SeqCst);
    if let Some(record) = noted {
        // Left behind only if this fails: the group is gone, so reaping finds nothing.
        let _ = std::fs::remove_file(record);
    }
    // The hook has ended: what it wrote is in the pipes now. A detached descendant may
    // still hold them open; its later output is not the hook's and is not waited for.
    let stdout = out.finish(&mut buf);
    let stderr = err.finish(&mut buf);
    let tail = if stderr.trim().is_empty() {
        stdout.clone()
    } else {
        stderr.clone()
    };
    match status {
        Ok(st) if st.success() => {
            tracing::debug!(event = crate::events::HOOK_SUCCEEDED, site = %env.site_name, hook = name, release = %env.release_id, stdout = %stdout.trim_end(),
                stderr = %stderr.trim_end(), leftovers = leftovers.as_str(), "hook succeeded");
            Ok(())
        }
        Ok(st) => Err(fail(status_text(st), tail)),
        Err(s) => Err(fail(s, tail)),
    }
}

/// What was still running in a hook's process group after its first process exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leftovers {
    /// Nothing.
    None,
    /// Processes that ended on SIGTERM within the grace.
    Terminated,
    /// Processes still running at the end of the grace, then killed.
    Killed,
}

impl Leftovers {
    fn as_str(self) -> &'static str {
        match self {
            Leftovers::None => "none",
            Leftovers::Terminated => "stopped by SIGTERM",
            Leftovers::Killed => "killed (SIGKILL) after SIGTERM",
        }
    }
}

/// Stops what is left in group `pgid` once its first process has exited: SIGTERM, up to
/// `grace` for it to end, then SIGKILL. The pipes are read meanwhile, so a leftover
/// blocked on a full one can still reach its handler and exit.
fn stop_leftovers(
    pgid: Pid,
    grace: Duration,
    tails: &mut [&mut Tail],
    buf: &mut [u8],
) -> Leftovers {
    // ESRCH: no process is in the group, the usual case, which costs this one call.
    if killpg(pgid, Signal::SIGTERM).is_err() {
        return Leftovers::None;
    }
    let until = Instant::now() + grace;
    loop {
        reap_group(pgid);
        // Signal 0 only asks whether any process is still in the group.
        if killpg(pgid, None).is_err() {
            return Leftovers::Terminated;
        }
        if Instant::now() >= until {
            let _ = killpg(pgid, Signal::SIGKILL);
            reap_group(pgid);
            return Leftovers::Killed;
        }
        wait_for_output(tails, buf, Duration::from_millis(10));
    }
}

/// Reaps the group's processes that ended and were this process's children: the keeper
/// running as PID 1 (a container without an init) inherits the hook's orphans, whose
/// zombies would otherwise keep the group looking alive for the whole grace.
fn reap_group(pgid: Pid) {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    while let Ok(st) = waitpid(Pid::from_raw(-pgid.as_raw()), Some(WaitPidFlag::WNOHANG)) {
        if st == WaitStatus::StillAlive {
            break;
        }
    }
}

/// A hook's process group as noted while it runs: `<boot id> <group> <start> <hook>`, the
/// start time being its first process's (`/proc/<pid>/stat`, ticks since boot).
#[derive(Debug, Clone, PartialEq, Eq)]
struct GroupNote {
    boot: String,
    group: i32,
    started: u64,
    hook: String,
}

impl GroupNote {
    fn line(&self) -> String {
        format!(
            "{} {} {} {}\n",
            self.boot, self.group, self.started, self.hook
        )
    }

    /// The group as reaping names it: `<hook> (process group <n>)`.
    fn named(&self) -> String {
        format!("{} (process group {})", self.hook, self.group)
    }

    fn parse(text: &str) -> Option<GroupNote> {
        let mut f = text.split_whitespace();
        let note = GroupNote {
            boot: f.next()?.to_string(),
            group: f.next()?.parse().ok().filter(|g| *g > 1)?,
            started: f.next()?.parse().ok()?,
            hook: f.next()?.to_string(),
        };
        f.next().is_none().then_some(note)
    }
}

fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && !s.contains(char::is_whitespace))
}

/// When process `pid` started, in clock ticks since boot (field 22 of `/proc/<pid>/stat`).
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields are counted after the command name, which may hold spaces and ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Notes the group of the hook just started; false (logged) when it cannot, and the hook
/// runs anyway: the note only matters if this keeper is killed while the hook runs.
fn note_group(record: &Path, hook: &str, group: Pid, site: &str) -> bool {
    let note = boot_id()
        .zip(start_time(group.as_raw()))
        .map(|(boot, started)| GroupNote {
            boot,
            group: group.as_raw(),
            started,
            hook: hook.to_string(),
        });
    let written = match note {
        Some(n) => crate::fsops::write_atomic_unsynced(record, n.line().as_bytes()),
        None => Err(crate::error::Error::Failed(
            "cannot read the boot id or the hook's start time from /proc".into(),
        )),
    };
    if let Err(e) = &written {
        tracing::warn!(event = crate::events::SITE_ERROR, site, hook, path = %record.display(), reason = %e,
            "cannot note the hook's process group; if this keeper is killed, what the hook started is not cleaned up");
    }
    written.is_ok()
}

/// Kills what is left of a hook noted in `record` by a keeper that was killed while it ran
/// (in a dry run, only says so), and forgets the note. Returns what it killed, as
/// `<hook> (process group <n>)`. The caller holds the site's operation lock, under which
/// every hook of the site runs: a note found then is never of a hook running now.
///
/// The group is killed only when it is the noted one: its first process is gone (the
/// kernel never gives its number to a new process while the group still has members) or
/// is still the one noted (same start time, this boot: a setuid program such as `sudo`
/// clears `PR_SET_PDEATHSIG`, so it may outlive its keeper).
pub fn reap_leftovers(record: &Path, dry_run: bool) -> Option<String> {
    let text = std::fs::read_to_string(record).ok()?;
    let found = GroupNote::parse(&text).filter(|n| {
        Some(&n.boot) == boot_id().as_ref()
            && start_time(n.group).is_none_or(|started| started == n.started)
            // Signal 0 only asks whether any process is still in the group.
            && killpg(Pid::from_raw(n.group), None).is_ok()
    });
    if dry_run {
        return found.as_ref().map(GroupNote::named);
    }
    let killed = found.filter(|n| killpg(Pid::from_raw(n.group), Signal::SIGKILL).is_ok());
    let _ = std::fs::remove_file(record);
    killed.as_ref().map(GroupNote::named)
}

/// `reap_leftovers` before a hook starts, logged as healing.
fn reap_and_log(record: &Path, site: &str) {
    if let Some(what) = reap_leftovers(record, false) {
        tracing::info!(event = crate::events::HEAL_REPAIRED, site, what = %format!("killed what was left of {what}"),
            reason = LEFTOVER_REASON, "repaired");
    }
}

/// Why `reap_leftovers` kills: logged by both its callers.
pub const LEFTOVER_REASON: &str =
    "processes a hook started were still running after their keeper was killed";

/// Absolute form of a release path for `RELEASE_PATH`.
pub fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(dir: &Path) -> HookEnv {
        HookEnv {
            release_id: "r1".into(),
            release_path: dir.to_path_buf(),
            previous: Some("r0".into()),
            site_name: "s".into(),
            site_root: dir.to_path_buf(),
            user: None,
            record: None,
        }
    }

    fn sh(script: &str) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into(), script.into()]
    }

    #[test]
    fn env_and_cwd_reach_the_hook() {
        let d = tempfile::tempdir().unwrap();
        run(
            "t",
            &sh("test \"$RELEASE_ID\" = r1 && test \"$PREVIOUS_RELEASE_ID\" = r0 && test \"$(pwd)\" = \"$RELEASE_PATH\" && test -z \"$HOME\""),
            &env(d.path()),
            Duration::from_secs(5),
        )
        .unwrap();
    }

    #[test]
    fn hook_user_drops_privileges() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            d.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let mut e = env(d.path());
        e.user = Some("nobody".into());
        run(
            "t",
            &sh("test \"$(id -u)\" = 65534 && test \"$USER\" = nobody"),
            &e,
            Duration::from_secs(5),
        )
        .unwrap();
        e.user = Some("no-such-user-rk".into());
        let f = run("t", &sh("true"), &e, Duration::from_secs(5)).unwrap_err();
        assert!(f.status.contains("does not exist"), "{}", f.status);
    }

    #[test]
    fn failure_carries_status_and_stderr_tail() {
        let d = tempfile::tempdir().unwrap();
        let f = run(
            "health_check",
            &sh("echo boom >&2; exit 3"),
            &env(d.path()),
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert_eq!(f.status, "exit status 3");
        assert_eq!(f.stderr_tail.trim(), "boom");
    }

    #[test]
    fn timeout_kills_the_whole_group() {
        let d = tempfile::tempdir().unwrap();
        let marker = d.path().join("survived");
        let script = format!("(sleep 1; touch {}) & sleep 30", marker.display());
        let t0 = Instant::now();
        let f = run(
            "t",
            &sh(&script),
            &env(d.path()),
            Duration::from_millis(200),
        )
        .unwrap_err();
        assert!(f.status.starts_with("timed out"), "{}", f.status);
        assert!(t0.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(1500));
        assert!(!marker.exists(), "a child of the hook outlived the timeout");
    }

    #[test]
    fn at_the_timeout_a_hook_gets_sigterm_then_sigkill() {
        let d = tempfile::tempdir().unwrap();
        let said = d.path().join("term");
        // Cleans up when told: the trap runs, and the run still counts as timed out.
        let script = format!(
            "trap 'echo cleaned > {}; exit 0' TERM; sleep 30 & wait",
            said.display()
        );
        let f = run(
            "t",
            &sh(&script),
            &env(d.path()),
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert_eq!(f.status, "timed out after 300ms", "{}", f.status);
        assert_eq!(
            std::fs::read_to_string(&said).unwrap_or_default(),
            "cleaned\n"
        );

        // Ignores it: killed once the grace (here the timeout itself, under 5 s) is over.
        let t0 = Instant::now();
        let f = run(
            "t",
            &sh("trap '' TERM; sleep 30 & wait; wait"),
            &env(d.path()),
            Duration::from_millis(300),
        )
        .unwrap_err();
        let took = t0.elapsed();
        assert!(f.status.contains("SIGKILL"), "{}", f.status);
        assert!(
            took >= Duration::from_millis(600) && took < Duration::from_secs(3),
            "{took:?}"
        );
        assert_eq!(bound(Duration::from_secs(60)), Duration::from_secs(65));
        assert_eq!(bound(Duration::from_secs(2)), Duration::from_secs(4));
    }

    #[test]
    fn a_detached_descendant_holding_the_pipes_is_not_waited_for() {
        let d = tempfile::tempdir().unwrap();
        let pid = d.path().join("pid");
        // The detached sleep outlives the hook by design; the test ends it.
        let reap = || {
            if let Ok(p) = std::fs::read_to_string(&pid) {
                if let Ok(p) = p.trim().parse::<i32>() {
                    let _ = nix::sys::signal::kill(Pid::from_raw(p), Signal::SIGKILL);
                }
            }
        };
        let script = format!(
            "echo visible; setsid sh -c 'echo $$ > {}; exec sleep 20' & sleep 0.2",
            pid.display()
        );
        let t0 = Instant::now();
        let r = run("t", &sh(&script), &env(d.path()), Duration::from_secs(10));
        let took = t0.elapsed();
        reap();
        r.unwrap();
        assert!(took < Duration::from_secs(5), "took {took:?}");

        // Killed at the limit: the failure still carries what the hook wrote.
        let script = format!(
            "echo before-hang >&2; setsid sh -c 'echo $$ > {}; exec sleep 20' & sleep 30",
            pid.display()
        );
        let t0 = Instant::now();
        let f = run(
            "t",
            &sh(&script),
            &env(d.path()),
            Duration::from_millis(500),
        );
        let took = t0.elapsed();
        reap();
        let f = f.unwrap_err();
        assert!(f.status.starts_with("timed out"), "{}", f.status);
        assert_eq!(f.stderr_tail.trim(), "before-hang");
        assert!(took < Duration::from_secs(5), "took {took:?}");
    }

    #[test]
    fn output_without_end_neither_outlasts_the_timeout_nor_holds_the_keeper() {
        let d = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let f = run(
            "t",
            &sh("exec yes"),
            &env(d.path()),
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(f.status.starts_with("timed out"), "{}", f.status);
        assert!(f.stderr_tail.len() <= TAIL_BYTES, "{}", f.stderr_tail.len());
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());

        // A detached writer that never stops: what is left in the pipe is read, boundedly.
        let pid = d.path().join("pid");
        let script = format!(
            "setsid sh -c 'echo $$ > {}; exec yes' & sleep 0.2",
            pid.display()
        );
        let t0 = Instant::now();
        let r = run("t", &sh(&script), &env(d.path()), Duration::from_secs(10));
        let took = t0.elapsed();
        if let Some(p) = std::fs::read_to_string(&pid)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        r.unwrap();
        assert!(took < Duration::from_secs(3), "took {took:?}");
    }

    #[test]
    fn leftovers_of_a_finished_hook_get_sigterm_then_sigkill() {
        let d = tempfile::tempdir().unwrap();
        let said = d.path().join("term");
        let pid = d.path().join("pid");
        let pid_of = || {
            std::fs::read_to_string(&pid)
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
        };
        let gone = |p: i32| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .map(|s| {
                    s.rsplit(')')
                        .next()
                        .unwrap_or("")
                        .trim_start()
                        .starts_with('Z')
                })
                .unwrap_or(true)
        };
        // Waited for: SIGKILL is delivered asynchronously, and the process may still show
        // as running for a moment after `kill` returned.
        let ends = |p: i32| {
            let by = Instant::now() + Duration::from_secs(2);
            while !gone(p) && Instant::now() < by {
                std::thread::sleep(Duration::from_millis(10));
            }
            gone(p)
        };
        // Ends on SIGTERM: its handler runs, and the hook returns without the grace.
        let script = format!(
            "sh -c 'trap \"echo term > {}; exit 0\" TERM; echo $$ > {}; while :; do sleep 0.1; done' &\n\
             while [ ! -s {} ]; do sleep 0.01; done",
            said.display(),
            pid.display(),
            pid.display()
        );
        let t0 = Instant::now();
        run("t", &sh(&script), &env(d.path()), Duration::from_secs(10)).unwrap();
        assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
        let p = pid_of().unwrap();
        assert!(ends(p), "{p} still runs");
        assert_eq!(std::fs::read_to_string(&said).unwrap(), "term\n");

        // Ignores it: killed at the end of the grace (here the timeout, 300 ms).
        std::fs::remove_file(&pid).unwrap();
        let script = format!(
            "sh -c 'trap \"\" TERM; echo $$ > {}; while :; do sleep 0.1; done' &\n\
             while [ ! -s {} ]; do sleep 0.01; done",
            pid.display(),
            pid.display()
        );
        let t0 = Instant::now();
        let r = run(
            "t",
            &sh(&script),
            &env(d.path()),
            Duration::from_millis(300),
        );
        let took = t0.elapsed();
        let p = pid_of().unwrap();
        let stayed = !ends(p);
        let _ = nix::sys::signal::kill(Pid::from_raw(p), Signal::SIGKILL);
        r.unwrap();
        assert!(!stayed, "{p} survived the hook");
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(3),
            "{took:?}"
        );
    }

    /// A process group like a hook's, left running: `sleep` as its first process.
    fn group() -> Child {
        Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .unwrap()
    }

    fn alive(c: &mut Child) -> bool {
        c.try_wait().unwrap().is_none()
    }

    #[test]
    fn the_noted_group_is_killed_and_forgotten() {
        let d = tempfile::tempdir().unwrap();
        let record = d.path().join("hook");
        let mut c = group();
        let pgid = Pid::from_raw(c.id() as i32);
        assert!(note_group(&record, "before_activate", pgid, "s"));
        let noted = format!("before_activate (process group {pgid})");
        assert_eq!(reap_leftovers(&record, true).as_deref(), Some(&*noted));
        assert!(alive(&mut c), "a dry run kills nothing");
        assert!(record.exists(), "nor forgets");
        assert_eq!(reap_leftovers(&record, false).as_deref(), Some(&*noted));
        let st = c.wait().unwrap();
        assert_eq!(st.signal(), Some(libc::SIGKILL));
        assert!(!record.exists());
        assert_eq!(reap_leftovers(&record, false), None);
    }

    #[test]
    fn a_group_the_note_does_not_describe_is_left_alone() {
        let d = tempfile::tempdir().unwrap();
        let record = d.path().join("hook");
        let mut c = group();
        let pgid = c.id() as i32;
        let started = start_time(pgid).unwrap();
        let boot = boot_id().unwrap();
        // Its first process started at another time (the number was given to a new
        // process), or the note is from before a reboot, or unreadable.
        for text in [
            format!("{boot} {pgid} {} before_activate\n", started + 1),
            format!("00000000-0000-0000-0000-000000000000 {pgid} {started} before_activate\n"),
            format!("{boot} {pgid}\n"),
            format!("{boot} 1 {started} before_activate\n"),
        ] {
            std::fs::write(&record, &text).unwrap();
            assert_eq!(reap_leftovers(&record, false), None, "{text}");
            assert!(alive(&mut c), "{text}");
            assert!(!record.exists(), "{text}: the note is dropped");
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    #[test]
    fn a_finished_hook_leaves_no_note() {
        let d = tempfile::tempdir().unwrap();
        let record = d.path().join("hook");
        let mut e = env(d.path());
        e.record = Some(record.clone());
        // The note is written just after the hook starts: looked for a while.
        let script = format!(
            "for i in $(seq 100); do test -s {} && exit 0; sleep 0.02; done; exit 1",
            record.display()
        );
        run("t", &sh(&script), &e, Duration::from_secs(5)).expect("noted while it runs");
        assert!(!record.exists());
    }
}
