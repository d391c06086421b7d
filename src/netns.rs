//! Entering a network namespace.
//!
//! A namespace is entered on a dedicated OS thread, never on an async worker: the thread
//! calls `setns(CLONE_NEWNET)` and everything it then opens (netlink sockets,
//! `/proc/sys/net` files) and every process it spawns (`iptables-restore`) belongs to that
//! namespace. The thread ends when the work is done, so no other code ever runs in a
//! namespace it did not ask for.

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};

/// Where bind-mounted named namespaces live (`ip netns add NAME`).
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// A network namespace, named by a file: a `/run/netns/NAME` bind mount, a Docker
/// sandbox key, or `/proc/PID/ns/net`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct NetnsPath(PathBuf);

impl NetnsPath {
    /// `arg` is a path if it contains a `/`, otherwise a name under `/run/netns`.
    pub fn from_arg(arg: &str) -> Self {
        if arg.contains('/') {
            NetnsPath(PathBuf::from(arg))
        } else {
            NetnsPath(Path::new(NETNS_RUN_DIR).join(arg))
        }
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl fmt::Display for NetnsPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.display().fmt(f)
    }
}

/// Errors entering a namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace file does not exist or cannot be opened.
    #[error("network namespace {path} cannot be opened: {source}")]
    Open { path: NetnsPath, source: std::io::Error },
    /// `setns` refused the file (not a network namespace, or not permitted).
    #[error("cannot enter network namespace {path}: {source}")]
    Enter { path: NetnsPath, source: nix::Error },
    /// The worker thread could not be started or panicked.
    #[error("namespace worker thread for {path} failed: {reason}")]
    Thread { path: NetnsPath, reason: String },
}

impl NetnsError {
    /// The namespace file does not exist.
    pub fn is_absent(&self) -> bool {
        matches!(self, NetnsError::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }

    /// The file exists but is no network namespace: `setns` gives `EINVAL` for an empty
    /// regular file (what a torn-down or half-made namespace leaves) or another type.
    pub fn is_not_netns(&self) -> bool {
        matches!(
            self,
            NetnsError::Enter {
                source: nix::errno::Errno::EINVAL,
                ..
            }
        )
    }
}

/// Check that `ns` names something that can be opened, without entering it.
pub fn check(ns: &NetnsPath) -> Result<(), NetnsError> {
    File::open(ns.path())
        .map(drop)
        .map_err(|source| NetnsError::Open {
            path: ns.clone(),
            source,
        })
}

/// Run `work` on a new OS thread that has entered the network namespace `ns`, and return
/// its result. The thread exits afterwards, so the namespace never leaks to other work.
pub fn run_in<R, F>(ns: &NetnsPath, work: F) -> Result<R, NetnsError>
where
    F: FnOnce() -> R + Send,
    R: Send,
{
    let file = File::open(ns.path()).map_err(|source| NetnsError::Open {
        path: ns.clone(),
        source,
    })?;
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name("vipd-netns".into())
            .spawn_scoped(scope, move || {
                setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
                    path: ns.clone(),
                    source,
                })?;
                Ok(work())
            })
            .map_err(|e| NetnsError::Thread {
                path: ns.clone(),
                reason: e.to_string(),
            })?;
        handle.join().map_err(|_| NetnsError::Thread {
            path: ns.clone(),
            reason: "panicked".into(),
        })?
    })
}
