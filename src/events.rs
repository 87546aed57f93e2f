//! The stable event names of SPEC.md and the tracing setup. Monitoring matches on these
//! names, so they are constants used everywhere instead of string literals.
//!
//! Output: under systemd (`JOURNAL_STREAM` set and no `--log-format`) events go to the
//! journal with their fields as journal fields (no prefix: `EVENT=release.rejected`);
//! otherwise `--log-format json` (one object per line, fields at the top level) or `text`.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// The service finished its first healing pass for every site.
pub const DAEMON_STARTED: &str = "daemon.started";
/// The service is stopping.
pub const DAEMON_STOPPING: &str = "daemon.stopping";
/// A new config was loaded on SIGHUP.
pub const CONFIG_RELOADED: &str = "config.reloaded";
/// A new config was rejected; the old one stays.
pub const CONFIG_REJECTED: &str = "config.rejected";
/// A marker was claimed.
pub const UPLOAD_DETECTED: &str = "upload.detected";
/// Files of the upload still look in flight.
pub const UPLOAD_WAITING: &str = "upload.waiting";
/// A release was built, verified and renamed into place.
pub const RELEASE_FINALIZED: &str = "release.finalized";
/// An upload was rejected.
pub const RELEASE_REJECTED: &str = "release.rejected";
/// `current` now points at the release and its checks passed.
pub const RELEASE_ACTIVATED: &str = "release.activated";
/// `current` went back to an earlier release.
pub const RELEASE_ROLLED_BACK: &str = "release.rolled_back";
/// A release was deleted by retention.
pub const RELEASE_PRUNED: &str = "release.pruned";
/// A hook exited non-zero or timed out.
pub const HOOK_FAILED: &str = "hook.failed";
/// The health check failed.
pub const HEALTH_FAILED: &str = "health.failed";
/// Healing repaired something.
pub const HEAL_REPAIRED: &str = "heal.repaired";
/// A release differs from its stored manifest.
pub const DRIFT_DETECTED: &str = "drift.detected";

// Diagnostics outside the list of SPEC.md: SPEC has every event carry `event`, so a
// monitor can match every line by name, these included.

/// Upload accepted without a manifest (`require_manifest = false`): hashes as uploaded.
pub const UPLOAD_UNVERIFIED: &str = "upload.unverified";
/// An upload the service was waiting on (files in flight) was processed by a command
/// meanwhile (`finalize`): the service's `upload.detected` gets its conclusion.
pub const UPLOAD_TAKEN_OVER: &str = "upload.taken_over";
/// A `shared` entry was created, or an uploaded path was replaced by its shared link.
pub const SHARED_LINKED: &str = "shared.linked";
/// One health check attempt failed; more attempts follow or `health.failed` does.
pub const HEALTH_ATTEMPT_FAILED: &str = "health.attempt_failed";
/// A hook exited 0 (debug level).
pub const HOOK_SUCCEEDED: &str = "hook.succeeded";
/// A release failed `after_activate` or its health check and stays current: no automatic
/// rollback (`auto_rollback = false`, or no good release to go back to). The failure
/// itself was logged once, as `hook.failed` or `health.failed`.
pub const RELEASE_STAYS_CURRENT: &str = "release.stays_current";
/// An activation asked for the release that is already current.
pub const RELEASE_ALREADY_CURRENT: &str = "release.already_current";
/// A switch to a release whose last verify found drift went ahead: `--force` was given.
pub const DRIFT_OVERRIDDEN: &str = "drift.overridden";
/// A plain rollback or healing passed over a release whose last verify found drift for
/// an older clean one.
pub const DRIFT_SKIPPED: &str = "drift.skipped";
/// Healing found something it must not repair itself; an operator should look.
pub const HEAL_REPORTED: &str = "heal.reported";
/// A site's root does not exist yet; the service waits for it.
pub const SITE_WAITING: &str = "site.waiting";
/// A site's root the service waited for is a directory again; the site is served.
pub const SITE_RESUMED: &str = "site.resumed";
/// A site's work or housekeeping failed; the service keeps running and retries.
pub const SITE_ERROR: &str = "site.error";
/// inotify lost events (queue overflow or read error); every site is rescanned.
pub const WATCH_OVERFLOW: &str = "watch.overflow";
/// `manifest DIR` found a symlink the keeper would reject in an upload (absolute, or
/// pointing outside the build); the manifest is still written.
pub const MANIFEST_BAD_SYMLINK: &str = "manifest.bad_symlink";
/// A command (or the service) ended with an error; with `--log-format json` the error is
/// logged as this event instead of a plain line, so stderr stays one object per line.
pub const COMMAND_FAILED: &str = "command.failed";

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Text,
}

