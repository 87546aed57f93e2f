//! Running the site's hooks: argv arrays (no shell), cwd = the release, a clean
//! environment plus the documented variables, bounded by `hook_timeout`. The hook runs in
//! its own process group so that at the limit the whole group is killed, not just the
//! first process (a `sh -c` wrapper would otherwise leave its children running).

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

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

/// The end of one of the hook's output pipes. The pipe is non-blocking and drained from
/// the waiting loop, not by a thread reading to EOF: a descendant that left the process
/// group (`setsid`, a daemon launcher) keeps its copy of the pipe open after the hook
/// exits or is killed, and waiting for EOF would hold the keeper (and the site's lock)
/// for as long as that process lives, far past `hook_timeout`.
struct Tail {
    pipe: Option<std::fs::File>,
    bytes: Vec<u8>,
}

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

    /// Reads what the pipe holds now, keeping the last `TAIL_BYTES`.
    fn drain(&mut self) {
        let Some(pipe) = self.pipe.as_mut() else {
            return;
        };
        let mut buf = [0u8; 4096];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => {
                    self.pipe = None;
                    break;
                }
                Ok(n) => {
                    self.bytes.extend_from_slice(&buf[..n]);
                    if self.bytes.len() > TAIL_BYTES * 2 {
                        self.bytes.drain(..self.bytes.len() - TAIL_BYTES);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.pipe = None;
                    break;
                }
            }
        }
    }

    /// What was read, as text; closes the pipe (a detached writer gets EPIPE from now on).
    fn finish(mut self) -> String {
        self.drain();
        self.pipe = None;
        if self.bytes.len() > TAIL_BYTES {
            self.bytes.drain(..self.bytes.len() - TAIL_BYTES);
        }
        String::from_utf8_lossy(&self.bytes).into_owned()
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
pub fn forward_interrupts() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet};
    let action = SigAction::new(
        SigHandler::Handler(on_interrupt),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only makes async-signal-safe calls (an atomic load, kill,
        // signal, raise).
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

extern "C" fn on_interrupt(sig: libc::c_int) {
    let group = RUNNING_GROUP.load(Ordering::SeqCst);
    // SAFETY: kill, signal and raise are async-signal-safe.
    unsafe {
        if group > 0 {
            libc::kill(-group, sig);
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
    let mut child: Child = cmd
        .spawn()
        .map_err(|e| fail(format!("cannot start {program:?}: {e}"), String::new()))?;
    let mut out = Tail::new(child.stdout.take().map(std::os::fd::OwnedFd::from));
    let mut err = Tail::new(child.stderr.take().map(std::os::fd::OwnedFd::from));
    let pgid = Pid::from_raw(child.id() as i32);
    RUNNING_GROUP.store(pgid.as_raw(), Ordering::SeqCst);
    let deadline = Instant::now() + timeout;
    let status = loop {
        // Drained while the hook runs so a chatty hook never blocks on a full pipe.
        out.drain();
        err.drain();
        match child.try_wait() {
            Ok(Some(st)) => break Ok(st),
            Ok(None) if Instant::now() >= deadline => {
                let _ = killpg(pgid, Signal::SIGKILL);
                let _ = child.wait();
                break Err(format!(
                    "timed out after {}",
                    crate::clock::format_duration(timeout)
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => break Err(format!("cannot wait: {e}")),
        }
    };
    // Whatever the leader did, stray members of its group must not outlive the hook.
    let _ = killpg(pgid, Signal::SIGKILL);
    RUNNING_GROUP.store(0, Ordering::SeqCst);
    // The hook has ended: what it wrote is in the pipes now. A detached descendant may
    // still hold them open; its later output is not the hook's and is not waited for.
    let stdout = out.finish();
    let stderr = err.finish();
    let tail = if stderr.trim().is_empty() {
        stdout.clone()
    } else {
        stderr.clone()
    };
    match status {
        Ok(st) if st.success() => {
            tracing::debug!(event = crate::events::HOOK_SUCCEEDED, site = %env.site_name, hook = name, release = %env.release_id, stdout = %stdout.trim_end(),
                stderr = %stderr.trim_end(), "hook succeeded");
            Ok(())
        }
        Ok(st) => Err(fail(status_text(st), tail)),
        Err(s) => Err(fail(s, tail)),
    }
}

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
}
