//! Secret key files: 32-byte keys stored as 64 hex digits (or 32 raw bytes),
//! readable by their owner only.
//!
//! Loading refuses a file that group or others can read or write, the way
//! ssh refuses a loose private key: a key that has been exposed must not be
//! used quietly. Writing creates the file with mode 0600 from the start, so
//! there is no moment at which it is readable by others.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("key file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "key file {path} has mode {mode:04o}; it must be readable by its owner only (run: chmod 600 {path})"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("key file {path}: expected 64 hex digits (or 32 raw bytes), found {found}")]
    Format { path: PathBuf, found: String },
    #[error("key file {path} already exists; refusing to overwrite a key")]
    Exists { path: PathBuf },
}

/// Load a 32-byte secret from `path`, refusing loose permissions.
pub fn load_key(path: &Path) -> Result<Zeroizing<[u8; 32]>, KeyFileError> {
    let io = |source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let mode = file.metadata().map_err(io)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    // A key file is tiny; anything much larger is not one.
    let mut raw = Zeroizing::new(Vec::with_capacity(80));
    Read::by_ref(&mut file)
        .take(1024)
        .read_to_end(&mut raw)
        .map_err(io)?;
    parse_key(&raw).ok_or_else(|| KeyFileError::Format {
        path: path.to_owned(),
        found: describe(&raw),
    })
}

/// Write a 32-byte secret to a new file `path` as hex, mode 0600.
pub fn write_key(path: &Path, key: &[u8; 32]) -> Result<(), KeyFileError> {
    write_secret_text(path, &Zeroizing::new(format!("{}\n", hex::encode(key))))
}

/// Write secret text (a credential, a key) to a new file with mode 0600.
pub fn write_secret_text(path: &Path, text: &str) -> Result<(), KeyFileError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                KeyFileError::Exists {
                    path: path.to_owned(),
                }
            } else {
                KeyFileError::Io {
                    path: path.to_owned(),
                    source,
                }
            }
        })?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|source| KeyFileError::Io {
            path: path.to_owned(),
            source,
        })
}

/// Any whole file bmsgw reads (configs, certificates, registries): at
/// most `max` bytes, refused above that before more is read, so a huge or
/// endless file (`/dev/zero`) cannot take the memory.
pub fn read_bounded(path: &Path, max: usize) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(path)?
        .take(max as u64 + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("over {max} bytes, far more than such a file holds"),
        ));
    }
    Ok(bytes)
}

/// Read secret text, refusing loose permissions like [`load_key`].
pub fn read_secret_text(path: &Path) -> Result<Zeroizing<String>, KeyFileError> {
    let io = |source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let mode = file.metadata().map_err(io)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    let mut text = Zeroizing::new(String::new());
    Read::by_ref(&mut file)
        .take(64 * 1024)
        .read_to_string(&mut text)
        .map_err(io)?;
    Ok(text)
}

fn parse_key(raw: &[u8]) -> Option<Zeroizing<[u8; 32]>> {
    let mut key = Zeroizing::new([0u8; 32]);
    if raw.len() == 32 && std::str::from_utf8(raw).map_or(true, |s| s.trim().len() != 32) {
        // Raw binary key. (32 printable characters are read as text below and
        // fail there, rather than being taken as a binary key by accident.)
        key.copy_from_slice(raw);
        return Some(key);
    }
    let text = std::str::from_utf8(raw).ok()?.trim();
    hex::decode_to_slice(text, &mut key[..]).ok()?;
    Some(key)
}

/// What the file held, without echoing secret material.
fn describe(raw: &[u8]) -> String {
    match std::str::from_utf8(raw) {
        Ok(s) => {
            let t = s.trim();
            if t.chars().all(|c| c.is_ascii_hexdigit()) {
                format!("{} hex digits", t.len())
            } else {
                format!(
                    "{} characters that are not all hex digits",
                    t.chars().count()
                )
            }
        }
        Err(_) => format!("{} bytes of binary data", raw.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "bmsgw-keyfile-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn written_keys_are_0600_and_load_back() {
        let d = dir();
        let p = d.join("root.key");
        let key = [0x5Au8; 32];
        write_key(&p, &key).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(*load_key(&p).unwrap(), key);
        // Never overwritten.
        assert!(matches!(
            write_key(&p, &key),
            Err(KeyFileError::Exists { .. })
        ));
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn loose_permissions_are_refused_with_the_fix() {
        let d = dir();
        let p = d.join("loose.key");
        write_key(&p, &[1u8; 32]).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = load_key(&p).unwrap_err();
            assert!(
                matches!(e, KeyFileError::Permissions { mode: m, .. } if m == mode),
                "{e}"
            );
            assert!(e.to_string().contains("chmod 600"), "{e}");
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(load_key(&p).is_ok());
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn malformed_keys_are_refused_without_echoing_them() {
        let d = dir();
        for (name, content) in [
            ("short", b"abcd".to_vec()),
            ("nothex", vec![b'z'; 64]),
            ("long", vec![b'a'; 66]),
        ] {
            let p = d.join(name);
            write_secret_text(&p, std::str::from_utf8(&content).unwrap()).unwrap();
            let e = load_key(&p).unwrap_err();
            assert!(matches!(e, KeyFileError::Format { .. }), "{name}: {e}");
            assert!(!e.to_string().contains("zzzz"), "{e}");
        }
        let missing = load_key(&d.join("missing")).unwrap_err();
        assert!(missing.to_string().contains("missing"), "{missing}");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn raw_binary_keys_load() {
        assert_eq!(parse_key(&[0xFF; 32]).map(|k| *k), Some([0xFF; 32]));
        assert!(parse_key(&[b'a'; 32]).is_none());
    }
}
