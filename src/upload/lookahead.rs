//! Directory listings made ahead of the walk, by a few threads.
//!
//! The walk of `deploy-cache/` is one thread, in order, and each directory it enters is an
//! open and a `getdents`: on a cold cache that is a disk read or two, one after another, a
//! thousand times for a 20,000-file web app (about half of a cold incremental release).
//! Here the subdirectories of each listed directory are opened and listed by helper threads
//! while the walk is still busy with what comes before them, so those reads overlap. No
//! work is done twice: the walk takes the listing a helper made (waiting for it if it is
//! under way), or makes it itself when no helper has started it yet.
//!
//! The opens are the walk's own ([`super::walk::open_dir_at`], relative to the parent's
//! descriptor, `O_NOFOLLOW | O_DIRECTORY`), so what a helper reads is exactly what the
//! walk would have read. Memory stays bounded: only the next [`WINDOW`] subdirectories of
//! each directory on the walk's current path are listed ahead.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Helper threads. The reads are short and random: a few in flight keep the disk busy
/// without crowding the build's own workers off two cores.
pub const HELPERS: usize = 3;
/// Subdirectories of one directory listed ahead of the walk.
pub const WINDOW: usize = 8;
/// Listings ahead of the walk in all, each holding an open directory: a deep tree must
/// not run the process out of descriptors (`WINDOW` per level, 128 levels, would be over
/// the usual limit of 1024).
pub const MAX_AHEAD: usize = 64;

/// What listing a directory gives: its descriptor and its sorted entries, or why not.
pub type Listing<L> = std::result::Result<(OwnedFd, L), ListError>;

/// Why a directory could not be listed: opening it (the walk maps the errno, as for its
/// own opens) or reading it.
#[derive(Debug)]
pub enum ListError {
    /// `openat` failed.
    Open(nix::errno::Errno),
    /// Reading the open directory failed.
    Read(crate::error::Error),
}

enum State<L> {
    /// Waiting for a helper.
    Queued,
    /// A helper is at it.
    Running,
    /// Finished, not yet taken.
    Done(Listing<L>),
    /// Taken by the walk (made by it, or collected from a helper), or given up.
    Taken,
    /// Given up while a helper was at it: the helper drops what it makes.
    Abandoned,
}

/// One subdirectory to list: where it is, and what became of it.
pub struct Slot<L> {
    parent: Arc<OwnedFd>,
    name: OsString,
    /// Its full path, for the listing's errors.
    path: PathBuf,
    state: Mutex<State<L>>,
    done: Condvar,
}

/// The queue shared by the walk and its helpers.
pub struct Lookahead<L> {
    /// By path: the walk is depth-first over sorted names, so it enters directories in
    /// the order of their paths (compared by components), and the smallest queued path is
    /// the one it will need soonest.
    queue: Mutex<BTreeMap<PathBuf, Arc<Slot<L>>>>,
    more: Condvar,
    /// Helpers waiting on `more`: a wake-up is a syscall, spent only when one is.
    idle: AtomicUsize,
    /// Slots handed out and not yet taken or given up (at most `MAX_AHEAD`).
    outstanding: AtomicUsize,
    stop: AtomicBool,
    list: fn(&OwnedFd, &Path) -> crate::error::Result<L>,
}

