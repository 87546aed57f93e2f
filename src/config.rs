//! The configuration: `config.toml` (`[defaults]` and `[sites.NAME]`) plus one file per site
//! in `sites.d/` beside it.
//!
//! Operators edit these files by hand, often on a live server, so every error must name
//! `file:line:column` and say what is wrong and what is expected. To get there the text is
//! read twice: once as toml's spanned document tree, to check key names (an unknown key is
//! reported at the key, with a suggestion), then through serde into raw structs whose values
//! are all `toml::Spanned`, so each value is validated knowing exactly where it came from.
//! Type errors come from serde with toml's span attached; nothing is validated without a
//! position to report.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// Where the config lives when neither `--config` nor `$RELEASE_KEEPER_CONFIG` says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/release-keeper/config.toml";

/// Environment variable naming the config file (used when `--config` is not given).
pub const CONFIG_ENV: &str = "RELEASE_KEEPER_CONFIG";

/// Names directly under a site's root that belong to the keeper and cannot be `links`.
const RESERVED_NAMES: [&str; 5] = [
    "deploy-cache",
    "releases",
    "shared",
    "current",
    ".release-keeper",
];

/// Keys that may appear in `[defaults]` as well as in a site.
const TUNABLE_KEYS: [&str; 16] = [
    "keep",
    "keep_failed",
    "marker",
    "manifest",
    "require_manifest",
    "upload_timeout",
    "settle_time",
    "hook_timeout",
    "health_retries",
    "health_interval",
    "auto_rollback",
    "heal_interval",
    "verify_interval",
    "max_files",
    "max_bytes",
    "hook_user",
];

/// Keys that only make sense for one site.
const SITE_ONLY_KEYS: [&str; 7] = [
    "root",
    "shared",
    "links",
    "before_activate",
    "after_activate",
    "health_check",
    "metrics_file",
];

const DURATION_EXAMPLES: &str = r#"expected e.g. "500ms", "2s", "10m", "1h""#;

/// The complete, validated settings of one site.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteConfig {
    /// Site name: the `[sites.NAME]` key or the `sites.d/NAME.toml` file stem.
    pub name: String,
    /// Absolute, lexically normalized site directory (no `.`, `..` or trailing `/`).
    pub root: PathBuf,
    /// Release-relative entries symlinked to `ROOT/shared/<entry>` in every release.
    pub shared: Vec<PathBuf>,
    /// Extra symlinks in ROOT: link name (relative to ROOT) -> relative target.
    pub links: BTreeMap<PathBuf, PathBuf>,
    /// Hook run before `current` is switched (argv, no shell).
    pub before_activate: Option<Vec<String>>,
    /// Hook run after `current` is switched (argv, no shell).
    pub after_activate: Option<Vec<String>>,
    /// Health check run after activation (argv, no shell).
    pub health_check: Option<Vec<String>>,
    /// Number of good releases to keep (at least 1).
    pub keep: usize,
    /// Number of failed releases to keep for inspection.
    pub keep_failed: usize,
    /// File name of the upload-complete marker in `deploy-cache/`.
    pub marker: String,
    /// File name of the checksum manifest in the upload.
    pub manifest: String,
    /// Whether an upload without a manifest is rejected.
    pub require_manifest: bool,
    /// How long to wait for in-flight upload files before rejecting.
    pub upload_timeout: Duration,
    /// Extra wait after the marker appears before reading the upload.
    pub settle_time: Duration,
    /// Time limit for each hook and health-check run (greater than zero).
    pub hook_timeout: Duration,
    /// Health-check attempts in all (at least 1).
    pub health_retries: u32,
    /// Pause between health-check attempts.
    pub health_interval: Duration,
    /// Whether a failed `after_activate` or health check switches back to the previous release.
    pub auto_rollback: bool,
    /// Period of the healing pass (greater than zero).
    pub heal_interval: Duration,
    /// Period of re-hashing the current release (greater than zero).
    pub verify_interval: Duration,
    /// Maximum number of entries (files, directories, symlinks) in an upload; `None`
    /// means no limit.
    pub max_files: Option<u64>,
    /// Maximum total bytes of an upload; `None` means no limit.
    pub max_bytes: Option<u64>,
    /// User the hooks run as when the service runs as root (default: the service's user).
    pub hook_user: Option<String>,
    /// Prometheus node_exporter textfile (`*.prom`) rewritten after every job; `None`: no metrics.
    pub metrics_file: Option<PathBuf>,
}

impl SiteConfig {
    /// Built-in defaults for a site at `root` (used by `run --root`).
    pub fn with_defaults(name: &str, root: PathBuf) -> SiteConfig {
        SiteConfig {
            name: name.to_owned(),
            root,
            shared: Vec::new(),
            links: BTreeMap::new(),
            before_activate: None,
            after_activate: None,
            health_check: None,
            keep: 5,
            keep_failed: 2,
            marker: ".release-ready".to_owned(),
            manifest: "SHA256SUMS".to_owned(),
            require_manifest: true,
            upload_timeout: Duration::from_secs(10 * 60),
            settle_time: Duration::ZERO,
            hook_timeout: Duration::from_secs(60),
            health_retries: 3,
            health_interval: Duration::from_secs(2),
            auto_rollback: true,
            heal_interval: Duration::from_secs(60),
            verify_interval: Duration::from_secs(60 * 60),
            max_files: None,
            max_bytes: None,
            hook_user: None,
            metrics_file: None,
        }
    }
}

/// A loaded configuration: the file it came from and every site, by name.
#[derive(Debug, Clone)]
pub struct Config {
    /// The main config file that was loaded.
    pub path: PathBuf,
    /// All sites from the main file and `sites.d/`, by name.
    pub sites: BTreeMap<String, SiteConfig>,
    /// Made by `--root DIR` (one site, built-in defaults), not read from `path`.
    pub from_root: bool,
}

impl Config {
    /// The command line that runs `init` for `site` under this configuration.
    pub fn init_command(&self, site: &str) -> String {
        match self.sites.get(site).filter(|_| self.from_root) {
            Some(c) => format!("release-keeper --root {} init {site}", c.root.display()),
            None => format!("release-keeper init {site}"),
        }
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A problem at a known position (1-based line, 1-based column in characters).
    #[error("{file}:{line}:{column}: {message}")]
    At {
        /// The file holding the problem.
        file: PathBuf,
        /// 1-based line number.
        line: usize,
        /// 1-based column, counted in characters.
        column: usize,
        /// What is wrong and what is expected.
        message: String,
    },
    /// A file or directory could not be read.
    #[error("{file}: cannot read the config: {source}")]
    Io {
        /// The file or directory that could not be read.
        file: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A problem with a whole file rather than a position in it.
    #[error("{file}: {message}")]
    Invalid {
        /// The file the problem is about.
        file: PathBuf,
        /// What is wrong and what is expected.
        message: String,
    },
}

/// Which config file to use: explicit flag, else $RELEASE_KEEPER_CONFIG (non-empty), else DEFAULT_CONFIG_PATH.
pub fn resolve_path(flag: Option<&Path>) -> PathBuf {
    resolve_path_from(flag, std::env::var_os(CONFIG_ENV))
}

fn resolve_path_from(flag: Option<&Path>, env: Option<OsString>) -> PathBuf {
    if let Some(path) = flag {
        return path.to_path_buf();
    }
    match env {
        Some(value) if !value.is_empty() => PathBuf::from(value),
        _ => PathBuf::from(DEFAULT_CONFIG_PATH),
    }
}

/// Loads the config file plus every `*.toml` in `sites.d/` beside it (sorted by name; each file is one site named after the file stem; its keys are the site keys directly, no [sites.x] header).
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = read_text(path).map_err(|e| match e {
        // The first thing a new user meets after `run --root`: say how a config is found.
        ConfigError::Io { file, source } if source.kind() == io::ErrorKind::NotFound => {
            ConfigError::Invalid {
                file,
                message: "no such config file (name one with --config FILE or \
                          RELEASE_KEEPER_CONFIG; `run --root DIR` serves one site without one)"
                    .to_owned(),
            }
        }
        other => other,
    })?;
    let main = parse_main_doc(&text, path)?;
    let mut sites = main.sites;
    let dir = match path.parent() {
        Some(parent) => parent.join("sites.d"),
        None => PathBuf::from("sites.d"),
    };
    for file in site_files(&dir)? {
        let name = site_name_of_file(&file)?;
        let site_text = read_text(&file)?;
        let parsed = parse_site_file(&site_text, &file, &name, &main.base)?;
        if let Some(first) = sites.get(&name) {
            // At the `[sites.NAME]` of the main config: a sites.d file has no one place to
            // point at, and every config error names file, line and column.
            return Err(first.root_at.error(format!(
                "site {name:?} is defined twice: here as [sites.{name}] and by {}; remove one of them",
                file.display()
            )));
        }
        let order = sites.len();
        sites.insert(name, Parsed { order, ..parsed });
    }
    check_unique_roots(&sites)?;
    check_unique_metrics_files(&sites)?;
    check_roots_are_directories(&sites)?;
    Ok(Config {
        path: path.to_path_buf(),
        sites: into_configs(sites),
        from_root: false,
    })
}

/// Parses config text (for tests and for reload); `file` is only used in error messages.
pub fn parse_main(text: &str, file: &Path) -> Result<BTreeMap<String, SiteConfig>, ConfigError> {
    let main = parse_main_doc(text, file)?;
    check_unique_roots(&main.sites)?;
    check_unique_metrics_files(&main.sites)?;
    Ok(into_configs(main.sites))
}

/// Parses "500ms", "2s", "10m", "1h", "1d", "1h30m", "0s" (integers only, units ms/s/m/h/d, at least one unit; bare numbers are an error "missing unit", but for a bare "0").
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if s.is_empty() {
        return Err("empty duration".to_owned());
    }
    // Zero is zero in any unit: `--wait 0` and `settle_time = "0"` mean what they say.
    if s.bytes().all(|b| b == b'0') {
        return Ok(Duration::ZERO);
    }
    let mut rest = s;
    let mut total_ms: u64 = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(if rest.starts_with('-') {
                "negative durations are not allowed".to_owned()
            } else {
                format!("expected a number at {rest:?}")
            });
        }
        let (number, after) = rest.split_at(digits);
        let letters = after.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, after) = after.split_at(letters);
        if unit.is_empty() {
            // "10 minutes": the unit the operator meant, written as the keeper reads it.
            let spaced = after.trim_start();
            let word_len = spaced.bytes().take_while(u8::is_ascii_alphabetic).count();
            return Err(if after.starts_with(['.', ',']) {
                "integers only (write \"1500ms\", not \"1.5s\")".to_owned()
            } else if let (true, Some(short)) =
                (spaced.len() < after.len(), unit_meant(&spaced[..word_len]))
            {
                format!("missing unit right after the number (no space; write \"{number}{short}\")")
            } else {
                "missing unit (ms, s, m, h or d)".to_owned()
            });
        }
        let factor: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => {
                return Err(match unit_meant(unit) {
                    Some(short) => format!(
                        "unknown unit {unit:?} (use ms, s, m, h or d: write \"{number}{short}\")"
                    ),
                    None => format!("unknown unit {unit:?} (use ms, s, m, h or d)"),
                })
            }
        };
        let too_large = || "duration is too large".to_owned();
        let value: u64 = number.parse().map_err(|_| too_large())?;
        total_ms = value
            .checked_mul(factor)
            .and_then(|ms| total_ms.checked_add(ms))
            .ok_or_else(too_large)?;
        rest = after;
    }
    Ok(Duration::from_millis(total_ms))
}