/// `s` with its control characters escaped (`\n`, `\r`, `\t`, `\x1b`), for reasons and
/// fields that quote names an uploader chose: a file name holding a newline must not
/// forge a line of a text log or of the command's output, nor an escape sequence drive
/// the operator's terminal.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", u32::from(c))),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// A path an uploader chose, as a reason names it: bytes that are not UTF-8 as `\xNN`
/// (not all as one U+FFFD, which could be any of them), and in quotes when it starts or
/// ends with whitespace (`"a/one.txt "` is not `a/one.txt`). Control characters are
/// escaped where the reason is written (`printable`).
pub fn shown(path: &std::path::Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut out = String::new();
    for chunk in path.as_os_str().as_bytes().utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    let odd_ends = out.starts_with(char::is_whitespace) || out.ends_with(char::is_whitespace);
    if odd_ends {
        format!("\"{out}\"")
    } else {
        out
    }
}

/// True when stderr is the journal stream systemd gave us: `JOURNAL_STREAM` is
/// `<dev>:<inode>` of that stream. A hook that runs the CLI inherits the variable but has
/// its stderr on a pipe, and must log there, not to the journal.
fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var("JOURNAL_STREAM").ok() else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    nix::sys::stat::fstat(std::io::stderr()).is_ok_and(|st| st.st_dev == dev && st.st_ino == ino)
}

/// Installs the global subscriber. Logs go to stderr (or the journal); stdout is for
/// command output only.
pub fn init(format: Option<LogFormat>) {
    let filter =
        EnvFilter::try_from_env("RELEASE_KEEPER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let journald = format.is_none() && stderr_is_journal();
    if journald {
        if let Ok(layer) = tracing_journald::layer() {
            // Syslog's meaning of the levels: routine events are "info" (6), not
            // "notice" (5, tracing-journald's default), so `journalctl -p notice` shows
            // only what needs a look (warnings and errors).
            let priorities = tracing_journald::PriorityMappings {
                info: tracing_journald::Priority::Informational,
                debug: tracing_journald::Priority::Debug,
                ..tracing_journald::PriorityMappings::new()
            };
            let layer = layer
                .with_field_prefix(None)
                .with_syslog_identifier("release-keeper".into())
                .with_priority_mappings(priorities);
            let _ = tracing_subscriber::registry()
                .with(filter)
                .with(layer)
                .try_init();
            return;
        }
    }
    // `log_internal_errors(false)`: when stderr is a closed pipe (`run 2>&1 | head -1`)
    // the subscriber's own report of the failed write went through `eprintln!`, which
    // panics on EPIPE; the keeper died with exit 101 mid-activation. A log line that
    // cannot be written is lost; the work it describes must go on.
    match format.unwrap_or(LogFormat::Text) {
        LogFormat::Json => {
            let _ = tracing_subscriber::fmt()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false)
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .log_internal_errors(false)
                .try_init();
        }
        LogFormat::Text => {
            // Colour codes only for a person at a terminal: a pipe, a file or a journal
            // that fell back to stderr must get plain lines that grep and parsers read.
            let _ = tracing_subscriber::fmt()
                .fmt_fields(one_line_fields())
                .with_env_filter(filter)
                .with_target(false)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_writer(std::io::stderr)
                .log_internal_errors(false)
                .try_init();
        }
    }
}

