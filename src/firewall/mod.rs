//! The iptables of one network namespace, behind a narrow trait: read everything at once
//! (`iptables-save`), write a batch at once (`iptables-restore --noflush`). Never one
//! process per rule.

pub mod fake;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::tools::{Tools, ToolsError};

/// Errors from a namespace's firewall.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// The program could not be started.
    #[error("cannot run {program}: {source} (is iptables installed?)")]
    Spawn { program: String, source: std::io::Error },
    /// The program is not installed (found once, at start: see [`crate::tools`]).
    #[error(transparent)]
    Missing(#[from] ToolsError),
    /// The program ran and failed.
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        program: String,
        status: String,
        stderr: String,
    },
}

/// One namespace's iptables.
pub trait Firewall {
    /// Everything, as `iptables-save` prints it.
    fn save(&mut self) -> Result<String, FirewallError>;
    /// Apply an `iptables-restore --noflush` script.
    fn restore(&mut self, script: &str) -> Result<(), FirewallError>;
}

/// The real iptables, run in the calling thread's network namespace (a child process
/// inherits the namespace of the thread that spawns it), from the absolute paths
/// [`crate::tools`] found, with an empty environment.
#[derive(Debug, Clone)]
pub struct Iptables {
    /// `iptables-save` and `iptables-restore`, or why they were not found.
    programs: Result<(PathBuf, PathBuf), ToolsError>,
}

/// The programs the process resolved at start ([`crate::tools::global`]); when they are
/// missing, every call fails with the name of the missing one.
impl Default for Iptables {
    fn default() -> Self {
        Iptables {
            programs: crate::tools::global().map(Iptables::programs_of),
        }
    }
}

impl Iptables {
    /// The iptables of `tools`.
    pub fn new(tools: &Tools) -> Self {
        Iptables {
            programs: Ok(Self::programs_of(tools)),
        }
    }

    fn programs_of(tools: &Tools) -> (PathBuf, PathBuf) {
        (tools.iptables_save.clone(), tools.iptables_restore.clone())
    }

    fn save_program(&self) -> Result<&Path, FirewallError> {
        Ok(&self.programs.as_ref().map_err(Clone::clone)?.0)
    }

    fn restore_program(&self) -> Result<&Path, FirewallError> {
        Ok(&self.programs.as_ref().map_err(Clone::clone)?.1)
    }

    fn failed(
        program: &str,
        status: std::process::ExitStatus,
        stderr: &[u8],
        script: Option<&str>,
    ) -> FirewallError {
        let mut stderr = String::from_utf8_lossy(stderr).trim().to_owned();
        // iptables-restore names the failing line by number: show the line itself too.
        if let Some(script) = script {
            if let Some(n) = stderr
                .split("line ")
                .nth(1)
                .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|n| n.parse::<usize>().ok())
            {
                if let Some(line) = script.lines().nth(n.saturating_sub(1)) {
                    stderr.push_str(&format!(" [line {n}: {line}]"));
                }
            }
        }
        FirewallError::Failed {
            program: program.to_owned(),
            status: status.to_string(),
            stderr,
        }
    }
}

impl Firewall for Iptables {
    fn save(&mut self) -> Result<String, FirewallError> {
        let program = self.save_program()?;
        let name = program.display().to_string();
        let out = Tools::command(program)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| FirewallError::Spawn {
                program: name.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(Self::failed(&name, out.status, &out.stderr, None));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn restore(&mut self, script: &str) -> Result<(), FirewallError> {
        let program = self.restore_program()?;
        let name = program.display().to_string();
        tracing::debug!(program = %name, lines = script.lines().count(), "iptables-restore --noflush");
        let spawn_err = |source| FirewallError::Spawn {
            program: name.clone(),
            source,
        };
        let mut child = Tools::command(program)
            .args(["--noflush", "--wait"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(script.as_bytes()).map_err(spawn_err)?;
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
        if !out.status.success() {
            return Err(Self::failed(&name, out.status, &out.stderr, Some(script)));
        }
        Ok(())
    }
}