/// The unit a spelled-out word means ("minutes" -> "m"), to suggest what to write instead.
fn unit_meant(word: &str) -> Option<&'static str> {
    // "Minutes" is clear; "M" (months?) and "H" are not: short words are taken as written.
    let word = if word.len() > 2 {
        word.to_ascii_lowercase()
    } else {
        word.to_owned()
    };
    Some(match word.as_str() {
        "ms" | "msec" | "msecs" | "millis" | "millisecond" | "milliseconds" => "ms",
        "s" | "sec" | "secs" | "second" | "seconds" => "s",
        "m" | "min" | "mins" | "minute" | "minutes" => "m",
        "h" | "hr" | "hrs" | "hour" | "hours" => "h",
        "d" | "day" | "days" => "d",
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------------
// Positions

/// A source file being parsed: its name (for messages) and its text (for line:column).
struct Src<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Src<'_> {
    fn loc(&self, offset: usize) -> Loc {
        let (line, column) = line_col(self.text, offset);
        Loc {
            file: self.file.to_path_buf(),
            line,
            column,
        }
    }

    fn at(&self, offset: usize, message: impl Into<String>) -> ConfigError {
        let (line, column) = line_col(self.text, offset);
        ConfigError::At {
            file: self.file.to_path_buf(),
            line,
            column,
            message: message.into(),
        }
    }

    fn toml_error(&self, err: &toml::de::Error) -> ConfigError {
        let span = err.span().unwrap_or(0..0);
        let mut message = err.message().trim().replace('\n', "; ");
        if message == "duplicate key" {
            if let Some(key) = self.text.get(span.clone()) {
                message = match first_definition(self.text, span.start, key) {
                    Some(Defined::Table(header, line)) => format!(
                        "{header} is defined twice: here and at line {line}; merge them into one"
                    ),
                    Some(Defined::Key(line)) => format!(
                        "duplicate key {key:?}: already set at line {line}; each key may appear only once per table"
                    ),
                    None => format!(
                        "duplicate key {key:?}: each key may appear only once per table"
                    ),
                };
            }
        }
        self.at(span.start, message)
    }
}

/// Where a duplicated key was first written, as far as the text shows it plainly.
enum Defined {
    /// A table header (`[sites.shop]`) written twice, and the line of the first one.
    Table(String, usize),
    /// A key written twice in the same table, and the line of the first one.
    Key(usize),
}

/// The earlier definition of the duplicate `key` toml reported at byte `at`: an identical
/// table header before it, or, for a plain `key = ...` line, the same key at the start of
/// an earlier line of the same table. `None` when the text does not say it plainly
/// (dotted keys, inline tables): the error then names only the second place.
fn first_definition(text: &str, at: usize, key: &str) -> Option<Defined> {
    let line_start = text.get(..at)?.rfind('\n').map_or(0, |i| i + 1);
    let line_no = text[..line_start].matches('\n').count() + 1;
    let earlier: Vec<&str> = text[..line_start].lines().collect();
    let current = text[line_start..].lines().next().unwrap_or("");
    let header = |line: &str| -> Option<String> {
        let line = line.trim_start();
        if !line.starts_with('[') || line.starts_with("[[") {
            return None;
        }
        let end = line.find(']')?;
        Some(
            line[..=end]
                .chars()
                .filter(|c| !c.is_whitespace())
                .collect(),
        )
    };
    if let Some(this) = header(current) {
        let first = earlier
            .iter()
            .position(|l| header(l).as_deref() == Some(this.as_str()))?;
        return Some(Defined::Table(this, first + 1));
    }
    let sets_key = |line: &str| {
        line.trim_start()
            .strip_prefix(key)
            .is_some_and(|rest| rest.trim_start().starts_with(['=', '.']))
    };
    if !sets_key(current) {
        return None;
    }
    // The table this line is in starts after the last header before it.
    let table_start = earlier
        .iter()
        .rposition(|l| l.trim_start().starts_with('['))
        .map_or(0, |i| i + 1);
    let first = (table_start..earlier.len()).find(|&i| sets_key(earlier[i]))?;
    (first + 1 < line_no).then_some(Defined::Key(first + 1))
}

/// A resolved position, kept to mention it in a later error about another site.
#[derive(Debug, Clone)]
struct Loc {
    file: PathBuf,
    line: usize,
    column: usize,
}

impl Loc {
    /// An error at this place.
    fn error(&self, message: String) -> ConfigError {
        ConfigError::At {
            file: self.file.clone(),
            line: self.line,
            column: self.column,
            message,
        }
    }
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// 1-based line and 1-based column (in characters) of a byte offset.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

fn read_text(path: &Path) -> Result<String, ConfigError> {
    let bytes = fs::read(path).map_err(|source| ConfigError::Io {
        file: path.to_path_buf(),
        source,
    })?;
    String::from_utf8(bytes).map_err(|err| {
        let valid = err.utf8_error().valid_up_to();
        let prefix = std::str::from_utf8(&err.as_bytes()[..valid]).unwrap_or_default();
        let (line, column) = line_col(prefix, valid);
        ConfigError::At {
            file: path.to_path_buf(),
            line,
            column,
            message: "the file is not valid UTF-8".to_owned(),
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Raw, spanned shapes of the files

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMain {
    defaults: Option<Spanned<RawSite>>,
    sites: Option<BTreeMap<Spanned<String>, Spanned<RawSite>>>,
}

/// One site table (also used for `[defaults]`, whose site-only keys the key check rejects).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, expecting = "a table of site settings")]
struct RawSite {
    root: Option<Spanned<String>>,
    shared: Option<Spanned<StrList>>,
    links: Option<Spanned<LinkMap>>,
    before_activate: Option<Spanned<StrList>>,
    after_activate: Option<Spanned<StrList>>,
    health_check: Option<Spanned<StrList>>,
    keep: Option<Spanned<Count>>,
    keep_failed: Option<Spanned<Count>>,
    marker: Option<Spanned<String>>,
    manifest: Option<Spanned<String>>,
    require_manifest: Option<bool>,
    upload_timeout: Option<Spanned<DurText>>,
    settle_time: Option<Spanned<DurText>>,
    hook_timeout: Option<Spanned<DurText>>,
    health_retries: Option<Spanned<Count>>,
    health_interval: Option<Spanned<DurText>>,
    auto_rollback: Option<bool>,
    heal_interval: Option<Spanned<DurText>>,
    verify_interval: Option<Spanned<DurText>>,
    max_files: Option<Spanned<Count>>,
    max_bytes: Option<Spanned<Count>>,
    hook_user: Option<Spanned<String>>,
    metrics_file: Option<Spanned<String>>,
}

/// A non-negative integer (so a type error says so instead of naming a Rust type).
struct Count(u64);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CountVisitor;
        impl Visitor<'_> for CountVisitor {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a non-negative integer")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Count, E> {
                Ok(Count(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Count, E> {
                u64::try_from(v)
                    .map(Count)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
            }
        }
        deserializer.deserialize_u64(CountVisitor)
    }
}

/// A duration string, checked later (with the key name) by `parse_duration`.
struct DurText(String);

impl<'de> Deserialize<'de> for DurText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurVisitor;
        impl Visitor<'_> for DurVisitor {
            type Value = DurText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a duration string such as "500ms", "2s", "10m", "1h""#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DurText, E> {
                Ok(DurText(v.to_owned()))
            }
        }
        deserializer.deserialize_str(DurVisitor)
    }
}

/// An array of strings, each with its position.
struct StrList(Vec<Spanned<String>>);

impl<'de> Deserialize<'de> for StrList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ListVisitor;
        impl<'de> Visitor<'de> for ListVisitor {
            type Value = StrList;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"an array of strings, e.g. ["a", "b"]"#)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StrList, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<Spanned<String>>()? {
                    items.push(item);
                }
                Ok(StrList(items))
            }
        }
        deserializer.deserialize_seq(ListVisitor)
    }
}

/// The `links` table: link name -> target, both with positions, in file order.
struct LinkMap(Vec<(Spanned<String>, Spanned<String>)>);

impl<'de> Deserialize<'de> for LinkMap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MapVisitor;
        impl<'de> Visitor<'de> for MapVisitor {
            type Value = LinkMap;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    r#"a table of link names and targets, e.g. { htdocs = "current/public" }"#,
                )
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<LinkMap, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<Spanned<String>>()? {
                    let value = map.next_value::<Spanned<String>>()?;
                    entries.push((key, value));
                }
                entries.sort_by_key(|(key, _)| key.span().start);
                Ok(LinkMap(entries))
            }
        }
        deserializer.deserialize_map(MapVisitor)
    }
}

