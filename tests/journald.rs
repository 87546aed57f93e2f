//! Logs to the journal, as under systemd: the events reach journald's socket with their
//! fields as journal fields (what the README's `journalctl EVENT=...` commands match on).
//!
//! No systemd is needed: the test runs in a mount namespace of its own with a tmpfs on
//! `/run`, binds `/run/systemd/journal/socket` there and reads the datagrams the keeper
//! sends, in journald's native protocol. The rest of the machine never sees that socket.
mod common;

use common::*;
use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SOCKET: &str = "/run/systemd/journal/socket";

/// One journal entry: field name -> value.
type Entry = BTreeMap<String, String>;

/// Parses a datagram of journald's native protocol: `KEY=value\n`, or for values that
/// hold a newline `KEY\n` + little-endian u64 length + value + `\n`.
fn parse_entry(mut d: &[u8]) -> Entry {
    let mut e = Entry::new();
    while !d.is_empty() {
        let Some(nl) = d.iter().position(|&b| b == b'\n') else {
            panic!("journal datagram ends without a newline: {d:?}");
        };
        let line = &d[..nl];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            e.insert(
                String::from_utf8_lossy(&line[..eq]).into(),
                String::from_utf8_lossy(&line[eq + 1..]).into(),
            );
            d = &d[nl + 1..];
        } else {
            let rest = &d[nl + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            e.insert(
                String::from_utf8_lossy(line).into(),
                String::from_utf8_lossy(&rest[8..8 + len]).into(),
            );
            d = &rest[8 + len + 1..];
        }
    }
    e
}

/// The service on `root` with its stderr on a pipe whose identity is in `JOURNAL_STREAM`
/// (what systemd does) when `journal_stream` is true, else with an unrelated one (a hook
/// running the CLI inherits the variable but not the stream).
fn spawn(root: &Path, journal_stream: bool) -> (Child, OwnedFd) {
    let (read, write) = nix::unistd::pipe().unwrap();
    let st = nix::sys::stat::fstat(write.as_fd()).unwrap();
    let stream = if journal_stream {
        format!("{}:{}", st.st_dev, st.st_ino)
    } else {
        format!("{}:{}", st.st_dev, st.st_ino + 1)
    };
    let child = Command::new(BIN)
        .args(["run", "--root", root.to_str().unwrap()])
        .env_remove("RELEASE_KEEPER_CONFIG")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env("JOURNAL_STREAM", stream)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(write))
        .spawn()
        .unwrap();
    (child, read)
}

/// Reads entries until one satisfies `pred`, or panics after `WAIT`.
fn wait_entry(sock: &UnixDatagram, seen: &mut Vec<Entry>, pred: impl Fn(&Entry) -> bool) {
    let deadline = Instant::now() + WAIT;
    let mut buf = vec![0u8; 256 * 1024];
    while !seen.iter().any(&pred) {
        assert!(
            Instant::now() < deadline,
            "no such journal entry; got: {seen:#?}"
        );
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        // Empty datagrams are the layer's probe of the socket at start, not entries.
        if let Ok(n @ 1..) = sock.recv(&mut buf) {
            seen.push(parse_entry(&buf[..n]));
        }
    }
}

fn stop(mut child: Child) {
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the service did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Everything that sees the private `/run`, on a thread of its own: a mount namespace
/// belongs to the thread that made it and the processes it starts.
fn in_private_run(body: impl FnOnce() + Send + 'static) {
    let t = std::thread::spawn(move || {
        unshare(CloneFlags::CLONE_NEWNS).expect(
            "unshare(CLONE_NEWNS): this test needs root (CAP_SYS_ADMIN), as the test \
             command in the README runs it",
        );
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .unwrap();
        mount(
            Some("tmpfs"),
            "/run",
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        fs::create_dir_all(Path::new(SOCKET).parent().unwrap()).unwrap();
        body();
    });
    if let Err(panic) = t.join() {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn under_systemd_events_go_to_the_journal_with_their_fields() {
    in_private_run(|| {
        let sock = UnixDatagram::bind(SOCKET).unwrap();
        let site = Site::new();
        let (child, stderr) = spawn(&site.root, true);
        let mut seen = Vec::new();
        wait_entry(&sock, &mut seen, |e| {
            e.get("EVENT").map(String::as_str) == Some("daemon.started")
        });
        site.deploy(&as_refs(&small_build("v1")), "id = \"v1\"\n");
        wait_entry(&sock, &mut seen, |e| {
            e.get("EVENT").map(String::as_str) == Some("release.activated")
        });
        stop(child);
        let activated = seen
            .iter()
            .find(|e| e.get("EVENT").map(String::as_str) == Some("release.activated"))
            .unwrap();
        for (field, want) in [
            ("SITE", "default"),
            ("RELEASE", "v1"),
            ("SYSLOG_IDENTIFIER", "release-keeper"),
            ("PRIORITY", "6"),
        ] {
            assert_eq!(
                activated.get(field).map(String::as_str),
                Some(want),
                "{field} of {activated:?}"
            );
        }
        assert!(activated.contains_key("MESSAGE") && activated.contains_key("DURATION_MS"));
        assert!(
            seen.iter()
                .all(|e| e.contains_key("EVENT") && e.contains_key("SITE")),
            "every entry has EVENT and SITE: {seen:#?}"
        );
        // Nothing doubled on stderr (systemd would put it in the journal a second time).
        let text = stderr_text(stderr);
        assert!(
            text.is_empty(),
            "with JOURNAL_STREAM naming stderr, events go to the journal only: {text}"
        );
    });
}

#[test]
fn a_child_that_only_inherits_journal_stream_logs_to_its_stderr() {
    in_private_run(|| {
        let sock = UnixDatagram::bind(SOCKET).unwrap();
        sock.set_nonblocking(true).unwrap();
        let site = Site::new();
        let (child, stderr) = spawn(&site.root, false);
        std::thread::sleep(Duration::from_millis(500));
        stop(child);
        let text = stderr_text(stderr);
        assert!(
            text.contains("daemon.started"),
            "events go to stderr when it is not the journal stream: {text}"
        );
        let mut buf = [0u8; 4096];
        assert!(
            sock.recv(&mut buf).is_err(),
            "nothing is sent to the journal socket"
        );
    });
}

/// What the service wrote to its stderr pipe (read after it exited).
fn stderr_text(read: OwnedFd) -> String {
    use std::io::Read;
    let mut s = String::new();
    fs::File::from(read).read_to_string(&mut s).unwrap();
    s
}
