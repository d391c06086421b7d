//! The iptables of one network namespace, behind a narrow trait: read everything at once
//! (`iptables-save`), write a batch at once (`iptables-restore --noflush`). Never one
//! process per rule.

pub mod fake;

use std::io::Write;
use std::process::{Command, Stdio};

/// Errors from a namespace's firewall.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// The program could not be started.
    #[error("cannot run {program}: {source} (is iptables installed?)")]
    Spawn { program: String, source: std::io::Error },
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
/// inherits the namespace of the thread that spawns it).
#[derive(Debug, Clone)]
pub struct Iptables {
    save: String,
    restore: String,
}

impl Default for Iptables {
    fn default() -> Self {
        Iptables {
            save: "iptables-save".into(),
            restore: "iptables-restore".into(),
        }
    }
}

impl Iptables {
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
        let out = Command::new(&self.save)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| FirewallError::Spawn {
                program: self.save.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(Self::failed(&self.save, out.status, &out.stderr, None));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn restore(&mut self, script: &str) -> Result<(), FirewallError> {
        tracing::debug!(program = %self.restore, lines = script.lines().count(), "iptables-restore --noflush");
        let spawn_err = |source| FirewallError::Spawn {
            program: self.restore.clone(),
            source,
        };
        let mut child = Command::new(&self.restore)
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
            return Err(Self::failed(&self.restore, out.status, &out.stderr, Some(script)));
        }
        Ok(())
    }
}