// ---------------------------------------------------------------------------------------------
// Key names, checked on toml's spanned document tree

/// Which table a key sits in, for messages.
#[derive(Clone, Copy)]
enum Where<'a> {
    Top,
    Defaults,
    Site(&'a str),
    SiteFile(&'a str),
}

impl fmt::Display for Where<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Where::Top => f.write_str("at the top level"),
            Where::Defaults => f.write_str("in [defaults]"),
            Where::Site(name) => write!(f, "in [sites.{name}]"),
            Where::SiteFile(name) => write!(f, "for site {name:?}"),
        }
    }
}

/// Problems found, as (byte offset, message); the first in the file is reported.
type Problems = Vec<(usize, String)>;

fn first_problem(mut problems: Problems, src: &Src<'_>) -> Result<(), ConfigError> {
    problems.sort_by_key(|(offset, _)| *offset);
    match problems.into_iter().next() {
        Some((offset, message)) => Err(src.at(offset, message)),
        None => Ok(()),
    }
}

fn check_main_keys(doc: &DeTable<'_>, src: &Src<'_>) -> Result<(), ConfigError> {
    let mut problems = Problems::new();
    for (key, value) in doc {
        match key.get_ref().as_ref() {
            "defaults" => match value.get_ref() {
                DeValue::Table(table) => check_table_keys(table, Where::Defaults, &mut problems),
                _ => problems.push((
                    value.span().start,
                    "\"defaults\" must be a table: write [defaults] on a line of its own, then the settings".to_owned(),
                )),
            },
            "sites" => match value.get_ref() {
                DeValue::Table(sites) => {
                    for (name, site) in sites {
                        let name = name.get_ref().as_ref();
                        match site.get_ref() {
                            DeValue::Table(table) => {
                                check_table_keys(table, Where::Site(name), &mut problems)
                            }
                            _ => problems.push((
                                site.span().start,
                                format!("site {name:?} must be a table: write [sites.{name}] on a line of its own, then its settings"),
                            )),
                        }
                    }
                }
                _ => problems.push((
                    value.span().start,
                    "\"sites\" must be a table of sites: write [sites.NAME] with the site's settings below".to_owned(),
                )),
            },
            other => problems.push((key.span().start, unknown_key_message(other, Where::Top))),
        }
    }
    first_problem(problems, src)
}

fn check_table_keys(table: &DeTable<'_>, place: Where<'_>, problems: &mut Problems) {
    for key in table.keys() {
        let name = key.get_ref().as_ref();
        let allowed = match place {
            Where::Top => false,
            Where::Defaults => TUNABLE_KEYS.contains(&name),
            Where::Site(_) | Where::SiteFile(_) => {
                TUNABLE_KEYS.contains(&name) || SITE_ONLY_KEYS.contains(&name)
            }
        };
        if !allowed {
            problems.push((key.span().start, unknown_key_message(name, place)));
        }
    }
}

fn unknown_key_message(key: &str, place: Where<'_>) -> String {
    let head = format!("unknown key {key:?} {place}");
    match place {
        Where::Top if TUNABLE_KEYS.contains(&key) => {
            format!("{head}: site settings go under [defaults] or [sites.NAME]")
        }
        Where::Top if SITE_ONLY_KEYS.contains(&key) => {
            format!("{head}: {key:?} is per site, set it under [sites.NAME]")
        }
        Where::Top => with_suggestion(head, key, &["defaults", "sites"]),
        Where::Defaults if SITE_ONLY_KEYS.contains(&key) => {
            format!("{key:?} cannot be set in [defaults]: it is per site, set it under [sites.NAME]")
        }
        Where::Defaults => with_suggestion(head, key, &TUNABLE_KEYS),
        Where::SiteFile(_) if key == "sites" || key == "defaults" => format!(
            "{head}: a sites.d file holds the site's keys directly, without [sites.NAME] or [defaults] headers"
        ),
        Where::Site(_) | Where::SiteFile(_) => {
            let all: Vec<&str> = SITE_ONLY_KEYS.iter().chain(&TUNABLE_KEYS).copied().collect();
            with_suggestion(head, key, &all)
        }
    }
}

