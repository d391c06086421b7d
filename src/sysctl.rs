//! `net.ipv4.vs.*` sysctls of one network namespace, behind a narrow trait.
//!
//! `/proc/sys/net` shows the namespace of the thread that opens the file, so the real
//! implementation must be used on a thread inside the namespace (see [`crate::netns`]).

use std::collections::BTreeMap;
use std::path::PathBuf;

/// Errors reading or writing a sysctl.
#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} holds {text:?}, not a number")]
    Parse { path: String, text: String },
    #[error("cannot set {path} to {value}: {source}")]
    Write {
        path: String,
        value: i64,
        source: std::io::Error,
    },
}

/// The IPVS sysctls of one namespace, by name under `net.ipv4.vs`.
pub trait Sysctls {
    /// The value, or `None` if the sysctl does not exist (IPVS not loaded, unknown name).
    fn read(&mut self, name: &str) -> Result<Option<i64>, SysctlError>;
    fn write(&mut self, name: &str, value: i64) -> Result<(), SysctlError>;
}

/// `/proc/sys/net/ipv4/vs/*` as seen by the calling thread.
#[derive(Debug, Clone)]
pub struct ProcSysctls {
    dir: PathBuf,
}

impl Default for ProcSysctls {
    fn default() -> Self {
        ProcSysctls {
            dir: PathBuf::from("/proc/sys/net/ipv4/vs"),
        }
    }
}

impl ProcSysctls {
    /// The sysctls under `dir` (e.g. `/proc/sys`, where names are paths like
    /// `net/ipv4/ip_forward`), as seen by the calling thread.
    pub fn under(dir: impl Into<PathBuf>) -> Self {
        ProcSysctls { dir: dir.into() }
    }
}

impl Sysctls for ProcSysctls {
    fn read(&mut self, name: &str) -> Result<Option<i64>, SysctlError> {
        let path = self.dir.join(name);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(SysctlError::Read {
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        text.trim().parse().map(Some).map_err(|_| SysctlError::Parse {
            path: path.display().to_string(),
            text,
        })
    }

    fn write(&mut self, name: &str, value: i64) -> Result<(), SysctlError> {
        let path = self.dir.join(name);
        std::fs::write(&path, format!("{value}\n")).map_err(|source| SysctlError::Write {
            path: path.display().to_string(),
            value,
            source,
        })
    }
}

/// In-memory sysctls: the four IPVS ones at kernel defaults; others do not exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeSysctls(pub BTreeMap<String, i64>);

impl Default for FakeSysctls {
    fn default() -> Self {
        FakeSysctls(
            crate::core::plan::SysctlSettings::KERNEL_DEFAULTS
                .iter()
                .map(|(n, v)| ((*n).to_owned(), *v))
                .collect(),
        )
    }
}

impl Sysctls for FakeSysctls {
    fn read(&mut self, name: &str) -> Result<Option<i64>, SysctlError> {
        Ok(self.0.get(name).copied())
    }

    fn write(&mut self, name: &str, value: i64) -> Result<(), SysctlError> {
        match self.0.get_mut(name) {
            Some(v) => {
                *v = value;
                Ok(())
            }
            None => Err(SysctlError::Write {
                path: format!("net.ipv4.vs.{name}"),
                value,
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            }),
        }
    }
}
