//! Sysctls, as the calling thread's namespace shows them (`/proc/sys/net` shows the
//! namespace of the thread that opens the file).

use super::{Changes, IngressError, Side};
use crate::sysctl::{ProcSysctls, SysctlError, Sysctls as _};

/// A sysctl name in dots (`net.ipv4.ip_forward`) as a path under `/proc/sys`. The dots
/// separate path parts (interface names here have none).
fn proc_name(name: &str) -> String {
    name.replace('.', "/")
}

pub(super) fn read_sysctl(name: &str) -> Result<i64, IngressError> {
    let path = proc_name(name);
    ProcSysctls::under("/proc/sys")
        .read(&path)?
        // Unlike an IPVS sysctl, every one read here exists in every namespace.
        .ok_or_else(|| {
            SysctlError::Read {
                path: format!("/proc/sys/{path}"),
                source: std::io::Error::from_raw_os_error(nix::libc::ENOENT),
            }
            .into()
        })
}

/// Set a sysctl of the calling thread's namespace unless it already has `value`.
pub(super) fn ensure_sysctl(
    name: &str,
    value: i64,
    side: Side<'_>,
    changes: &mut Changes,
) -> Result<(), IngressError> {
    if read_sysctl(name)? == value {
        return Ok(());
    }
    ProcSysctls::under("/proc/sys").write(&proc_name(name), value)?;
    changes.push(format!("set {name}={value} in {side}"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sysctl_of_this_namespace_is_read_and_a_missing_one_is_an_error_naming_it() {
        let v = read_sysctl("net.ipv4.ip_forward").unwrap();
        assert!(v == 0 || v == 1, "{v}");
        let e = read_sysctl("net.ipv4.no_such_sysctl_vipd").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot read /proc/sys/net/ipv4/no_such_sysctl_vipd: "),
            "{e}"
        );
    }
}