fn with_suggestion(head: String, key: &str, allowed: &[&str]) -> String {
    let closest = allowed
        .iter()
        .map(|candidate| (edit_distance(key, candidate), *candidate))
        .min();
    match closest {
        Some((distance, candidate)) if distance <= (key.chars().count() / 3).clamp(1, 2) => {
            format!("{head}; did you mean {candidate:?}?")
        }
        _ => format!("{head}; expected one of: {}", allowed.join(", ")),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitute = previous[j] + usize::from(ca != *cb);
            current.push(substitute.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

// ---------------------------------------------------------------------------------------------
// Building validated sites

/// A validated site plus where its root was written (to report a root used twice).
struct Parsed {
    config: SiteConfig,
    root_at: Loc,
    /// Where `metrics_file` was written (to report a file shared by two sites).
    metrics_at: Option<Loc>,
    /// Position in load order: the main file's sites in file order, then `sites.d/`.
    order: usize,
}

/// The main file: built-ins overlaid with `[defaults]`, and its own sites.
struct MainDoc {
    base: SiteConfig,
    sites: BTreeMap<String, Parsed>,
}

fn into_configs(sites: BTreeMap<String, Parsed>) -> BTreeMap<String, SiteConfig> {
    sites
        .into_iter()
        .map(|(name, parsed)| (name, parsed.config))
        .collect()
}

fn parse_main_doc(text: &str, file: &Path) -> Result<MainDoc, ConfigError> {
    let src = Src { file, text };
    let doc = DeTable::parse(text).map_err(|err| src.toml_error(&err))?;
    check_main_keys(doc.get_ref(), &src)?;
    let raw: RawMain = toml::from_str(text).map_err(|err| src.toml_error(&err))?;

    let mut base = SiteConfig::with_defaults("", PathBuf::new());
    if let Some(defaults) = &raw.defaults {
        apply_tunables(defaults.get_ref(), &mut base, &src)?;
        check_marker_manifest(&base, defaults.get_ref(), defaults.span().start, &src)?;
    }

    let mut entries: Vec<_> = raw.sites.iter().flatten().collect();
    entries.sort_by_key(|(name, _)| name.span().start);
    let mut sites = BTreeMap::new();
    for (name, site) in entries {
        check_site_name(name.get_ref()).map_err(|msg| src.at(name.span().start, msg))?;
        let parsed = build_site(
            name.get_ref(),
            site.get_ref(),
            site.span().start,
            Where::Site(name.get_ref()),
            &base,
            &src,
        )?;
        let order = sites.len();
        sites.insert(name.get_ref().clone(), Parsed { order, ..parsed });
    }
    Ok(MainDoc { base, sites })
}

fn parse_site_file(
    text: &str,
    file: &Path,
    name: &str,
    base: &SiteConfig,
) -> Result<Parsed, ConfigError> {
    let src = Src { file, text };
    let doc = DeTable::parse(text).map_err(|err| src.toml_error(&err))?;
    let mut problems = Problems::new();
    check_table_keys(doc.get_ref(), Where::SiteFile(name), &mut problems);
    first_problem(problems, &src)?;
    let raw: RawSite = toml::from_str(text).map_err(|err| src.toml_error(&err))?;
    build_site(name, &raw, 0, Where::SiteFile(name), base, &src)
}

fn build_site(
    name: &str,
    raw: &RawSite,
    table_at: usize,
    place: Where<'_>,
    base: &SiteConfig,
    src: &Src<'_>,
) -> Result<Parsed, ConfigError> {
    let root_raw = raw.root.as_ref().ok_or_else(|| {
        src.at(
            table_at,
            format!("missing key \"root\" {place}: the site's absolute directory, e.g. root = \"/srv/{name}\""),
        )
    })?;
    let root = parse_root(root_raw.get_ref()).map_err(|msg| src.at(root_raw.span().start, msg))?;

    let mut config = base.clone();
    config.name = name.to_owned();
    config.root = root;
    apply_tunables(raw, &mut config, src)?;
    check_marker_manifest(&config, raw, table_at, src)?;

    if let Some(list) = &raw.shared {
        for item in &list.get_ref().0 {
            let at = item.span().start;
            let path = relative_path(item.get_ref(), "shared entry").map_err(|m| src.at(at, m))?;
            if let Some(other) = config.shared.iter().find(|o| nested(o, &path)) {
                return Err(src.at(at, overlap_message("shared entry", &path, other)));
            }
            // The manifest stays in every release as uploaded (SPEC); as a shared entry it
            // would be a link to `shared/`, seeded once from the first upload's manifest.
            if nested(&path, Path::new(&config.manifest)) {
                return Err(src.at(
                    at,
                    format!(
                        "shared entry {:?} would replace the manifest {:?}, which stays in \
                         every release as uploaded; share another path or rename the manifest",
                        path.display().to_string(),
                        config.manifest
                    ),
                ));
            }
            config.shared.push(path);
        }
    }

    if let Some(links) = &raw.links {
        for (key, target) in &links.get_ref().0 {
            let at = key.span().start;
            let link = relative_path(key.get_ref(), "link name").map_err(|m| src.at(at, m))?;
            if let Some(first) = link.components().next() {
                let first = first.as_os_str();
                if RESERVED_NAMES.iter().any(|reserved| first == *reserved) {
                    return Err(src.at(
                        at,
                        format!(
                            "link name {:?} is reserved: {} belong to the keeper",
                            key.get_ref(),
                            RESERVED_NAMES.join(", ")
                        ),
                    ));
                }
            }
            if let Some(other) = config.links.keys().find(|o| nested(o, &link)) {
                return Err(src.at(at, overlap_message("link", &link, other)));
            }
            let target_text = target.get_ref();
            let target_at = target.span().start;
            if target_text.is_empty() {
                return Err(src.at(
                    target_at,
                    format!(
                        "link target for {:?} must not be empty, e.g. \"current/public\"",
                        key.get_ref()
                    ),
                ));
            }
            if target_text.contains('\0') {
                return Err(src.at(target_at, "link target must not contain a NUL byte"));
            }
            if target_text.starts_with('/') {
                return Err(src.at(
                    target_at,
                    format!("link target must be relative to the link's directory (e.g. \"current/public\" for a link at the top of the root), got {target_text:?}"),
                ));
            }
            link_target_inside_root(&link, target_text).map_err(|m| src.at(target_at, m))?;
            config.links.insert(link, PathBuf::from(target_text));
        }
    }

    config.before_activate = argv(&raw.before_activate, "before_activate", src)?;
    config.after_activate = argv(&raw.after_activate, "after_activate", src)?;
    config.health_check = argv(&raw.health_check, "health_check", src)?;
    if let Some(v) = &raw.metrics_file {
        let path = parse_metrics_file(v.get_ref()).map_err(|m| src.at(v.span().start, m))?;
        config.metrics_file = Some(path);
    }

    Ok(Parsed {
        config,
        root_at: src.loc(root_raw.span().start),
        metrics_at: raw.metrics_file.as_ref().map(|v| src.loc(v.span().start)),
        order: 0,
    })
}

/// Applies (and validates) the tunables present in `raw` on top of `config`.
fn apply_tunables(
    raw: &RawSite,
    config: &mut SiteConfig,
    src: &Src<'_>,
) -> Result<(), ConfigError> {
    if let Some(v) = &raw.keep {
        config.keep = to_usize(count(v, "keep", 1, src)?, v, "keep", src)?;
    }
    if let Some(v) = &raw.keep_failed {
        config.keep_failed = to_usize(count(v, "keep_failed", 0, src)?, v, "keep_failed", src)?;
    }
    if let Some(v) = &raw.marker {
        config.marker =
            upload_file_name(v.get_ref(), "marker").map_err(|m| src.at(v.span().start, m))?;
    }
    if let Some(v) = &raw.manifest {
        config.manifest =
            upload_file_name(v.get_ref(), "manifest").map_err(|m| src.at(v.span().start, m))?;
    }
    if let Some(v) = raw.require_manifest {
        config.require_manifest = v;
    }
    if let Some(v) = &raw.upload_timeout {
        config.upload_timeout = duration(v, "upload_timeout", false, src)?;
    }
    if let Some(v) = &raw.settle_time {
        config.settle_time = duration(v, "settle_time", false, src)?;
    }
    if let Some(v) = &raw.hook_timeout {
        config.hook_timeout = duration(v, "hook_timeout", true, src)?;
    }
    if let Some(v) = &raw.health_retries {
        let n = count(v, "health_retries", 1, src)?;
        config.health_retries = u32::try_from(n).map_err(|_| {
            src.at(
                v.span().start,
                format!("health_retries is too large: at most {}", u32::MAX),
            )
        })?;
    }
    if let Some(v) = &raw.health_interval {
        config.health_interval = duration(v, "health_interval", false, src)?;
    }
    if let Some(v) = raw.auto_rollback {
        config.auto_rollback = v;
    }
    if let Some(v) = &raw.heal_interval {
        config.heal_interval = duration(v, "heal_interval", true, src)?;
    }
    if let Some(v) = &raw.verify_interval {
        config.verify_interval = duration(v, "verify_interval", true, src)?;
    }
    if let Some(v) = &raw.max_files {
        config.max_files = Some(limit(v, "max_files", src)?);
    }
    if let Some(v) = &raw.max_bytes {
        config.max_bytes = Some(limit(v, "max_bytes", src)?);
    }
    if let Some(v) = &raw.hook_user {
        let name = v.get_ref();
        let ok = !name.is_empty()
            && name.len() <= 32
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !ok {
            return Err(src.at(
                v.span().start,
                format!("hook_user must be a user name like \"www-data\", got {name:?}"),
            ));
        }
        config.hook_user = Some(name.clone());
    }
    Ok(())
}

fn count(v: &Spanned<Count>, key: &str, min: u64, src: &Src<'_>) -> Result<u64, ConfigError> {
    let n = v.get_ref().0;
    if n < min {
        return Err(src.at(
            v.span().start,
            format!("{key} must be at least {min}, got {n}"),
        ));
    }
    Ok(n)
}

fn to_usize(n: u64, v: &Spanned<Count>, key: &str, src: &Src<'_>) -> Result<usize, ConfigError> {
    usize::try_from(n).map_err(|_| src.at(v.span().start, format!("{key} is too large")))
}

fn limit(v: &Spanned<Count>, key: &str, src: &Src<'_>) -> Result<u64, ConfigError> {
    let n = v.get_ref().0;
    if n == 0 {
        return Err(src.at(
            v.span().start,
            format!("{key} must be at least 1 (remove the key for no limit)"),
        ));
    }
    Ok(n)
}

fn duration(
    v: &Spanned<DurText>,
    key: &str,
    positive: bool,
    src: &Src<'_>,
) -> Result<Duration, ConfigError> {
    let text = &v.get_ref().0;
    let value = parse_duration(text).map_err(|reason| {
        src.at(
            v.span().start,
            format!("bad duration {text:?} for {key}: {reason}; {DURATION_EXAMPLES}"),
        )
    })?;
    if positive && value.is_zero() {
        return Err(src.at(
            v.span().start,
            format!("{key} must be greater than 0, got {text:?}"),
        ));
    }
    Ok(value)
}

fn check_marker_manifest(
    config: &SiteConfig,
    raw: &RawSite,
    fallback: usize,
    src: &Src<'_>,
) -> Result<(), ConfigError> {
    if config.marker != config.manifest {
        return Ok(());
    }
    let at = raw
        .manifest
        .as_ref()
        .or(raw.marker.as_ref())
        .map_or(fallback, |v| v.span().start);
    Err(src.at(
        at,
        format!(
            "marker and manifest must be different files, both are {:?}",
            config.marker
        ),
    ))
}

fn argv(
    value: &Option<Spanned<StrList>>,
    key: &str,
    src: &Src<'_>,
) -> Result<Option<Vec<String>>, ConfigError> {
    let Some(list) = value else {
        return Ok(None);
    };
    let items = &list.get_ref().0;
    let Some(program) = items.first() else {
        return Err(src.at(
            list.span().start,
            format!("{key} must not be empty: give the command as an argv array, e.g. [\"/usr/bin/systemctl\", \"reload\", \"nginx\"], or remove the key"),
        ));
    };
    if program.get_ref().is_empty() {
        return Err(src.at(
            program.span().start,
            format!("{key}: the program (first element) must not be empty"),
        ));
    }
    if let Some(bad) = items.iter().find(|item| item.get_ref().contains('\0')) {
        return Err(src.at(
            bad.span().start,
            format!("{key}: arguments must not contain a NUL byte"),
        ));
    }
    Ok(Some(
        items.iter().map(|item| item.get_ref().clone()).collect(),
    ))
}

fn check_site_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if first_ok && rest_ok && name.len() <= 64 {
        Ok(())
    } else {
        Err(format!(
            "invalid site name {name:?}: expected 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        ))
    }
}

fn parse_root(s: &str) -> Result<PathBuf, String> {
    if s.contains('\0') {
        return Err("root must not contain a NUL byte".to_owned());
    }
    if !s.starts_with('/') {
        return Err(format!("root must be an absolute path, got {s:?}"));
    }
    let mut root = PathBuf::from("/");
    for part in s.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(format!(
                    "root must not contain \"..\" components, got {s:?}"
                ))
            }
            _ => root.push(part),
        }
    }
    if root == Path::new("/") {
        return Err(
            "root must not be \"/\": give the site a directory of its own, e.g. \"/srv/shop\""
                .to_owned(),
        );
    }
    Ok(root)
}

/// A relative path without `.`/`..` components (empty components, e.g. a trailing `/`, are dropped).
fn relative_path(s: &str, what: &str) -> Result<PathBuf, String> {
    if s.contains('\0') {
        return Err(format!("{what} must not contain a NUL byte"));
    }
    if s.starts_with('/') {
        return Err(format!("{what} must be a relative path, got {s:?}"));
    }
    let mut path = PathBuf::new();
    for part in s.split('/') {
        match part {
            "" => {}
            "." | ".." => {
                return Err(format!(
                    "{what} must not contain \".\" or \"..\" components, got {s:?}"
                ))
            }
            _ => path.push(part),
        }
    }
    if path.as_os_str().is_empty() {
        return Err(format!("{what} must not be empty"));
    }
    Ok(path)
}

/// Checks that `target`, resolved from the directory of `link` (as the kernel resolves a
/// relative symlink), stays inside the site root. `..` may only lead the target, at most
/// once per directory `link` is nested in: after a name it would climb out of wherever
/// that name leads (`current/../..` leaves `releases/`, not `current`), which only the
/// filesystem at run time knows.
fn link_target_inside_root(link: &Path, target: &str) -> Result<(), String> {
    let depth = link.components().count().saturating_sub(1);
    let mut ups = 0;
    let mut named = false;
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." if named => {
                return Err(format!(
                    "link target {target:?} must stay inside the site root: \"..\" is only \
                     allowed at its start, e.g. \"current/public\""
                ))
            }
            ".." => ups += 1,
            _ => named = true,
        }
    }
    if ups > depth {
        return Err(format!(
            "link target {target:?} leaves the site root: the link {:?} is {depth} \
             director{} deep, so at most {depth} leading \"..\"",
            link.display().to_string(),
            if depth == 1 { "y" } else { "ies" }
        ));
    }
    Ok(())
}

fn nested(a: &Path, b: &Path) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

fn overlap_message(what: &str, path: &Path, other: &Path) -> String {
    if path == other {
        format!("{what} {:?} is listed twice", path.display().to_string())
    } else {
        format!(
            "{what} {:?} overlaps {what} {:?}: one would be inside the other",
            path.display().to_string(),
            other.display().to_string()
        )
    }
}

fn file_name(s: &str, key: &str) -> Result<String, String> {
    if s.is_empty() || s == "." || s == ".." || s.contains(['/', '\0']) {
        return Err(format!(
            "{key} must be a plain file name (no '/', not \".\" or \"..\"), got {s:?}"
        ));
    }
    Ok(s.to_owned())
}

