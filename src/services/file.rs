//! Definitions on one host: `services.json` in the state directory, a JSON array of
//! definitions. Every change is made under an exclusive lock on a file beside it and
//! written atomically, so two `vipd service` commands never lose each other's change and
//! the agent never reads a torn file.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use nix::fcntl::{Flock, FlockArg};

use super::{DefinitionError, DefinitionSource, DefinitionStore, Definitions, ServiceDefinition};
use crate::core::model::ServiceName;

/// The file name of the definitions, inside the state directory.
pub const DEFINITIONS_FILE: &str = "services.json";

/// What tells one version of the file from another without reading it: an atomic write
/// is a new inode, and an edit in place changes the time or the size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    inode: u64,
    modified: Option<SystemTime>,
    len: u64,
}

/// The definitions file of a state directory.
pub struct FileDefinitions {
    dir: PathBuf,
    /// The file as last read by [`DefinitionSource::definitions`], and what it held
    /// (`None` stamp: there was no file).
    cache: Mutex<Option<(Option<Stamp>, Arc<Definitions>)>>,
}

impl FileDefinitions {
    /// The definitions of state directory `dir` (made, 0700, on the first write).
    pub fn new(dir: &Path) -> Self {
        FileDefinitions {
            dir: dir.to_owned(),
            cache: Mutex::new(None),
        }
    }

    pub fn file(&self) -> PathBuf {
        self.dir.join(DEFINITIONS_FILE)
    }

    fn stamp(&self) -> Result<Option<Stamp>, DefinitionError> {
        match fs::metadata(self.file()) {
            Ok(m) => Ok(Some(Stamp {
                inode: m.ino(),
                modified: m.modified().ok(),
                len: m.len(),
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(DefinitionError::Read {
                file: self.file(),
                source,
            }),
        }
    }

    /// The stored definitions; none when there is no file.
    pub fn load(&self) -> Result<Definitions, DefinitionError> {
        let file = self.file();
        let text = match fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Definitions::new()),
            Err(source) => return Err(DefinitionError::Read { file, source }),
        };
        let corrupt = |reason: String| DefinitionError::Corrupt {
            file: file.clone(),
            reason,
        };
        let list: Vec<ServiceDefinition> = serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
        let mut defs = Definitions::new();
        for d in list {
            let name = d.name.clone();
            if defs.insert(name.clone(), d).is_some() {
                return Err(corrupt(format!("service {name} is defined twice")));
            }
        }
        Ok(defs)
    }

    fn save(&self, defs: &Definitions) -> Result<(), DefinitionError> {
        let write_err = |source| DefinitionError::Write {
            file: self.file(),
            source,
        };
        let list: Vec<&ServiceDefinition> = defs.values().collect();
        let mut text = serde_json::to_vec_pretty(&list).map_err(|e| write_err(std::io::Error::other(e)))?;
        text.push(b'\n');
        crate::state::write_atomically(&self.dir, DEFINITIONS_FILE, &text).map_err(write_err)
    }

    /// Hold the lock of the file while `change` reads and writes it.
    fn locked<T>(&self, change: impl FnOnce() -> Result<T, DefinitionError>) -> Result<T, DefinitionError> {
        let lock_path = self.dir.join(format!(".{DEFINITIONS_FILE}.lock"));
        let write_err = |source| DefinitionError::Write {
            file: lock_path.clone(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(write_err)?;
        let file: File = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(write_err)?;
        let _lock = Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| write_err(e.into()))?;
        change()
    }
}

#[async_trait]
impl DefinitionStore for FileDefinitions {
    async fn get(&self, name: &ServiceName) -> Result<Option<ServiceDefinition>, DefinitionError> {
        Ok(self.load()?.remove(name))
    }

    async fn put(
        &self,
        def: &ServiceDefinition,
        expected: Option<&ServiceDefinition>,
    ) -> Result<bool, DefinitionError> {
        self.locked(|| {
            let mut defs = self.load()?;
            if defs.get(&def.name) != expected {
                return Ok(false);
            }
            defs.insert(def.name.clone(), def.clone());
            self.save(&defs)?;
            Ok(true)
        })
    }

    async fn delete(&self, name: &ServiceName) -> Result<bool, DefinitionError> {
        self.locked(|| {
            let mut defs = self.load()?;
            if defs.remove(name).is_none() {
                return Ok(false);
            }
            self.save(&defs)?;
            Ok(true)
        })
    }

    async fn list(&self) -> Result<Definitions, DefinitionError> {
        self.load()
    }
}

impl DefinitionSource for FileDefinitions {
    /// Read again only when the file changed (a stat per sync otherwise).
    fn definitions(&self) -> Result<Arc<Definitions>, DefinitionError> {
        let stamp = self.stamp()?;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((seen, defs)) = cache.as_ref() {
            if *seen == stamp {
                return Ok(Arc::clone(defs));
            }
        }
        let defs = Arc::new(match stamp {
            None => Definitions::new(),
            Some(_) => self.load()?,
        });
        *cache = Some((stamp, Arc::clone(&defs)));
        Ok(defs)
    }
}
