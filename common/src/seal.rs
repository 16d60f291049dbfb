//! The cluster key and authenticated encryption of secrets at rest.
//!
//! The key lives only in `<data-dir>/keyring` (mode 0600); it seals the CA private key and every
//! secret before they reach the Raft log, the database or a snapshot.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

const KEY_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("cluster key must be 64 hex characters")]
    InvalidKey,
    #[error("could not {action} key file {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("key file {path} has mode {mode:o}; it must not be readable or writable by group or others (chmod 600)")]
    InsecurePermissions { path: PathBuf, mode: u32 },
    #[error("sealed data is too short to be valid")]
    Truncated,
    #[error("sealed data could not be opened: wrong key, wrong purpose, or corrupted")]
    Open,
}

/// The 256-bit cluster key.
pub struct ClusterKey([u8; KEY_LEN]);

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey([redacted])")
    }
}

impl ClusterKey {
    pub fn generate() -> ClusterKey {
        let mut key = [0u8; KEY_LEN];
        fill_random(&mut key);
        ClusterKey(key)
    }

    pub fn from_hex(s: &str) -> Result<ClusterKey, SealError> {
        let mut key = [0u8; KEY_LEN];
        hex::decode_to_slice(s.trim(), &mut key).map_err(|_| SealError::InvalidKey)?;
        Ok(ClusterKey(key))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Writes the key as hex to `path` with mode 0600: a new file is created with that mode,
    /// synced, then renamed over `path`, so the key is never world-readable nor half-written.
    pub fn save(&self, path: &Path) -> Result<(), SealError> {
        let io_err = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| SealError::Io { action, path, source }
        };
        let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(".tmp");
        let tmp = path.with_file_name(tmp_name);
        // A leftover from an interrupted save would make create_new fail.
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err("remove stale", &tmp)(e)),
            _ => {}
        }
        let mut file =
            OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io_err("create", &tmp))?;
        file.write_all(format!("{}\n", self.to_hex()).as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io_err("write", &tmp))?;
        drop(file);
        fs::rename(&tmp, path).map_err(io_err("rename into place", path))?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("sync the directory of", path))?;
        Ok(())
    }

    /// Reads a key written by [`ClusterKey::save`]; refuses a file that group or others could
    /// read or write.
    pub fn load(path: &Path) -> Result<ClusterKey, SealError> {
        let io_err = |action| move |source| SealError::Io { action, path: path.to_path_buf(), source };
        let mut file = File::open(path).map_err(io_err("open"))?;
        let mode = file.metadata().map_err(io_err("stat"))?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(SealError::InsecurePermissions { path: path.to_path_buf(), mode: mode & 0o7777 });
        }
        let mut text = String::new();
        io::Read::read_to_string(&mut file, &mut text).map_err(io_err("read"))?;
        ClusterKey::from_hex(&text)
    }

    /// AES-256-GCM with a random 96-bit nonce; output = nonce || ciphertext+tag. `aad` binds
    /// the ciphertext to its purpose (e.g. b"ca-key"), so it cannot be replayed as another.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        fill_random(&mut nonce);
        let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + AES_256_GCM.tag_len());
        out.extend_from_slice(&nonce);
        let mut body = plaintext.to_vec();
        self.aead_key()
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut body)
            // Only fails for inputs beyond GCM's ~64 GiB limit.
            .expect("plaintext too large for AES-GCM");
        out.extend_from_slice(&body);
        out
    }

    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(SealError::Truncated);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Truncated)?;
        let mut body = body.to_vec();
        let plain_len =
            self.aead_key().open_in_place(nonce, Aad::from(aad), &mut body).map_err(|_| SealError::Open)?.len();
        body.truncate(plain_len);
        Ok(body)
    }

    fn aead_key(&self) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &self.0).expect("32-byte key is valid for AES-256"))
    }
}

fn fill_random(buf: &mut [u8]) {
    SystemRandom::new()
        .fill(buf)
        // The OS generator failing leaves no safe way to make a key or nonce.
        .expect("system random number generator failed");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            let dir = std::env::temp_dir().join(format!(
                "deployer-seal-test-{}-{}",
                std::process::id(),
                crate::token::random_hex(8)
            ));
            fs::create_dir(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn seal_open_round_trip() {
        let key = ClusterKey::generate();
        for plaintext in [&b""[..], b"x", b"-----BEGIN PRIVATE KEY-----\n..."] {
            let sealed = key.seal(plaintext, b"ca-key");
            assert_eq!(sealed.len(), 12 + plaintext.len() + 16);
            assert_eq!(key.open(&sealed, b"ca-key").unwrap(), plaintext);
        }
        // Random nonces: the same plaintext seals differently each time.
        assert_ne!(key.seal(b"same", b"a"), key.seal(b"same", b"a"));
    }

    #[test]
    fn open_fails_on_any_mismatch() {
        let key = ClusterKey::generate();
        let sealed = key.seal(b"database password", b"secret:db");

        assert!(matches!(key.open(&sealed, b"secret:other"), Err(SealError::Open)));
        assert!(matches!(ClusterKey::generate().open(&sealed, b"secret:db"), Err(SealError::Open)));
        assert!(matches!(key.open(&sealed[..sealed.len() - 1], b"secret:db"), Err(SealError::Open)));
        assert!(matches!(key.open(&sealed[..27], b"secret:db"), Err(SealError::Truncated)));
        assert!(matches!(key.open(&[], b"secret:db"), Err(SealError::Truncated)));
        for i in 0..sealed.len() {
            let mut flipped = sealed.clone();
            flipped[i] ^= 0x01;
            assert!(key.open(&flipped, b"secret:db").is_err(), "flip at {i} accepted");
        }
    }

    #[test]
    fn hex_round_trip_and_validation() {
        let key = ClusterKey::generate();
        let hex = key.to_hex();
        assert_eq!(hex.len(), 64);
        assert_eq!(ClusterKey::from_hex(&hex).unwrap().0, key.0);
        assert!(matches!(ClusterKey::from_hex(&hex[..62]), Err(SealError::InvalidKey)));
        assert!(matches!(ClusterKey::from_hex(&"zz".repeat(32)), Err(SealError::InvalidKey)));
        assert!(!format!("{key:?}").contains(&hex));
    }

    #[test]
    fn saved_key_is_private_and_loads_back() {
        let dir = TempDir::new();
        let path = dir.0.join("keyring");
        let key = ClusterKey::generate();
        key.save(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(ClusterKey::load(&path).unwrap().0, key.0);

        // Saving again replaces the file atomically and keeps the mode.
        let second = ClusterKey::generate();
        second.save(&path).unwrap();
        assert_eq!(ClusterKey::load(&path).unwrap().0, second.0);
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!dir.0.join("keyring.tmp").exists());
    }

    #[test]
    fn load_refuses_a_readable_file() {
        let dir = TempDir::new();
        let path = dir.0.join("keyring");
        ClusterKey::generate().save(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = ClusterKey::load(&path).unwrap_err();
        assert!(matches!(err, SealError::InsecurePermissions { mode: 0o644, .. }), "{err}");
        assert!(err.to_string().contains("chmod 600"));
    }

    #[test]
    fn load_reports_a_missing_file() {
        let dir = TempDir::new();
        let err = ClusterKey::load(&dir.0.join("absent")).unwrap_err();
        assert!(matches!(err, SealError::Io { action: "open", .. }), "{err}");
    }
}