/// The marker's or the manifest's name (`key`): a plain file name that does not look like
/// an upload's temporary file. As the manifest, such a name would always count as in
/// flight, so every upload would wait for it up to `upload_timeout` and then be rejected;
/// as the marker, an uploader's temporary file (rsync's `.~tmp~` holding directory, a
/// `*.part` still being written) would be claimed as the marker and removed mid-upload.
fn upload_file_name(s: &str, key: &str) -> Result<String, String> {
    let name = file_name(s, key)?;
    if crate::upload::inflight::looks_in_flight(OsStr::new(&name), false) {
        return Err(format!(
            "{key} {name:?} looks like a file still in flight (*.part, *.filepart, \
             rsync's .NAME.XXXXXX, .~tmp~), which the keeper waits for; choose another name"
        ));
    }
    Ok(name)
}

/// An absolute `*.prom` path, lexically normalized (no `.`, `..` or trailing `/`).
fn parse_metrics_file(s: &str) -> Result<PathBuf, String> {
    if s.contains('\0') {
        return Err("metrics_file must not contain a NUL byte".to_owned());
    }
    if !s.starts_with('/') {
        return Err(format!(
            "metrics_file must be an absolute path, e.g. \"/var/lib/prometheus/node-exporter/release-keeper-shop.prom\", got {s:?}"
        ));
    }
    let mut path = PathBuf::from("/");
    for part in s.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(format!(
                    "metrics_file must not contain \"..\" components, got {s:?}"
                ))
            }
            _ => path.push(part),
        }
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if name.len() <= ".prom".len() || !name.ends_with(".prom") || s.ends_with('/') {
        return Err(format!(
            "metrics_file must name a file ending in \".prom\" (node_exporter's textfile collector reads only *.prom), got {s:?}"
        ));
    }
    Ok(path)
}

/// Each site writes its own metrics file: two sites sharing one would overwrite each other.
fn check_unique_metrics_files(sites: &BTreeMap<String, Parsed>) -> Result<(), ConfigError> {
    let mut in_order: Vec<_> = sites.iter().collect();
    in_order.sort_by_key(|(_, parsed)| parsed.order);
    let mut seen: BTreeMap<&Path, (&str, &Loc)> = BTreeMap::new();
    for (name, parsed) in in_order {
        let (Some(file), Some(at)) = (&parsed.config.metrics_file, &parsed.metrics_at) else {
            continue;
        };
        if let Some((other, other_at)) = seen.get(file.as_path()) {
            return Err(at.error(format!(
                "sites {other:?} and {name:?} have the same metrics_file {:?} (see {other_at}); give each site its own file",
                file.display().to_string()
            )));
        }
        seen.insert(file, (name, at));
    }
    Ok(())
}

/// Each site needs a root of its own, compared where the roots lead: two paths to one
/// directory through a symlink (`/var/www -> /srv/www`) would otherwise pass here and the
/// service would refuse to start, taking one site's lock for another service's.
fn check_unique_roots(sites: &BTreeMap<String, Parsed>) -> Result<(), ConfigError> {
    let mut in_order: Vec<_> = sites.iter().collect();
    in_order.sort_by_key(|(_, parsed)| parsed.order);
    let mut seen: BTreeMap<PathBuf, (&str, &Loc, &Path)> = BTreeMap::new();
    for (name, parsed) in in_order {
        let literal = parsed.config.root.as_path();
        // A root that does not exist yet is compared as written.
        let root = fs::canonicalize(literal).unwrap_or_else(|_| literal.to_path_buf());
        if let Some((other, other_at, other_literal)) = seen.get(&root) {
            let at = &parsed.root_at;
            let same = if *other_literal == literal {
                format!("the same root {:?}", literal.display().to_string())
            } else {
                format!(
                    "roots {:?} and {:?}, which are the same directory {:?}",
                    other_literal.display().to_string(),
                    literal.display().to_string(),
                    root.display().to_string()
                )
            };
            return Err(at.error(format!(
                "sites {other:?} and {name:?} have {same} (see {other_at}); each site needs its own root"
            )));
        }
        // A root inside another site's keeper-owned directories would be uploaded,
        // released or pruned as that site's data.
        for (other, &(other_name, other_at, _)) in &seen {
            let (here, other) = (root.as_path(), other.as_path());
            let nested = managed_dir_holding(here, other)
                .map(|dir| (here, name.as_str(), other, other_name, dir))
                .or_else(|| {
                    managed_dir_holding(other, here)
                        .map(|dir| (other, other_name, here, name.as_str(), dir))
                });
            if let Some((inner, inner_name, outer, outer_name, dir)) = nested {
                return Err(parsed.root_at.error(format!(
                    "the root {:?} of site {inner_name:?} is inside {}/ of site {outer_name:?}, which the keeper manages (the other site is at {other_at}); give each site a root of its own",
                    inner.display().to_string(),
                    outer.join(dir).display()
                )));
            }
        }
        seen.insert(root, (name, &parsed.root_at, literal));
    }
    Ok(())
}

/// Why `root` can never be a site's root: it exists and is not a directory, or it lies
/// inside a file. `None` when it is a directory, does not exist yet, or cannot be looked at.
pub fn root_not_a_directory(root: &Path) -> Option<&'static str> {
    match fs::metadata(root) {
        Ok(meta) if !meta.is_dir() => Some("exists and is not a directory"),
        Err(err) if err.raw_os_error() == Some(libc::ENOTDIR) => {
            Some("is inside a file, not a directory")
        }
        _ => None,
    }
}

/// A root that exists but is not a directory (a file, a symlink to one, or a path through
/// a file) can never be served: unlike a root that does not exist yet (a mount to come,
/// waited for), nothing the keeper does would make it one, and the service would wait for
/// it forever saying it does not exist. Only what the filesystem says for sure counts: a
/// root that cannot be looked at (permissions) is left to the service.
fn check_roots_are_directories(sites: &BTreeMap<String, Parsed>) -> Result<(), ConfigError> {
    let mut in_order: Vec<_> = sites.iter().collect();
    in_order.sort_by_key(|(_, parsed)| parsed.order);
    for (name, parsed) in in_order {
        let root = &parsed.config.root;
        let Some(why) = root_not_a_directory(root) else {
            continue;
        };
        return Err(parsed.root_at.error(format!(
            "the root {:?} of site {name:?} {why}; a site's root must be a directory \
             (or not exist yet, then the service waits for it)",
            root.display().to_string()
        )));
    }
    Ok(())
}

/// The keeper-managed directory of the root `outer` (`deploy-cache`, `releases`, ...) that
/// `inner` lies in, if any.
fn managed_dir_holding<'a>(inner: &'a Path, outer: &Path) -> Option<&'a OsStr> {
    let first = inner
        .strip_prefix(outer)
        .ok()?
        .components()
        .next()?
        .as_os_str();
    RESERVED_NAMES.iter().any(|r| first == *r).then_some(first)
}

// ---------------------------------------------------------------------------------------------
// sites.d

/// The `*.toml` files of `sites.d/`, sorted; hidden files and directories are skipped, a
/// missing directory means no extra sites.
fn site_files(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let io_error = |source| ConfigError::Io {
        file: dir.to_path_buf(),
        source,
    };
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(io_error(err)),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(io_error)?.path();
        let hidden = path
            .file_name()
            .is_some_and(|n| n.as_encoded_bytes().starts_with(b"."));
        let is_toml = path.extension().is_some_and(|ext| ext == "toml");
        if hidden || !is_toml || path.is_dir() {
            continue;
        }
        // Reading a FIFO would block check-config, and the service's reload, for good.
        if fs::metadata(&path).is_ok_and(|m| !m.is_file()) {
            return Err(ConfigError::Invalid {
                file: path,
                message: "not a regular file (a FIFO, socket or device): a site file in \
                          sites.d/ must be a regular file"
                    .to_owned(),
            });
        }
        files.push(path);
    }
    files.sort();
    Ok(files)
}

fn site_name_of_file(file: &Path) -> Result<String, ConfigError> {
    let invalid = |detail: String| ConfigError::Invalid {
        file: file.to_path_buf(),
        message: format!("the file name must be a site name followed by \".toml\": {detail}"),
    };
    let stem = file
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| invalid("the name is not valid UTF-8".to_owned()))?;
    check_site_name(stem).map_err(invalid)?;
    Ok(stem.to_owned())
}

// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC_EXAMPLE: &str = r#"[defaults]                 # applies to every site unless overridden
keep = 5
keep_failed = 2
marker = ".release-ready"
manifest = "SHA256SUMS"
require_manifest = true
upload_timeout = "10m"
hook_timeout = "60s"
health_retries = 3
health_interval = "2s"
auto_rollback = true
heal_interval = "60s"
verify_interval = "1h"