/// Blocks this thread has read from disk so far (`ru_inblock`), if the kernel says.
pub fn thread_block_reads() -> Option<i64> {
    use nix::sys::resource::{getrusage, UsageWho};
    getrusage(UsageWho::RUSAGE_THREAD)
        .ok()
        .map(|u| u.block_reads())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves only plain data behind.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<L: Send> Lookahead<L> {
    /// A queue whose directories are listed by `list` (given the open directory and its
    /// full path).
    pub fn new(list: fn(&OwnedFd, &Path) -> crate::error::Result<L>) -> Self {
        Lookahead {
            queue: Mutex::new(BTreeMap::new()),
            more: Condvar::new(),
            idle: AtomicUsize::new(0),
            outstanding: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            list,
        }
    }

    /// A slot for the subdirectory `name` of `parent` (full path `path`), queued for a
    /// helper; `None` while `MAX_AHEAD` are out (the walk lists that one itself).
    pub fn ahead(
        &self,
        parent: &Arc<OwnedFd>,
        name: OsString,
        path: PathBuf,
    ) -> Option<Arc<Slot<L>>> {
        // Only the walk hands slots out, so the check and the increment cannot race.
        if self.outstanding.load(Ordering::Relaxed) >= MAX_AHEAD {
            return None;
        }
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot {
            parent: Arc::clone(parent),
            name,
            path,
            state: Mutex::new(State::Queued),
            done: Condvar::new(),
        });
        lock(&self.queue).insert(slot.path.clone(), Arc::clone(&slot));
        // Read after the insert, under which a helper going idle counts itself: none
        // can miss it.
        if self.idle.load(Ordering::SeqCst) > 0 {
            self.more.notify_one();
        }
        Some(slot)
    }

    /// The listing of `slot`: a helper's, waited for if one is making it, or made now.
    pub fn take(&self, slot: &Slot<L>) -> Listing<L> {
        let mut st = lock(&slot.state);
        if !matches!(*st, State::Taken | State::Abandoned) {
            self.outstanding.fetch_sub(1, Ordering::Relaxed);
        }
        loop {
            match std::mem::replace(&mut *st, State::Taken) {
                State::Queued => {
                    drop(st);
                    return self.make(slot);
                }
                State::Running => {
                    *st = State::Running;
                    st = slot
                        .done
                        .wait(st)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                State::Done(listing) => return listing,
                State::Taken | State::Abandoned => {
                    // Taken twice: a caller's bug, answered as a failed read.
                    return Err(ListError::Read(crate::error::Error::Failed(format!(
                        "{} was listed twice",
                        slot.path.display()
                    ))));
                }
            }
        }
    }

    fn make(&self, slot: &Slot<L>) -> Listing<L> {
        self.list_now(&slot.parent, &slot.name, &slot.path)
    }

    /// Opens and lists the subdirectory `name` of `parent` (full path `path`) on this
    /// thread: what a helper does for a slot, and what the walk does for a directory it
    /// reaches without one.
    pub fn list_now(&self, parent: &OwnedFd, name: &OsStr, path: &Path) -> Listing<L> {
        let fd = super::walk::open_dir_at(parent, name).map_err(ListError::Open)?;
        let entries = (self.list)(&fd, path).map_err(ListError::Read)?;
        Ok((fd, entries))
    }

    /// A helper thread's loop, until [`Lookahead::finish`].
    pub fn help(&self) {
        loop {
            let slot = {
                let mut q = lock(&self.queue);
                loop {
                    if self.stop.load(Ordering::Acquire) {
                        return;
                    }
                    if let Some((_, s)) = q.pop_first() {
                        break s;
                    }
                    self.idle.fetch_add(1, Ordering::SeqCst);
                    q = self
                        .more
                        .wait(q)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    self.idle.fetch_sub(1, Ordering::SeqCst);
                }
            };
            {
                let mut st = lock(&slot.state);
                if !matches!(*st, State::Queued) {
                    continue;
                }
                *st = State::Running;
            }
            let listing = self.make(&slot);
            let mut st = lock(&slot.state);
            *st = match *st {
                State::Abandoned => State::Taken,
                _ => State::Done(listing),
            };
            drop(st);
            slot.done.notify_all();
        }
    }

    /// Gives up `slot`: the walk will not enter it (skipped, or no longer a directory).
    pub fn cancel(&self, slot: &Slot<L>) {
        let mut st = lock(&slot.state);
        let next = match *st {
            State::Taken | State::Abandoned => return,
            State::Running => State::Abandoned,
            State::Queued | State::Done(_) => State::Taken,
        };
        self.outstanding.fetch_sub(1, Ordering::Relaxed);
        // A finished listing (and its descriptor) is dropped here.
        *st = next;
    }

    /// Stops the helpers; what is still queued is dropped (the walk has ended).
    pub fn finish(&self) {
        self.stop.store(true, Ordering::Release);
        lock(&self.queue).clear();
        self.more.notify_all();
    }
}