/// Writes one line to stderr, dropping it if stderr is gone: `eprintln!` panics on a
/// closed pipe, and a message nobody can read is no reason to stop the work it reports.
pub fn print_stderr(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// The text format's fields: the message bare, every other field `name=value`, with one
/// rule for every value whatever its type or how it was recorded (`%`, `?` or a plain
/// `&str`): see [`text_value`]. The default quoted `&str` fields and left `%` ones bare,
/// so `site="shop"` sat beside `reason=no manifest` and no parser could split the line.
/// Control characters are escaped in the message too ([`printable`]): a reason quoting a
/// hook's multi-line stderr split one event over several lines, and the lines after the
/// first escaped `grep event=...` and line-based log readers.
fn one_line_fields() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> + 'static {
    OneLineFields
}

struct OneLineFields;

impl<'w> tracing_subscriber::fmt::FormatFields<'w> for OneLineFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        writer: tracing_subscriber::fmt::format::Writer<'w>,
        fields: R,
    ) -> std::fmt::Result {
        let mut visitor = TextVisitor {
            writer,
            result: Ok(()),
            first: true,
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct TextVisitor<'w> {
    writer: tracing_subscriber::fmt::format::Writer<'w>,
    result: std::fmt::Result,
    first: bool,
}

impl TextVisitor<'_> {
    fn write(&mut self, name: &str, value: &str) {
        if self.result.is_err() {
            return;
        }
        let sep = if std::mem::take(&mut self.first) {
            ""
        } else {
            " "
        };
        self.result = match name {
            "message" => write!(self.writer, "{sep}{}", printable(value)),
            name => write!(self.writer, "{sep}{name}={}", text_value(value)),
        };
    }
}

impl tracing::field::Visit for TextVisitor<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.write(field.name(), value);
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.write(field.name(), &format!("{value:?}"));
    }
}

