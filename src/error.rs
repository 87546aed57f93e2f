//! The library's error type. Every variant that touches the filesystem carries the path,
//! and every variant maps to one of the exit codes of SPEC.md.

use std::io;
use std::path::{Path, PathBuf};

/// Result alias for the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong, grouped by the exit code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A filesystem call failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path the call was about.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The command line or its arguments are wrong.
    #[error("{0}")]
    Usage(String),
    /// The site's operation lock is held by someone else.
    #[error("site {site} is busy: another release-keeper operation holds {}; {}", lock.display(),
        match waited { Some(w) => format!("still busy after waiting {w}"), None => "retry, or wait for it with --wait [DURATION]".to_string() })]
    Busy {
        /// Site name.
        site: String,
        /// The lock file.
        lock: PathBuf,
        /// How long `--wait` waited, if it was given.
        waited: Option<String>,
    },
    /// Another service holds the site's lifetime lock: a second service for it is refused.
    /// Busy like a held operation lock (exit 75, EX_TEMPFAIL): it is the site being in use
    /// that stops it, not a fault, and it may start once the other one has stopped.
    #[error("another release-keeper service is already running for site {site} ({} is locked)", lock.display())]
    AlreadyServed {
        /// Site name.
        site: String,
        /// The lifetime lock file.
        lock: PathBuf,
    },
    /// An upload was rejected; the reason is logged and shown.
    #[error("upload rejected: {0}")]
    Rejected(String),
    /// The upload changed under the keeper while it was being read (a name vanished or
    /// was swapped): the uploader is still at work. Waited for, then a rejection.
    #[error("upload changed while it was being read: {0}")]
    Changed(String),
    /// Files of the upload still look in flight (an uploader's temporary names): the
    /// build stopped at once, to wait for the upload to finish.
    #[error("files still in flight: {0}")]
    InFlight(String),
    /// An operation failed or found a problem (hook, health check, drift, refusal).
    #[error("{0}")]
    Failed(String),
    /// A switch to a release refused because its last verify found drift.
    #[error("release {release} has drifted from its stored manifest: `verify` at {checked} found {count} changed {} ({paths}); \
        restore it and run `release-keeper verify {site} {release}` again (a clean check lifts this refusal), \
        or pass --force to switch to it as it is", if *count == 1 { "path" } else { "paths" })]
    Drifted {
        /// Site name.
        site: String,
        /// The drifted release.
        release: String,
        /// RFC 3339 time of the check that found the drift.
        checked: String,
        /// How many paths drifted.
        count: usize,
        /// The first drifted paths, then "and N more".
        paths: String,
    },
    /// Not enough free space for a release; the upload is retried later.
    #[error("not enough free space: {0}")]
    NoSpace(String),
    /// The service was asked to stop while working; the work was undone.
    #[error("interrupted by shutdown")]
    Interrupted,
}

impl Error {
    /// The process exit code for this error (SPEC.md: 1 failure, 2 usage/config, 75 busy).
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) | Error::Usage(_) => 2,
            Error::Busy { .. } | Error::AlreadyServed { .. } => 75,
            _ => 1,
        }
    }

    /// True when the error means the disk is full (ENOSPC/EDQUOT, or the pre-check).
    pub fn is_no_space(&self) -> bool {
        match self {
            Error::NoSpace(_) => true,
            Error::Io { source, .. } => {
                matches!(
                    source.raw_os_error(),
                    Some(libc::ENOSPC) | Some(libc::EDQUOT)
                )
            }
            _ => false,
        }
    }
}

/// Attaches a path to an `io::Result`.
pub trait IoContext<T> {
    /// Wraps the error as `Error::Io` naming `path`.
    fn at(self, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: &Path) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

impl<T> IoContext<T> for nix::Result<T> {
    fn at(self, path: &Path) -> Result<T> {
        self.map_err(|errno| Error::Io {
            path: path.to_path_buf(),
            source: io::Error::from(errno),
        })
    }
}
