//! The programs vipd runs as child processes, found once at start.
//!
//! vipd runs as root, so a program is never looked up in `PATH` at the moment it is run:
//! [`Tools::from_env`] finds each one once, in the absolute directories of `PATH`, and
//! every child then starts from that path with an empty environment ([`Tools::command`]),
//! so what a caller's environment says later (or a relative `PATH` entry, or the current
//! directory) cannot change what runs as root.
//!
//! `vipd` resolves them at start ([`init`]) and fails with the name of a missing program;
//! code that spawns uses the same resolution through [`global`].

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Where programs are looked for when `PATH` is not set (the usual root `PATH`).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The program that prints every iptables rule of the calling thread's namespace.
pub const IPTABLES_SAVE: &str = "iptables-save";
/// The program that applies a batch of iptables rules.
pub const IPTABLES_RESTORE: &str = "iptables-restore";

/// A program could not be found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ToolsError {
    /// No absolute directory of the search path holds an executable of that name.
    #[error("cannot find the program {program} in {search_path} (is iptables installed?)")]
    Missing {
        program: &'static str,
        search_path: String,
    },
}

/// The absolute paths of the programs vipd runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tools {
    /// `iptables-save`.
    pub iptables_save: PathBuf,
    /// `iptables-restore`.
    pub iptables_restore: PathBuf,
}

impl Tools {
    /// Every program, looked up in this process's `PATH` (or [`DEFAULT_PATH`] without one).
    pub fn from_env() -> Result<Tools, ToolsError> {
        let path = std::env::var_os("PATH");
        Tools::resolve(path.as_deref().unwrap_or(OsStr::new(DEFAULT_PATH)))
    }

    /// Every program, looked up in `search_path` (directories separated by `:`).
    pub fn resolve(search_path: &OsStr) -> Result<Tools, ToolsError> {
        Ok(Tools {
            iptables_save: find(IPTABLES_SAVE, search_path)?,
            iptables_restore: find(IPTABLES_RESTORE, search_path)?,
        })
    }

    /// A command for `program` (one of these paths) with an empty environment: none of
    /// the programs vipd runs reads one.
    pub fn command(program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.env_clear();
        cmd
    }
}

/// The first executable file called `program` in an absolute directory of
/// `search_path`. The path is not canonicalized: `iptables-save` is often a link to a
/// multi-call binary that picks what to do from the name it was started by.
pub fn find(program: &'static str, search_path: &OsStr) -> Result<PathBuf, ToolsError> {
    std::env::split_paths(search_path)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| ToolsError::Missing {
            program,
            search_path: search_path.to_string_lossy().into_owned(),
        })
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

static GLOBAL: OnceLock<Result<Tools, ToolsError>> = OnceLock::new();

/// The programs, resolved from the environment the first time this is called in the
/// process and the same ever after. `vipd` calls it at start, so that a missing program
/// is reported before anything changes.
pub fn init() -> Result<&'static Tools, ToolsError> {
    GLOBAL.get_or_init(Tools::from_env).as_ref().map_err(Clone::clone)
}

/// The programs as [`init`] resolved them (resolving them now if it was not called).
pub fn global() -> Result<&'static Tools, ToolsError> {
    init()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory with an executable `iptables-save`, a non-executable
    /// `iptables-restore`, and a directory called `iptables`.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vipd-tools-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("iptables")).unwrap();
        for (file, mode) in [(IPTABLES_SAVE, 0o755), (IPTABLES_RESTORE, 0o644)] {
            let path = dir.join(file);
            std::fs::write(&path, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        dir
    }

    #[test]
    fn a_program_is_found_as_an_absolute_path_in_the_first_directory_that_has_it() {
        let dir = scratch("found");
        let search = format!("/nonexistent-vipd:{}:/usr/bin", dir.display());
        assert_eq!(
            find(IPTABLES_SAVE, OsStr::new(&search)),
            Ok(dir.join(IPTABLES_SAVE))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_program_is_a_typed_error_naming_it_and_the_search_path() {
        let dir = scratch("missing");
        let search = dir.display().to_string();
        // Not executable, a directory, absent: none counts.
        for program in [IPTABLES_RESTORE, "iptables", "no-such-program-vipd"] {
            let err = find(program, OsStr::new(&search)).unwrap_err();
            assert_eq!(
                err,
                ToolsError::Missing {
                    program,
                    search_path: search.clone()
                }
            );
            assert!(err.to_string().contains(program), "{err}");
        }
        assert_eq!(
            Tools::resolve(OsStr::new(&search)),
            Err(ToolsError::Missing {
                program: IPTABLES_RESTORE,
                search_path: search.clone()
            })
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn relative_and_empty_search_path_entries_are_never_used() {
        let dir = scratch("relative");
        let relative = dir.strip_prefix("/").unwrap();
        // Taken from `/` (or a cwd of the caller's choosing), the relative entry would
        // name the scratch directory: it must not be looked at.
        let search = format!(":.:{}", relative.display());
        assert!(matches!(
            find(IPTABLES_SAVE, OsStr::new(&search)),
            Err(ToolsError::Missing {
                program: IPTABLES_SAVE,
                ..
            })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_command_starts_with_an_empty_environment() {
        // This test process has variables (cargo sets several); the child sees none.
        assert!(std::env::vars_os().next().is_some());
        let out = Tools::command(Path::new("/usr/bin/env")).output().unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout), "");
    }
}