/// A field value of the text format: bare when it is a plain word, else in double quotes.
/// Quoted exactly when it is empty or holds whitespace, `"`, `=`, `\` or a control
/// character; inside the quotes `\` and `"` are backslash-escaped and control characters
/// written as [`printable`] does. So a bare value never needs unescaping, and a quoted one
/// reads back unambiguously.
fn text_value(v: &str) -> std::borrow::Cow<'_, str> {
    let special = |c: char| c.is_whitespace() || c.is_control() || matches!(c, '"' | '=' | '\\');
    if !v.is_empty() && !v.chars().any(special) {
        return std::borrow::Cow::Borrowed(v);
    }
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let mut buf = [0u8; 4];
                out.push_str(&printable(c.encode_utf8(&mut buf)));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    #[test]
    fn shown_paths_tell_odd_names_apart() {
        use std::os::unix::ffi::OsStrExt;
        let p = |b: &[u8]| super::shown(Path::new(std::ffi::OsStr::from_bytes(b)));
        assert_eq!(p(b"a/one.txt"), "a/one.txt");
        assert_eq!(p(b"a/one.txt "), "\"a/one.txt \"");
        assert_eq!(p(b" x"), "\" x\"");
        assert_eq!(p(b"a/\xff\xfe.txt"), "a/\\xff\\xfe.txt");
        assert_eq!(p("caf\u{e9}".as_bytes()), "caf\u{e9}");
    }

    #[test]
    fn text_values_are_quoted_exactly_when_they_are_not_a_plain_word() {
        use super::text_value;
        for bare in ["release.rejected", "shop", "v1.4.2", "/srv/shop", "42", "ü"] {
            assert_eq!(text_value(bare), bare);
        }
        assert_eq!(text_value(""), r#""""#);
        assert_eq!(text_value("no manifest"), r#""no manifest""#);
        assert_eq!(text_value("a=b"), r#""a=b""#);
        assert_eq!(text_value(r#"say "hi""#), r#""say \"hi\"""#);
        assert_eq!(text_value(r"C:\x"), r#""C:\\x""#);
        assert_eq!(text_value("tab\there"), r#""tab\there""#);
        assert_eq!(
            text_value("x\nINFO forged\u{1b}[2J"),
            r#""x\nINFO forged\x1b[2J""#
        );
    }

    /// A `&str` field, a `%` field and a number follow the one rule, however recorded.
    #[test]
    fn text_lines_quote_fields_the_same_way_whatever_their_type() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(super::one_line_fields())
            .with_target(false)
            .with_ansi(false)
            .without_time()
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let reason = "no manifest";
            tracing::warn!(
                event = super::RELEASE_REJECTED,
                site = "shop",
                release = "v1",
                reason = %reason,
                files = 3u64,
                note = "",
                "upload rejected"
            );
        });
        let line = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            line.trim(),
            r#"WARN upload rejected event=release.rejected site=shop release=v1 reason="no manifest" files=3 note="""#
        );
    }

    #[test]
    fn printable_escapes_control_characters_only() {
        assert_eq!(super::printable("a b/ü.txt"), "a b/ü.txt");
        assert_eq!(
            super::printable("x\nINFO forged\r\t\u{1b}[2J\u{7f}"),
            "x\\nINFO forged\\r\\t\\x1b[2J\\x7f"
        );
    }

    /// The top-level arguments of the macro call whose `(` is at `open` in `src`
    /// (string literals skipped, so parentheses and commas in messages do not count).
    fn call_args(src: &str, open: usize) -> Vec<String> {
        let (mut depth, mut in_str, mut escaped) = (0usize, false, false);
        let (mut args, mut arg) = (Vec::new(), String::new());
        for c in src[open..].chars() {
            if in_str {
                match (escaped, c) {
                    (true, _) => escaped = false,
                    (false, '\\') => escaped = true,
                    (false, '"') => in_str = false,
                    _ => {}
                }
                arg.push(c);
                continue;
            }
            match c {
                '"' => in_str = true,
                '(' | '[' | '{' => depth += 1,
                ')' | ']' | '}' => {
                    depth -= 1;
                    if depth == 0 {
                        args.push(std::mem::take(&mut arg));
                        return args;
                    }
                }
                ',' if depth == 1 => {
                    args.push(std::mem::take(&mut arg));
                    continue;
                }
                _ => {}
            }
            if depth >= 1 && !(depth == 1 && c == '(' && arg.is_empty() && args.is_empty()) {
                arg.push(c);
            }
        }
        args
    }

    fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                rust_files(&p, out);
            } else if p.extension().is_some_and(|e| e == "rs") {
                out.push(p);
            }
        }
    }

    /// Every `tracing` call in the source that has an `event` field and lacks one of
    /// `required` or has one of `forbidden`, as `file:line`.
    fn events_breaking(required: &[&str], forbidden: &[&str]) -> Vec<String> {
        let mut files = Vec::new();
        rust_files(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut files,
        );
        let mut found = Vec::new();
        for file in files {
            let src = std::fs::read_to_string(&file).unwrap();
            for level in ["trace", "debug", "info", "warn", "error"] {
                let call = format!("tracing::{level}!(");
                for (at, _) in src.match_indices(&call) {
                    let args = call_args(&src, at + call.len() - 1);
                    let field = |name: &str| {
                        args.iter().any(|a| {
                            let a = a.trim().trim_start_matches(['%', '?']);
                            a.strip_prefix(name)
                                .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '=']))
                        })
                    };
                    if field("event")
                        && (required.iter().any(|f| !field(f))
                            || forbidden.iter().any(|f| field(f)))
                    {
                        let line = src[..at].matches('\n').count() + 1;
                        found.push(format!("{}:{line}", file.display()));
                    }
                }
            }
        }
        found
    }

    /// SPEC "Logs": every event carries `site`, so a monitor can tell which site a line
    /// is about. A diagnostic logged where the site is not known (deep in `fsops`, or the
    /// process-wide inotify reader) breaks that; this finds every `tracing` call with an
    /// `event` field and requires a `site` field beside it.
    #[test]
    fn every_event_logged_in_the_source_names_its_site() {
        let missing = events_breaking(&["site"], &[]);
        assert!(
            missing.is_empty(),
            "events without a `site` field: {missing:?}"
        );
    }

    /// SPEC "Logs": events carry what went wrong as `reason`. `site.error` and
    /// `watch.overflow` named it `error`, so a monitor showing the `reason` of every
    /// warning showed nothing for them.
    #[test]
    fn every_event_says_what_went_wrong_as_reason_not_error() {
        let found = events_breaking(&[], &["error"]);
        assert!(
            found.is_empty(),
            "events with an `error` field instead of `reason`: {found:?}"
        );
    }
}
