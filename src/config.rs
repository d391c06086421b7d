//! The `vipd run` config file: every command-line setting of `vipd run`, by its long flag
//! name, in TOML. It is turned into the flags it stands for, so a setting in the file is
//! checked exactly as the flag is; a flag given on the command line wins over the file.
//!
//! ```toml
//! vip-pool = "10.253.0.0/16"     # --vip-pool 10.253.0.0/16
//! no-ingress = true              # --no-ingress (false: not given)
//! dns-listen = ["0.0.0.0:53"]    # --dns-listen 0.0.0.0:53, once per item
//! ```

use std::path::Path;

/// The default config file; a missing default file is not an error.
pub const DEFAULT_PATH: &str = "/etc/vipd/vipd.toml";

/// A setting a config file may hold: a long flag of `vipd run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// The flag without its dashes, e.g. `vip-pool`.
    pub name: String,
    /// Whether it takes a value (`--vip-pool X`) or is a switch (`--no-dns`).
    pub takes_value: bool,
}

/// Why a config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Syntax { path: String, message: String },
    #[error("config file {path}: unknown setting {name:?} (known: {known})")]
    Unknown {
        path: String,
        name: String,
        known: String,
    },
    #[error("config file {path}: {name}: {reason}")]
    Value {
        path: String,
        name: String,
        reason: String,
    },
}

/// The flags the config file at `path` stands for, for those of `known` not given on the
/// command line (`given`: the arguments after `run`). A missing file is an error only
/// when it was asked for (`required`).
pub fn flags_from_file(
    path: &Path,
    required: bool,
    known: &[Setting],
    given: &[String],
) -> Result<Vec<String>, ConfigError> {
    let shown = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(Vec::new()),
        Err(source) => return Err(ConfigError::Read { path: shown, source }),
    };
    flags_from_text(&text, &shown, known, given)
}

/// [`flags_from_file`] on the file's text; `path` only names it in errors.
pub fn flags_from_text(
    text: &str,
    path: &str,
    known: &[Setting],
    given: &[String],
) -> Result<Vec<String>, ConfigError> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Syntax {
        path: path.to_owned(),
        message: e.message().to_owned(),
    })?;
    let mut out = Vec::new();
    for (name, value) in &table {
        let Some(setting) = known.iter().find(|s| s.name == *name) else {
            return Err(ConfigError::Unknown {
                path: path.to_owned(),
                name: name.clone(),
                known: known
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        let flag = format!("--{name}");
        if given
            .iter()
            .any(|a| *a == flag || a.starts_with(&format!("{flag}=")))
        {
            continue;
        }
        let bad = |reason: &str| ConfigError::Value {
            path: path.to_owned(),
            name: name.clone(),
            reason: reason.to_owned(),
        };
        match (setting.takes_value, value) {
            (false, toml::Value::Boolean(on)) => {
                if *on {
                    out.push(flag);
                }
            }
            (false, _) => return Err(bad("expected true or false")),
            (true, toml::Value::Array(items)) => {
                for item in items {
                    out.push(flag.clone());
                    out.push(scalar(item).ok_or_else(|| bad("expected a list of strings or numbers"))?);
                }
            }
            (true, v) => {
                out.push(flag);
                out.push(scalar(v).ok_or_else(|| bad("expected a string or a number"))?);
            }
        }
    }
    Ok(out)
}

fn scalar(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known() -> Vec<Setting> {
        [
            ("vip-pool", true),
            ("grace", true),
            ("no-dns", true),
            ("dns-listen", true),
        ]
        .iter()
        .map(|(n, v)| Setting {
            name: (*n).to_owned(),
            takes_value: *v && *n != "no-dns",
        })
        .collect()
    }

    fn flags(text: &str, given: &[&str]) -> Result<Vec<String>, String> {
        let given: Vec<String> = given.iter().map(|s| (*s).to_owned()).collect();
        flags_from_text(text, "vipd.toml", &known(), &given).map_err(|e| e.to_string())
    }

    #[test]
    fn settings_become_the_flags_they_stand_for() {
        let text = "vip-pool = \"10.9.0.0/16\"\ngrace = 60\nno-dns = true\ndns-listen = [\"127.0.0.1:53\", \"10.0.0.1:53\"]\n";
        assert_eq!(
            flags(text, &[]).unwrap(),
            [
                "--dns-listen",
                "127.0.0.1:53",
                "--dns-listen",
                "10.0.0.1:53",
                "--grace",
                "60",
                "--no-dns",
                "--vip-pool",
                "10.9.0.0/16"
            ]
        );
        assert_eq!(flags("no-dns = false", &[]).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn the_command_line_wins() {
        let text = "vip-pool = \"10.9.0.0/16\"\ngrace = 60\n";
        assert_eq!(
            flags(text, &["--grace", "5"]).unwrap(),
            ["--vip-pool", "10.9.0.0/16"]
        );
        assert_eq!(
            flags(text, &["--vip-pool=10.8.0.0/16"]).unwrap(),
            ["--grace", "60"]
        );
    }

    #[test]
    fn bad_files_are_refused_with_the_setting_named() {
        let e = flags("vip_pool = \"x\"", &[]).unwrap_err();
        assert!(
            e.starts_with("config file vipd.toml: unknown setting \"vip_pool\" (known: vip-pool, grace"),
            "{e}"
        );
        let e = flags("no-dns = \"yes\"", &[]).unwrap_err();
        assert_eq!(e, "config file vipd.toml: no-dns: expected true or false");
        let e = flags("grace = 1.5", &[]).unwrap_err();
        assert_eq!(e, "config file vipd.toml: grace: expected a string or a number");
        let e = flags("grace = ", &[]).unwrap_err();
        assert!(e.starts_with("config file vipd.toml: "), "{e}");
    }

    #[test]
    fn a_missing_file_matters_only_when_asked_for() {
        let missing = Path::new("/nonexistent-vipd/vipd.toml");
        assert!(flags_from_file(missing, false, &known(), &[]).unwrap().is_empty());
        let e = flags_from_file(missing, true, &known(), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("cannot read the config file /nonexistent-vipd/vipd.toml"),
            "{e}"
        );
    }
}
