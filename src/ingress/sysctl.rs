//! Sysctls, as the calling thread's namespace shows them (`/proc/sys/net` shows the
//! namespace of the thread that opens the file).

use std::fs;
use std::path::{Path, PathBuf};

use super::{Changes, IngressError, Side};
use crate::sysctl::SysctlError;

fn sysctl_path(name: &str) -> PathBuf {
    Path::new("/proc/sys").join(name.replace('.', "/"))
}

pub(super) fn read_sysctl(name: &str) -> Result<i64, IngressError> {
    let path = sysctl_path(name);
    let text = fs::read_to_string(&path).map_err(|source| SysctlError::Read {
        path: path.display().to_string(),
        source,
    })?;
    text.trim().parse().map_err(|_| {
        SysctlError::Parse {
            path: path.display().to_string(),
            text,
        }
        .into()
    })
}

/// Set a sysctl of the calling thread's namespace unless it already has `value`. The
/// dots of `name` separate path parts (interface names here have none).
pub(super) fn ensure_sysctl(
    name: &str,
    value: i64,
    side: Side<'_>,
    changes: &mut Changes,
) -> Result<(), IngressError> {
    if read_sysctl(name)? == value {
        return Ok(());
    }
    let path = sysctl_path(name);
    fs::write(&path, format!("{value}\n")).map_err(|source| SysctlError::Write {
        path: path.display().to_string(),
        value,
        source,
    })?;
    changes.push(format!("set {name}={value} in {side}"));
    Ok(())
}
