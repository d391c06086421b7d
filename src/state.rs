//! vipd's state on disk: the VIP and fwmark allocations, so they survive a restart.
//!
//! Writes are atomic: a temporary file in the same directory is written, synced and
//! renamed over the old one, and the directory is synced, so a crash leaves either the old
//! state or the new one, never a torn file.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::core::alloc::Allocations;

/// The file name of the allocations, inside the state directory.
pub const ALLOCATIONS_FILE: &str = "allocations.json";

/// Errors reading or writing the state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {dir}: {source}")]
    Dir { dir: PathBuf, source: std::io::Error },
    #[error("cannot read {file}: {source}")]
    Read { file: PathBuf, source: std::io::Error },
    /// The file is there but not what vipd wrote (edited by hand, or another version).
    #[error("{file} is not a valid allocations file ({reason}); move it away to start from what Docker and the kernel say")]
    Corrupt { file: PathBuf, reason: String },
    #[error("cannot write {file}: {source}")]
    Write { file: PathBuf, source: std::io::Error },
    /// The stored allocations moved since this agent read them (another writer claimed
    /// in between): load again and redo the claims.
    #[error("the stored allocations changed since they were read")]
    Conflict,
}

/// Where the allocations are kept: the local file ([`StateStore`]) for one host; a
/// cluster store later. Shaped for claims made in transactions: a commit names the
/// allocations it was computed from, and a shared store refuses it when the stored ones
/// moved in between ([`StateError::Conflict`]), as a compare-and-swap on a revision would.
pub trait AllocationStore: Send + Sync {
    /// The stored allocations; `None` when nothing was stored yet.
    fn load(&self) -> Result<Option<Allocations>, StateError>;

    /// Store `next`, computed from `base` (what this agent last loaded or committed).
    fn commit(&self, base: &Allocations, next: &Allocations) -> Result<(), StateError>;
}

impl AllocationStore for StateStore {
    fn load(&self) -> Result<Option<Allocations>, StateError> {
        StateStore::load(self)
    }

    /// The file is this host's alone: nobody else writes it, so `base` is not checked.
    fn commit(&self, _base: &Allocations, next: &Allocations) -> Result<(), StateError> {
        self.save(next)
    }
}

/// Allocations in memory, for tests; refuses a commit whose base is not what it holds.
#[derive(Debug, Default)]
pub struct MemoryStore {
    stored: std::sync::Mutex<Option<Allocations>>,
}

impl MemoryStore {
    /// A store holding `allocs`.
    pub fn with(allocs: Allocations) -> Self {
        MemoryStore {
            stored: std::sync::Mutex::new(Some(allocs)),
        }
    }
}

impl AllocationStore for MemoryStore {
    fn load(&self) -> Result<Option<Allocations>, StateError> {
        Ok(self.stored.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    fn commit(&self, base: &Allocations, next: &Allocations) -> Result<(), StateError> {
        let mut stored = self.stored.lock().unwrap_or_else(|e| e.into_inner());
        if stored.as_ref().is_some_and(|s| s != base) {
            return Err(StateError::Conflict);
        }
        *stored = Some(next.clone());
        Ok(())
    }
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    /// A store in `dir`, created (mode 0700) if missing.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| StateError::Dir {
                dir: dir.to_owned(),
                source,
            })?;
        Ok(StateStore { dir: dir.to_owned() })
    }

    fn file(&self) -> PathBuf {
        self.dir.join(ALLOCATIONS_FILE)
    }

    /// The saved allocations; `None` when nothing was saved yet.
    pub fn load(&self) -> Result<Option<Allocations>, StateError> {
        let file = self.file();
        let text = match fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Read { file, source }),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| StateError::Corrupt {
                file,
                reason: e.to_string(),
            })
    }

    /// Save the allocations atomically.
    pub fn save(&self, allocs: &Allocations) -> Result<(), StateError> {
        let file = self.file();
        let write_err = |source| StateError::Write {
            file: file.clone(),
            source,
        };
        let text = serde_json::to_vec_pretty(allocs).map_err(|e| write_err(std::io::Error::other(e)))?;
        write_atomically(&self.dir, ALLOCATIONS_FILE, &text).map_err(write_err)
    }
}

/// Write `dir/name` atomically (mode 0600): a temporary file beside it is written, synced
/// and renamed over it, and the directory is synced.
pub fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    out.write_all(bytes)?;
    out.sync_all()?;
    drop(out);
    fs::rename(&tmp, dir.join(name))?;
    File::open(dir).and_then(|d| d.sync_all())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::model::{Ipv4Net, ServiceName};
    use std::os::unix::fs::PermissionsExt;

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "vipd-state-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn allocations_survive_a_restart_and_nothing_else_is_left() {
        let dir = tempdir().join("state");
        let store = StateStore::open(&dir).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(store.load().unwrap(), None);
        let mut a = Allocations::default();
        a.ensure(
            &ServiceName::new("web").unwrap(),
            Ipv4Net::new("10.253.0.0".parse().unwrap(), 16).unwrap(),
        )
        .unwrap();
        store.save(&a).unwrap();
        store.save(&a).unwrap();
        let again = StateStore::open(&dir).unwrap();
        assert_eq!(again.load().unwrap(), Some(a));
        let names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [ALLOCATIONS_FILE]);
        assert_eq!(
            fs::metadata(dir.join(ALLOCATIONS_FILE))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        fs::remove_dir_all(dir.parent().unwrap()).unwrap();
    }

    #[test]
    fn the_memory_store_refuses_a_commit_from_allocations_that_moved() {
        let pool = Ipv4Net::new("10.253.0.0".parse().unwrap(), 16).unwrap();
        let store = MemoryStore::default();
        assert_eq!(store.load().unwrap(), None);
        let empty = Allocations::default();
        let mut mine = empty.clone();
        mine.ensure(&ServiceName::new("web").unwrap(), pool).unwrap();
        store.commit(&empty, &mine).unwrap();
        assert_eq!(store.load().unwrap(), Some(mine.clone()));
        // Another writer computed from the empty allocations: refused, nothing changes.
        let mut theirs = empty.clone();
        theirs.ensure(&ServiceName::new("api").unwrap(), pool).unwrap();
        assert!(matches!(store.commit(&empty, &theirs), Err(StateError::Conflict)));
        assert_eq!(store.load().unwrap(), Some(mine));
    }

    #[test]
    fn the_file_store_is_an_allocation_store() {
        let dir = tempdir().join("port");
        let store: Box<dyn AllocationStore> = Box::new(StateStore::open(&dir).unwrap());
        let mut a = Allocations::default();
        a.ensure(
            &ServiceName::new("web").unwrap(),
            Ipv4Net::new("10.253.0.0".parse().unwrap(), 16).unwrap(),
        )
        .unwrap();
        store.commit(&Allocations::default(), &a).unwrap();
        assert_eq!(store.load().unwrap(), Some(a));
        fs::remove_dir_all(dir.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_corrupt_file_is_named_with_what_to_do() {
        let dir = tempdir();
        let store = StateStore::open(&dir).unwrap();
        fs::write(dir.join(ALLOCATIONS_FILE), "{\"services\": 3").unwrap();
        let e = store.load().unwrap_err().to_string();
        assert!(
            e.contains("allocations.json is not a valid allocations file"),
            "{e}"
        );
        assert!(e.contains("move it away"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
