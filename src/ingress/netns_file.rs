//! The ingress namespace's file: `/run/netns/<name>`, a bind mount of a network
//! namespace made the way `ip netns add` makes it, and its removal.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};

use super::{Changes, IngressError};
use crate::netns::{NetnsPath, NETNS_RUN_DIR};

/// What `/run/netns/<name>` is.
#[derive(Debug, PartialEq, Eq)]
enum NetnsFile {
    Absent,
    /// There, but not a network namespace (an empty file left by a crash halfway).
    NotNetns,
    Netns,
}

/// Whether `ns` is a mounted network namespace. The test is the kernel's own: `setns`
/// with `CLONE_NEWNET` on a throwaway thread succeeds only on a network namespace file
/// (an empty regular file, or another namespace type, gives `EINVAL`).
fn netns_file(ns: &NetnsPath) -> Result<NetnsFile, IngressError> {
    match crate::netns::run_in(ns, || ()) {
        Ok(()) => Ok(NetnsFile::Netns),
        Err(e) if e.is_absent() => Ok(NetnsFile::Absent),
        Err(e) if e.is_not_netns() => Ok(NetnsFile::NotNetns),
        Err(e) => Err(e.into()),
    }
}

/// Make sure `/run/netns/<name>` is a network namespace other than the caller's.
pub(super) fn ensure_netns(ns: &NetnsPath, changes: &mut Changes) -> Result<(), IngressError> {
    match netns_file(ns)? {
        NetnsFile::Netns => {
            // A bind mount of the host's own namespace would have vipd rewire the host.
            let own = "/proc/thread-self/ns/net";
            let meta = |p: &Path| {
                fs::metadata(p)
                    .map(|m| (m.dev(), m.ino()))
                    .map_err(|source| IngressError::File {
                        action: "stat",
                        path: p.to_owned(),
                        source,
                    })
            };
            if meta(ns.path())? == meta(Path::new(own))? {
                return Err(IngressError::NetnsIsHost { path: ns.clone() });
            }
            Ok(())
        }
        state => {
            create_netns(ns)?;
            changes.push(if state == NetnsFile::Absent {
                format!("created network namespace {ns}")
            } else {
                format!("created network namespace {ns} (reusing a file that was not one)")
            });
            Ok(())
        }
    }
}

/// Create a named network namespace the way `ip netns add` does: `/run/netns` a shared
/// mount point (so other mount namespaces see the new mount), an empty file, and a new
/// namespace, made on a thread of its own, bind-mounted onto it.
fn create_netns(ns: &NetnsPath) -> Result<(), IngressError> {
    let path = ns.path();
    let dir = path.parent().unwrap_or(Path::new(NETNS_RUN_DIR));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|source| IngressError::File {
            action: "create directory",
            path: dir.to_owned(),
            source,
        })?;
    make_shared(dir)?;
    // Whatever is mounted there is not a network namespace: take it off.
    unmount_all(path)?;
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o000)
        .open(path)
        .map_err(|source| IngressError::File {
            action: "create",
            path: path.to_owned(),
            source,
        })?;
    super::on_thread("vipd-netns-new", ns, || {
        // Only this thread moves; it ends right after the bind mount, which then
        // holds the namespace.
        unshare(CloneFlags::CLONE_NEWNET).map_err(|source| IngressError::Unshare {
            path: ns.clone(),
            source,
        })?;
        mount(
            Some("/proc/thread-self/ns/net"),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|source| IngressError::Mount {
            action: "bind-mount a new network namespace onto",
            path: path.to_owned(),
            source,
        })
    })?
}

/// Make `dir` a shared mount point, bind-mounting it onto itself first if it is not a
/// mount point at all.
fn make_shared(dir: &Path) -> Result<(), IngressError> {
    let shared = || {
        mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    let err = |action| {
        move |source| IngressError::Mount {
            action,
            path: dir.to_owned(),
            source,
        }
    };
    match shared() {
        Ok(()) => Ok(()),
        // Not a mount point.
        Err(Errno::EINVAL) => {
            mount(
                Some(dir),
                dir,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(err("bind-mount onto itself"))?;
            shared().map_err(err("make a shared mount point of"))
        }
        Err(source) => Err(err("make a shared mount point of")(source)),
    }
}

/// Unmount everything mounted on `path` (lazily, as `ip netns del` does). True if
/// something was.
fn unmount_all(path: &Path) -> Result<bool, IngressError> {
    // Mounts can be stacked; a bound keeps a kernel surprise from looping forever.
    for n in 0..16 {
        match umount2(path, MntFlags::MNT_DETACH) {
            Ok(()) => {}
            Err(Errno::EINVAL | Errno::ENOENT) => return Ok(n > 0),
            Err(source) => {
                return Err(IngressError::Mount {
                    action: "unmount",
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
    Ok(true)
}

/// Unmount and delete `/run/netns/<name>`; what is already gone is fine.
pub(super) fn remove_netns(ns: &NetnsPath) -> Result<(), IngressError> {
    let path = ns.path();
    if unmount_all(path)? {
        tracing::info!("unmounted {ns}");
    }
    match fs::remove_file(path) {
        Ok(()) => tracing::info!("removed {ns}"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(IngressError::File {
                action: "remove",
                path: path.to_owned(),
                source,
            })
        }
    }
    Ok(())
}
