//! The CLI's config file, written by `deployer login`: the controller's URL and an API token.
//!
//! Found at `$DEPLOYER_CONFIG`, else `$XDG_CONFIG_HOME/deployer/config.json`, else
//! `~/.config/deployer/config.json`. `--url`/`DEPLOYER_URL` and `--token`/`DEPLOYER_TOKEN` win over it.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::client::{CliError, Client};

/// Where the controller is when neither a flag, the environment nor the config file says.
pub const DEFAULT_URL: &str = "http://127.0.0.1:7700";

#[derive(Default, Serialize, Deserialize)]
pub struct Config {
    /// The controller's HTTP API address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// An API token for `url`, made by `deployer login`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The token's id, so `deployer logout` can revoke it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
    /// Whom the token acts as (for people reading the file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Keys a newer CLI wrote, kept as they are.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// The config file's path, if there is a home to put it in.
pub fn path() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(path) = var("DEPLOYER_CONFIG") {
        return Some(path);
    }
    // The XDG spec says to ignore a relative XDG_CONFIG_HOME.
    if let Some(dir) = var("XDG_CONFIG_HOME").filter(|d| d.is_absolute()) {
        return Some(dir.join("deployer").join("config.json"));
    }
    var("HOME").map(|home| home.join(".config").join("deployer").join("config.json"))
}

fn no_path() -> CliError {
    CliError::Usage {
        message: "there is no place for the CLI's config file: HOME is not set".into(),
        hint: Some("set DEPLOYER_CONFIG to the file to use, like DEPLOYER_CONFIG=./deployer.json".into()),
    }
}

/// The path, or a usage error saying to set `DEPLOYER_CONFIG`.
pub fn require_path() -> Result<PathBuf, CliError> {
    path().ok_or_else(no_path)
}

impl Config {
    /// The file at `path`; a missing file is an empty config.
    pub fn load(path: &Path) -> Result<Config, CliError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(e) => {
                return Err(CliError::Failed {
                    message: format!("cannot read the config file {}: {e}", path.display()),
                    hint: Some("fix its permissions, or set DEPLOYER_CONFIG to another file".into()),
                })
            }
        };
        serde_json::from_str(&text).map_err(|e| CliError::Failed {
            message: format!("the config file {} is not valid: {e}", path.display()),
            hint: Some("fix it or delete it, then run `deployer login`".into()),
        })
    }

    /// Replaces the file at `path` atomically (a temporary file renamed over it), readable by the
    /// owner only; missing directories are made, readable by the owner only.
    pub fn save(&self, path: &Path) -> Result<(), CliError> {
        let failed = |what: &str, e: std::io::Error| CliError::Failed {
            message: format!("cannot {what} the config file {}: {e}", path.display()),
            hint: Some("set DEPLOYER_CONFIG to a file you can write".into()),
        };
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        create_private_dir(dir).map_err(|e| failed("make the directory of", e))?;
        let mut text = serde_json::to_string_pretty(self).map_err(|e| failed("encode", e.into()))?;
        text.push('\n');
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "config".into());
        let temporary = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let written = (|| {
            let mut file = create_private_file(&temporary)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&temporary, path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temporary);
            return Err(failed("write", e));
        }
        // The rename is durable once the directory is; not every file system lets a directory be synced.
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
        Ok(())
    }
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
}

#[cfg(unix)]
fn create_private_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)
}

#[cfg(not(unix))]
fn create_private_file(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new().write(true).create_new(true).open(path)
}

/// The same address however it was written (`http://h:1` and `http://h:1/`).
pub fn same_url(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

/// The client for a command: the URL and token from the flags or the environment, else from the
/// config file. The file's token is sent only to the file's URL, never to another controller.
pub fn client(url: Option<&str>, token: Option<&str>) -> Result<Client, CliError> {
    let token = token.filter(|t| !t.trim().is_empty());
    if let (Some(url), Some(token)) = (url, token) {
        return Client::new(url, Some(token.to_string()));
    }
    let Some(path) = path() else {
        return Client::new(url.unwrap_or(DEFAULT_URL), token.map(str::to_string));
    };
    let config = Config::load(&path)?;
    let saved_url = config.url.as_deref().unwrap_or(DEFAULT_URL);
    let url = url.unwrap_or(saved_url);
    if let Some(token) = token {
        return Client::new(url, Some(token.to_string()));
    }
    match config.token {
        Some(saved) if same_url(url, saved_url) => Ok(Client::new(url, Some(saved))?.token_from_config(&path)),
        _ => Client::new(url, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_config_is_private_and_keeps_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a").join("b").join("config.json");
        assert!(Config::load(&path).unwrap().token.is_none(), "a missing file is an empty config");
        let mut config: Config = serde_json::from_str(r#"{"url":"http://h:1","future":{"x":1}}"#).unwrap();
        config.token = Some("dpl_x".into());
        config.save(&path).unwrap();
        config.token_id = Some("t1".into());
        config.save(&path).unwrap();
        let saved: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(saved, serde_json::json!({"url":"http://h:1","token":"dpl_x","token_id":"t1","future":{"x":1}}));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&path), 0o600);
            assert_eq!(mode(path.parent().unwrap()), 0o700);
            assert_eq!(mode(&dir.path().join("a")), 0o700);
        }
        let left: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file is left behind");
    }

    #[test]
    fn an_invalid_config_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, "{not json").unwrap();
        let e = Config::load(&path).err().unwrap();
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    }

    #[test]
    fn urls_compare_without_a_trailing_slash() {
        assert!(same_url("http://h:1/", "http://h:1"));
        assert!(!same_url("http://h:1", "http://h:2"));
    }
}