[sites.shop]
root = "/srv/shop"
shared = ["storage", ".env"]
links = { htdocs = "current/public" }
before_activate = ["/usr/bin/php", "artisan", "migrate", "--force"]
after_activate = ["/usr/bin/sudo", "systemctl", "reload", "php8.2-fpm"]
health_check = ["/usr/bin/curl", "-fsS", "http://127.0.0.1/health"]
"#;

    fn parse(text: &str) -> Result<BTreeMap<String, SiteConfig>, ConfigError> {
        parse_main(text, Path::new("config.toml"))
    }

    /// Parses `text`, expects an error, and returns it as displayed.
    fn error(text: &str) -> String {
        match parse(text) {
            Ok(sites) => panic!("expected an error, got {sites:?}"),
            Err(err) => err.to_string(),
        }
    }

    /// Asserts the error is at `line:column` and its message contains `needle`.
    fn assert_error(text: &str, line: usize, column: usize, needle: &str) {
        let err = parse(text).expect_err("expected an error");
        match &err {
            ConfigError::At {
                file,
                line: l,
                column: c,
                message,
            } => {
                assert_eq!(file, Path::new("config.toml"));
                assert_eq!((*l, *c), (line, column), "wrong position for {message:?}");
                assert!(message.contains(needle), "{message:?} lacks {needle:?}");
            }
            other => panic!("expected ConfigError::At, got {other:?}"),
        }
    }

    fn sites_root<'a>(sites: &'a BTreeMap<String, SiteConfig>, name: &str) -> &'a str {
        sites[name].root.to_str().unwrap_or_default()
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn spec_example_parses() {
        let sites = parse(SPEC_EXAMPLE).expect("spec example");
        assert_eq!(sites.len(), 1);
        let shop = &sites["shop"];
        let mut expected = SiteConfig::with_defaults("shop", PathBuf::from("/srv/shop"));
        expected.shared = vec![PathBuf::from("storage"), PathBuf::from(".env")];
        expected.links =
            BTreeMap::from([(PathBuf::from("htdocs"), PathBuf::from("current/public"))]);
        expected.before_activate =
            Some(strings(&["/usr/bin/php", "artisan", "migrate", "--force"]));
        expected.after_activate = Some(strings(&[
            "/usr/bin/sudo",
            "systemctl",
            "reload",
            "php8.2-fpm",
        ]));
        expected.health_check = Some(strings(&[
            "/usr/bin/curl",
            "-fsS",
            "http://127.0.0.1/health",
        ]));
        assert_eq!(shop, &expected);
    }

    #[test]
    fn built_in_defaults() {
        let site = SiteConfig::with_defaults("x", PathBuf::from("/srv/x"));
        assert_eq!(site.keep, 5);
        assert_eq!(site.keep_failed, 2);
        assert_eq!(site.marker, ".release-ready");
        assert_eq!(site.manifest, "SHA256SUMS");
        assert!(site.require_manifest);
        assert_eq!(site.upload_timeout, Duration::from_secs(600));
        assert_eq!(site.settle_time, Duration::ZERO);
        assert_eq!(site.hook_timeout, Duration::from_secs(60));
        assert_eq!(site.health_retries, 3);
        assert_eq!(site.health_interval, Duration::from_secs(2));
        assert!(site.auto_rollback);
        assert_eq!(site.heal_interval, Duration::from_secs(60));
        assert_eq!(site.verify_interval, Duration::from_secs(3600));
        assert_eq!((site.max_files, site.max_bytes), (None, None));
        assert!(site.shared.is_empty() && site.links.is_empty());
        assert!(site.before_activate.is_none() && site.health_check.is_none());
    }

    #[test]
    fn defaults_apply_and_sites_override() {
        let text = r#"
[defaults]
keep = 7
upload_timeout = "1h30m"
max_bytes = 1000
auto_rollback = false
manifest = "CHECKSUMS"

[sites.a]
root = "/srv/a/"

[sites.b]
root = "/srv//b/./"
keep = 2
upload_timeout = "500ms"
auto_rollback = true
settle_time = "3s"
max_files = 10
manifest = "SUMS"
marker = "DONE"
"#;
        let sites = parse(text).expect("valid");
        let a = &sites["a"];
        assert_eq!(a.name, "a");
        assert_eq!(a.root, PathBuf::from("/srv/a"));
        assert_eq!(a.keep, 7);
        assert_eq!(a.upload_timeout, Duration::from_secs(5400));
        assert_eq!(a.max_bytes, Some(1000));
        assert_eq!(a.max_files, None);
        assert!(!a.auto_rollback);
        assert_eq!(a.manifest, "CHECKSUMS");
        assert_eq!(a.marker, ".release-ready");
        assert_eq!(a.keep_failed, 2);

        let b = &sites["b"];
        assert_eq!(b.root, PathBuf::from("/srv/b"));
        assert_eq!(b.keep, 2);
        assert_eq!(b.upload_timeout, Duration::from_millis(500));
        assert!(b.auto_rollback);
        assert_eq!(b.settle_time, Duration::from_secs(3));
        assert_eq!(b.max_files, Some(10));
        assert_eq!(b.max_bytes, Some(1000));
        assert_eq!((b.manifest.as_str(), b.marker.as_str()), ("SUMS", "DONE"));
    }

    #[test]
    fn empty_config_is_valid() {
        assert!(parse("").expect("empty").is_empty());
        assert!(parse("[defaults]\nkeep = 3\n[sites]\n")
            .expect("no sites")
            .is_empty());
    }

    #[test]
    fn other_table_syntaxes() {
        let dotted = parse("sites.a.root = \"/a\"\nsites.a.keep = 4\n").expect("dotted keys");
        assert_eq!((sites_root(&dotted, "a"), dotted["a"].keep), ("/a", 4));
        let text = "[sites]\nb = { root = \"/b\", keep = 1 }\n[sites.c]\nroot = \"/c\"\n[sites.c.links]\n\"public_html\" = \"current/public\"\n";
        let sites = parse(text).expect("valid");
        assert_eq!(sites.keys().collect::<Vec<_>>(), ["b", "c"]);
        assert_eq!(sites["b"].keep, 1);
        assert_eq!(
            sites["c"].links.get(Path::new("public_html")),
            Some(&PathBuf::from("current/public"))
        );
    }

    #[test]
    fn unknown_keys_point_at_the_key() {
        assert_error(
            "[sites.shop]\nroot = \"/srv/shop\"\nkep = 3\n",
            3,
            1,
            "unknown key \"kep\" in [sites.shop]; did you mean \"keep\"?",
        );
        assert_error(
            "[defaults]\nkeep = 1\n  colour = \"red\"\n",
            3,
            3,
            "unknown key \"colour\" in [defaults]; expected one of: keep,",
        );
        assert_error(
            "[defaults]\nroot = \"/x\"\n",
            2,
            1,
            "\"root\" cannot be set in [defaults]",
        );
        assert_error("keep = 3\n", 1, 1, "unknown key \"keep\" at the top level");
        assert_error(
            "[site.shop]\nroot = \"/x\"\n",
            1,
            2,
            "did you mean \"sites\"?",
        );
        assert_error(
            "[sites.shop]\nroot = \"/x\"\n[sites.shop.hooks]\nx = 1\n",
            3,
            13,
            "unknown key \"hooks\" in [sites.shop]",
        );
        // The first unknown key in the file is reported, whatever the table order.
        assert_error(
            "[sites.b]\nroot = \"/b\"\nzzz = 1\n[sites.a]\nroot = \"/a\"\naaa = 1\n",
            3,
            1,
            "\"zzz\"",
        );
    }

    #[test]
    fn suggestions_only_for_near_misses() {
        let site = |key: &str| unknown_key_message(key, Where::Site("s"));
        assert!(site("upload_timout").ends_with("did you mean \"upload_timeout\"?"));
        assert!(site("healthcheck").ends_with("did you mean \"health_check\"?"));
        assert!(site("foo").contains("expected one of: root, shared, links,"));
        assert!(site("timeout").contains("expected one of"));
    }

    #[test]
    fn wrong_types_point_at_the_value() {
        assert_error(
            "[sites.shop]\nroot = \"/x\"\nkeep = \"five\"\n",
            3,
            8,
            "expected a non-negative integer",
        );
        assert_error(
            "[defaults]\nkeep = -1\n",
            2,
            8,
            "expected a non-negative integer",
        );
        assert_error(
            "[defaults]\nupload_timeout = 600\n",
            2,
            18,
            "duration string",
        );
        assert_error("[defaults]\nauto_rollback = \"yes\"\n", 2, 17, "bool");
        assert_error("[sites.a]\nroot = 5\n", 2, 8, "string");
        assert_error(
            "[sites.a]\nroot = \"/a\"\nshared = \"storage\"\n",
            3,
            10,
            "an array of strings",
        );
        assert_error(
            "[sites.a]\nroot = \"/a\"\nshared = [\"ok\", 3]\n",
            3,
            17,
            "string",
        );
        assert_error(
            "[sites.a]\nroot = \"/a\"\nlinks = \"htdocs\"\n",
            3,
            9,
            "a table of link names",
        );
        assert_error("[sites]\nshop = 1\n", 2, 8, "site \"shop\" must be a table");
        assert_error("defaults = 3\n", 1, 12, "\"defaults\" must be a table");
        assert_error("sites = [1]\n", 1, 9, "\"sites\" must be a table");
    }

    #[test]
    fn a_duplicate_names_its_first_definition_where_the_text_shows_it() {
        assert_error(
            "[sites.a]\nroot = \"/a\"\n[ sites.a ] # again\nkeep = 2\n",
            3,
            9,
            "[sites.a] is defined twice: here and at line 1",
        );
        assert_error(
            "[sites.a]\nroot = \"/a\"\n[sites.b]\nroot = \"/b\"\nkeep = 1\nroot = \"/c\"\n",
            6,
            1,
            "already set at line 4",
        );
        // Dotted keys: only the second place, but still a clear error.
        let err = error("[sites.a]\nroot = \"/a\"\n[sites]\na.keep = 3\n");
        assert!(
            err.contains("duplicate key \"a\"") && !err.contains("line 1"),
            "{err}"
        );
        let err = error("sites.\"é\".root = \"/a\"\n[sites.\"é\"]\nkeep = 1\n");
        assert!(err.contains("duplicate key"), "{err}");
    }

    #[test]
    fn syntax_errors_have_positions() {
        assert_error("[sites.shop\nroot = \"/x\"\n", 1, 12, "");
        assert_error(
            "[sites.shop]\nroot = \"/x\"\nroot = \"/y\"\n",
            3,
            1,
            "duplicate key \"root\"",
        );
    }

    #[test]
    fn bad_values_point_at_the_value() {
        assert_error(
            "[sites.shop]\nroot = \"/srv/shop\"\nupload_timeout = \"10 minutes\"\n",
            3,
            18,
            r#"bad duration "10 minutes" for upload_timeout: missing unit right after the number (no space; write "10m"); expected e.g. "500ms", "2s", "10m", "1h""#,
        );
        assert_error(
            "[defaults]\nhook_timeout = \"0s\"\n",
            2,
            16,
            "hook_timeout must be greater than 0",
        );
        assert_error(
            "[defaults]\nheal_interval = \"0ms\"\n",
            2,
            17,
            "greater than 0",
        );
        assert_error(
            "[defaults]\nverify_interval = \"0h\"\n",
            2,
            19,
            "greater than 0",
        );
        assert_error(
            "[sites.shop]\nroot = \"srv/shop\"\n",
            2,
            8,
            r#"root must be an absolute path, got "srv/shop""#,
        );
        assert_error("[sites.shop]\nroot = \"/srv/../etc\"\n", 2, 8, "\"..\"");
        assert_error(
            "[sites.shop]\nroot = \"//\"\n",
            2,
            8,
            "root must not be \"/\"",
        );
        assert_error(
            "[sites.shop]\nroot = \"/x\"\nkeep = 0\n",
            3,
            8,
            "keep must be at least 1, got 0",
        );
        assert_error(
            "[defaults]\nhealth_retries = 0\n",
            2,
            18,
            "health_retries must be at least 1",
        );
        assert_error(
            "[defaults]\nhealth_retries = 4294967296\n",
            2,
            18,
            "too large",
        );
        assert_error(
            "[defaults]\nmax_files = 0\n",
            2,
            13,
            "remove the key for no limit",
        );
        assert_error("[defaults]\nmarker = \"a/b\"\n", 2, 10, "plain file name");
        assert_error("[defaults]\nmanifest = \"..\"\n", 2, 12, "plain file name");
        assert_error("[defaults]\nmarker = \"\"\n", 2, 10, "plain file name");
        assert_error("[defaults]\nmanifest = \"sums.part\"\n", 2, 12, "in flight");
        assert_error(
            "[defaults]\nmanifest = \".release-ready\"\n",
            2,
            12,
            "must be different",
        );
        assert_error(
            "[defaults]\nmanifest = \"X\"\n[sites.a]\nroot = \"/a\"\nmarker = \"X\"\n",
            5,
            10,
            "must be different",
        );
    }

    #[test]
    fn unsafe_paths_point_at_the_entry() {
        let site = "[sites.shop]\nroot = \"/srv/shop\"\n";
        let cases: [(&str, usize, &str); 7] = [
            (
                "shared = [\"ok\", \"../etc\"]",
                17,
                "must not contain \".\" or \"..\"",
            ),
            ("shared = [\"/etc\"]", 11, "must be a relative path"),
            ("shared = [\"a/./b\"]", 11, "\".\""),
            ("shared = [\"\"]", 11, "must not be empty"),
            ("shared = [\"a\\u0000\"]", 11, "NUL"),
            ("shared = [\"storage\", \"storage/logs\"]", 22, "overlaps"),
            ("shared = [\"x\", \"x/\"]", 16, "listed twice"),
        ];
        for (line, column, needle) in cases {
            assert_error(&format!("{site}{line}\n"), 3, column, needle);
        }
        let links: [(&str, usize, &str); 7] = [
            ("links = { \"../up\" = \"x\" }", 11, "must not contain"),
            (
                "links = { \"/abs\" = \"x\" }",
                11,
                "must be a relative path",
            ),
            ("links = { current = \"x\" }", 11, "reserved"),
            ("links = { \"releases/x\" = \"x\" }", 11, "reserved"),
            (
                "links = { htdocs = \"/srv/x\" }",
                20,
                "link target must be relative",
            ),
            ("links = { htdocs = \"\" }", 20, "must not be empty"),
            ("links = { a = \"x\", \"a/b\" = \"y\" }", 20, "overlaps"),
        ];
        for (line, column, needle) in links {
            assert_error(&format!("{site}{line}\n"), 3, column, needle);
        }
    }

    #[test]
    fn link_targets_with_dotdot_escaping_the_site_root_are_rejected() {
        let site = "[sites.shop]\nroot = \"/srv/shop\"\n";
        let cases: [(&str, usize, &str); 5] = [
            (
                "links = { htdocs = \"../etc\" }",
                20,
                "leaves the site root",
            ),
            ("links = { htdocs = \"..\" }", 20, "leaves the site root"),
            (
                "links = { htdocs = \"current/../../etc\" }",
                20,
                "must stay inside the site root",
            ),
            (
                "links = { htdocs = \"./current/public/..\" }",
                20,
                "must stay inside the site root",
            ),
            (
                "links = { \"web/htdocs\" = \"../../srv\" }",
                26,
                "leaves the site root",
            ),
        ];
        for (line, column, needle) in cases {
            assert_error(&format!("{site}{line}\n"), 3, column, needle);
        }
        // A nested link reaches `current` from its own directory.
        let ok = parse(&format!(
            "{site}links = {{ \"web/htdocs\" = \"../current/public\", top = \"current\" }}\n"
        ))
        .expect("a leading \"..\" per directory of the link stays inside the root");
        assert_eq!(
            ok["shop"]
                .links
                .get(Path::new("web/htdocs"))
                .map(PathBuf::as_path),
            Some(Path::new("../current/public"))
        );
    }

    #[test]
    fn metrics_file_is_an_absolute_prom_path_per_site() {
        let ok = parse_main(
            "[sites.a]\nroot = \"/srv/a\"\nmetrics_file = \"/var/lib/node-exporter/./a.prom\"\n\
             [sites.b]\nroot = \"/srv/b\"\n",
            Path::new("c.toml"),
        )
        .unwrap();
        assert_eq!(
            ok["a"].metrics_file.as_deref(),
            Some(Path::new("/var/lib/node-exporter/a.prom"))
        );
        assert_eq!(ok["b"].metrics_file, None);
        let site = "[sites.a]\nroot = \"/srv/a\"\n";
        for (value, needle) in [
            ("\"a.prom\"", "must be an absolute path"),
            ("\"/x/../a.prom\"", "must not contain \"..\""),
            ("\"/var/lib/a.txt\"", "ending in \".prom\""),
            ("\"/var/lib/a.prom/\"", "ending in \".prom\""),
            ("\"/var/lib/.prom\"", "ending in \".prom\""),
            ("3", "invalid type"),
        ] {
            assert_error(&format!("{site}metrics_file = {value}\n"), 3, 16, needle);
        }
        assert_error(
            "[defaults]\nmetrics_file = \"/m/a.prom\"\n",
            2,
            1,
            "\"metrics_file\" cannot be set in [defaults]: it is per site",
        );
        assert_error(
            "[sites.a]\nroot = \"/srv/a\"\nmetrics_file = \"/m/x.prom\"\n\
             [sites.b]\nroot = \"/srv/b\"\nmetrics_file = \"/m//x.prom\"\n",
            6,
            16,
            "sites \"a\" and \"b\" have the same metrics_file \"/m/x.prom\" (see config.toml:3:16)",
        );
    }

    #[test]
    fn hook_user_is_a_plain_user_name() {
        let ok = parse_main(
            "[defaults]\nhook_user = \"www-data\"\n[sites.a]\nroot = \"/srv/a\"\n",
            Path::new("c.toml"),
        )
        .unwrap();
        assert_eq!(ok["a"].hook_user.as_deref(), Some("www-data"));
        let err = parse_main(
            "[sites.a]\nroot = \"/srv/a\"\nhook_user = \"../x y\"\n",
            Path::new("c.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("c.toml:3:13: hook_user must be"), "{err}");
    }

    #[test]
    fn hooks_are_checked() {
        let site = "[sites.shop]\nroot = \"/srv/shop\"\n";
        assert_error(
            &format!("{site}before_activate = []\n"),
            3,
            19,
            "before_activate must not be empty",
        );
        assert_error(
            &format!("{site}health_check = [\"\", \"x\"]\n"),
            3,
            17,
            "program",
        );
        assert_error(
            &format!("{site}after_activate = [\"/bin/x\", \"a\\u0000\"]\n"),
            3,
            29,
            "NUL",
        );
    }

    #[test]
    fn missing_root_points_at_the_site_table() {
        assert_error(
            "[defaults]\nkeep = 3\n\n[sites.blog]\nkeep = 2\n",
            4,
            1,
            "missing key \"root\" in [sites.blog]",
        );
        assert_error(
            "[sites]\nblog = { keep = 2 }\n",
            2,
            8,
            "missing key \"root\" in [sites.blog]",
        );
    }

    #[test]
    fn site_names_are_checked() {
        assert_error(
            "[sites.\"my shop\"]\nroot = \"/x\"\n",
            1,
            8,
            "invalid site name \"my shop\"",
        );
        assert_error("[sites._x]\nroot = \"/x\"\n", 1, 8, "invalid site name");
        let long = "a".repeat(65);
        assert_error(
            &format!("[sites.{long}]\nroot = \"/x\"\n"),
            1,
            8,
            "invalid site name",
        );
        let max = "a".repeat(64);
        assert!(parse(&format!(
            "[sites.{max}]\nroot = \"/x\"\n[sites.\"A-1.b_c\"]\nroot = \"/y\"\n"
        ))
        .is_ok());
    }

    #[test]
    fn a_root_inside_another_sites_managed_directories_is_an_error() {
        let text = "[sites.a]\nroot = \"/srv/a\"\n[sites.b]\nroot = \"/srv/a/deploy-cache/b\"\n";
        assert_error(
            text,
            4,
            8,
            "the root \"/srv/a/deploy-cache/b\" of site \"b\" is inside /srv/a/deploy-cache/ of site \"a\", which the keeper manages (the other site is at config.toml:2:8)",
        );
        // The other way round (the outer site named second) too.
        let text = "[sites.b]\nroot = \"/srv/a/shared/b\"\n[sites.a]\nroot = \"/srv/a\"\n";
        assert_error(
            text,
            4,
            8,
            "the root \"/srv/a/shared/b\" of site \"b\" is inside /srv/a/shared/ of site \"a\"",
        );
        // A site beside another's managed directories is its business.
        assert!(parse("[sites.a]\nroot = \"/srv/a\"\n[sites.b]\nroot = \"/srv/a/blog\"\n").is_ok());
    }

    #[test]
    fn same_root_names_both_sites() {
        let text = "[sites.a]\nroot = \"/srv/x\"\n[sites.b]\nroot = \"/srv/./x/\"\n";
        assert_error(
            text,
            4,
            8,
            "sites \"a\" and \"b\" have the same root \"/srv/x\" (see config.toml:2:8)",
        );
    }

    #[test]
    fn roots_that_are_one_directory_through_a_symlink_are_the_same_root() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("srv/www");
        fs::create_dir_all(&real).unwrap();
        let link = d.path().join("www");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let text = format!(
            "[sites.a]\nroot = \"{}\"\n[sites.b]\nroot = \"{}\"\n",
            link.display(),
            real.display()
        );
        let err = parse(&text).expect_err("one directory").to_string();
        assert!(
            err.contains(&format!(
                "sites \"a\" and \"b\" have roots \"{}\" and \"{}\", which are the same directory",
                link.display(),
                real.display()
            )),
            "{err}"
        );
        // Nested through the link, too.
        let text = format!(
            "[sites.a]\nroot = \"{}\"\n[sites.b]\nroot = \"{}/releases/b\"\n",
            real.display(),
            link.display()
        );
        fs::create_dir_all(real.join("releases/b")).unwrap();
        let err = parse(&text).expect_err("nested").to_string();
        assert!(err.contains("which the keeper manages"), "{err}");
    }

    #[test]
    fn columns_count_characters_and_handle_crlf() {
        assert_error(
            "[sites.shop]\r\nroot = \"/x\"\r\nlinks = { \"ü\" = \"/abs\" }\r\n",
            3,
            17,
            "relative",
        );
        assert_eq!(line_col("ab\ncd", 3), (2, 1));
        assert_eq!(line_col("ab\ncd", 99), (2, 3));
        assert_eq!(line_col("é", 1), (1, 1));
        assert_eq!(line_col("", 0), (1, 1));
    }

    #[test]
    fn error_display_names_file_line_column() {
        let text = "[sites.shop]\nroot = \"/x\"\nkeep = 0\n";
        assert_eq!(
            error(text),
            "config.toml:3:8: keep must be at least 1, got 0"
        );
    }

    #[test]
    fn durations() {
        let ok = [
            ("500ms", Duration::from_millis(500)),
            ("2s", Duration::from_secs(2)),
            ("10m", Duration::from_secs(600)),
            ("1h", Duration::from_secs(3600)),
            ("1d", Duration::from_secs(86_400)),
            ("1h30m", Duration::from_secs(5400)),
            ("1m500ms", Duration::from_millis(60_500)),
            ("0s", Duration::ZERO),
            ("0", Duration::ZERO),
            ("007s", Duration::from_secs(7)),
        ];
        for (text, expected) in ok {
            assert_eq!(parse_duration(text), Ok(expected), "{text}");
        }
        let bad = [
            ("", "empty"),
            ("10", "missing unit"),
            ("1h30", "missing unit"),
            ("10 minutes", "missing unit"),
            ("1.5s", "integers only"),
            ("5x", "unknown unit"),
            ("10sec", "unknown unit"),
            ("10M", "unknown unit"),
            ("-1s", "negative"),
            ("s", "expected a number"),
            (" 1s", "expected a number"),
            ("1s ", "expected a number"),
            ("99999999999999999999s", "too large"),
            ("213503982335d", "too large"),
        ];
        for (text, needle) in bad {
            match parse_duration(text) {
                Ok(value) => panic!("{text:?} parsed as {value:?}"),
                Err(message) => assert!(message.contains(needle), "{text:?}: {message:?}"),
            }
        }
    }

    #[test]
    fn resolve_path_precedence() {
        let flag = Path::new("/tmp/flag.toml");
        let env = || Some(OsString::from("/tmp/env.toml"));
        assert_eq!(resolve_path_from(Some(flag), env()), flag);
        assert_eq!(resolve_path_from(None, env()), Path::new("/tmp/env.toml"));
        assert_eq!(
            resolve_path_from(None, Some(OsString::new())),
            Path::new(DEFAULT_CONFIG_PATH)
        );
        assert_eq!(
            resolve_path_from(None, None),
            Path::new(DEFAULT_CONFIG_PATH)
        );
    }

    fn write(path: &Path, text: &str) {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).expect("mkdir");
        }
        fs::write(path, text).expect("write");
    }

    #[test]
    fn load_reads_sites_d() {
        let dir = tempfile::tempdir().expect("tempdir");
        let main = dir.path().join("config.toml");
        write(
            &main,
            "[defaults]\nkeep = 9\n\n[sites.shop]\nroot = \"/srv/shop\"\n",
        );
        write(
            &dir.path().join("sites.d/blog.toml"),
            "root = \"/srv/blog\"\nkeep_failed = 0\nlinks = { htdocs = \"current\" }\n",
        );
        write(
            &dir.path().join("sites.d/a.b-c.toml"),
            "root = \"/srv/abc\"\nkeep = 1\n",
        );
        write(&dir.path().join("sites.d/README"), "not a site");
        write(&dir.path().join("sites.d/.hidden.toml"), "garbage = ");
        write(&dir.path().join("sites.d/old.toml.bak"), "garbage = ");
        fs::create_dir_all(dir.path().join("sites.d/dir.toml")).expect("mkdir");

        let config = load(&main).expect("load");
        assert_eq!(config.path, main);
        assert_eq!(
            config.sites.keys().collect::<Vec<_>>(),
            ["a.b-c", "blog", "shop"]
        );
        let blog = &config.sites["blog"];
        assert_eq!(blog.name, "blog");
        assert_eq!(blog.root, PathBuf::from("/srv/blog"));
        assert_eq!(blog.keep, 9, "defaults of config.toml apply to sites.d");
        assert_eq!(blog.keep_failed, 0);
        assert_eq!(config.sites["a.b-c"].keep, 1);
        assert_eq!(config.sites["shop"].keep, 9);
    }

    #[test]
    fn load_without_sites_d_and_missing_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let main = dir.path().join("config.toml");
        write(&main, "");
        assert!(load(&main).expect("load").sites.is_empty());
        let missing = dir.path().join("nope.toml");
        match load(&missing) {
            Err(ConfigError::Invalid { file, message }) => {
                assert_eq!(file, missing);
                assert!(message.contains("no such config file"), "{message}");
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn sites_d_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let main = dir.path().join("config.toml");
        let sites_d = dir.path().join("sites.d");
        write(&main, "[sites.shop]\nroot = \"/srv/shop\"\n");

        // A bad key in a site file is reported in that file.
        let blog = sites_d.join("blog.toml");
        write(&blog, "root = \"/srv/blog\"\n\nkepp = 3\n");
        match load(&main) {
            Err(ConfigError::At {
                file,
                line,
                column,
                message,
            }) => {
                assert_eq!((file.as_path(), line, column), (blog.as_path(), 3, 1));
                assert!(
                    message
                        .contains("unknown key \"kepp\" for site \"blog\"; did you mean \"keep\"?"),
                    "{message}"
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        write(&blog, "[sites.blog]\nroot = \"/srv/blog\"\n");
        let err = load(&main).expect_err("header in site file").to_string();
        assert!(
            err.contains("blog.toml:1:2: unknown key \"sites\""),
            "{err}"
        );
        write(&blog, "keep = 2\n");
        let err = load(&main).expect_err("no root").to_string();
        assert!(
            err.contains("blog.toml:1:1: missing key \"root\" for site \"blog\""),
            "{err}"
        );
        write(&blog, "root = \"/srv/shop/\"\n");
        let err = load(&main).expect_err("same root").to_string();
        assert!(
            err.contains("blog.toml:1:8: sites \"shop\" and \"blog\" have the same root"),
            "{err}"
        );
        assert!(err.contains("config.toml:2:8"), "{err}");
        fs::remove_file(&blog).expect("rm");

        // A file named after an existing site.
        let shop = sites_d.join("shop.toml");
        write(&shop, "root = \"/srv/other\"\n");
        match load(&main) {
            Err(ConfigError::At {
                file,
                line,
                message,
                ..
            }) => {
                assert_eq!((file, line), (main.clone(), 2));
                assert!(
                    message.contains("site \"shop\" is defined twice")
                        && message.contains("shop.toml"),
                    "{message}"
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        fs::remove_file(&shop).expect("rm");

        // A file whose name is not a site name.
        let bad = sites_d.join("my shop.toml");
        write(&bad, "root = \"/srv/x\"\n");
        match load(&main) {
            Err(ConfigError::Invalid { file, message }) => {
                assert_eq!(file, bad);
                assert!(
                    message.contains("invalid site name \"my shop\""),
                    "{message}"
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn invalid_utf8_has_a_position() {
        let dir = tempfile::tempdir().expect("tempdir");
        let main = dir.path().join("config.toml");
        fs::write(&main, b"[sites.a]\nroot = \"/\xff\"\n").expect("write");
        let err = load(&main).expect_err("invalid utf-8").to_string();
        assert!(
            err.ends_with("config.toml:2:10: the file is not valid UTF-8"),
            "{err}"
        );
    }

    #[test]
    fn shipped_example_config_parses() {
        let text = include_str!("../conf/config.toml");
        let sites = parse(text).expect("conf/config.toml must parse");
        assert_eq!(sites.keys().collect::<Vec<_>>(), ["shop"]);
        let shop = &sites["shop"];
        assert_eq!(shop.root, PathBuf::from("/srv/shop"));
        assert_eq!(
            shop.shared,
            [PathBuf::from("storage"), PathBuf::from(".env")]
        );
        assert_eq!(
            shop.links.get(Path::new("htdocs")),
            Some(&PathBuf::from("current/public"))
        );
        assert!(shop.before_activate.is_some() && shop.health_check.is_some());
        // The example documents the built-in defaults, so it must not change them.
        let mut expected = SiteConfig::with_defaults("shop", shop.root.clone());
        expected.shared.clone_from(&shop.shared);
        expected.links.clone_from(&shop.links);
        expected.before_activate.clone_from(&shop.before_activate);
        expected.after_activate.clone_from(&shop.after_activate);
        expected.health_check.clone_from(&shop.health_check);
        assert_eq!(shop, &expected);
    }
}
