//! The saved desired state: every accepted change is written here before the data plane sees
//! it, so a restarted lbd (or one killed with SIGKILL) comes back with the same VIPs and backends.
//!
//! A save writes a temp file beside the state file, fsyncs it, renames it over the old one and
//! fsyncs the folder: a crash at any point leaves either the old file or the new one, whole.

use std::{
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use thiserror::Error;

use crate::{
    config::{self, ConfigError},
    model::DesiredState,
};

const HEADER: &str = "# lbd's saved state: VIPs and backends as last accepted. Written by lbd on \
                      every change;\n# change it with lbctl (lbctl apply -f, lbctl export), not \
                      by hand while lbd runs.\n\n";

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("state file {}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file exists but does not parse or validate; lbd refuses to start rather than run
    /// with less than what was saved, and never overwrites it.
    #[error(
        "state file {}: {source}; lbd will not start over it (fix or move the file)",
        path.display()
    )]
    Corrupt {
        path: PathBuf,
        #[source]
        source: ConfigError,
    },
    #[error(
        "state file {}: not UTF-8 text (invalid byte at offset {offset}); lbd will not start \
         over it (fix or move the file)",
        path.display()
    )]
    NotText { path: PathBuf, offset: usize },
    /// lbd always writes a `vip` key (`vip = []` when there are no VIPs): a file without one
    /// was cut short (or emptied), and starting from it would silently drop every VIP.
    #[error(
        "state file {}: no `vip` key, so the file is empty or cut short (lbd always writes \
         one, `vip = []` when there are no VIPs); lbd will not start over it (fix or move the \
         file)",
        path.display()
    )]
    Truncated { path: PathBuf },
    #[error("state file {}: cannot save: {step}: {source}", path.display())]
    Write {
        path: PathBuf,
        step: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Where the state lives.
#[derive(Clone, Debug)]
pub struct StateStore {
    path: PathBuf,
}

impl StateStore {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved state, or `None` when nothing was saved yet. Anything else that is not a
    /// whole, valid state file (unreadable, a folder, not text, cut short, not TOML, unknown
    /// keys, invalid VIPs) is an error naming the file and the problem; the file is left as
    /// it is.
    pub fn load(&self) -> Result<Option<DesiredState>, StoreError> {
        let bytes = match fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StoreError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let text = String::from_utf8(bytes).map_err(|e| StoreError::NotText {
            path: self.path.clone(),
            offset: e.utf8_error().valid_up_to(),
        })?;
        let state = config::parse_state(&text).map_err(|source| StoreError::Corrupt {
            path: self.path.clone(),
            source,
        })?;
        // Parsed, so this second read of the text cannot fail on syntax.
        let has_vip = toml::from_str::<toml::Table>(&text).is_ok_and(|t| t.contains_key("vip"));
        if !has_vip {
            return Err(StoreError::Truncated {
                path: self.path.clone(),
            });
        }
        Ok(Some(state))
    }

    /// Replaces the saved state atomically.
    pub fn save(&self, state: &DesiredState) -> Result<(), StoreError> {
        let err = |step| {
            let path = self.path.clone();
            move |source| StoreError::Write { path, step, source }
        };
        let dir = self
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(err("creating the folder"))?;
        let name = self
            .path
            .file_name()
            .map_or_else(|| "state".into(), |n| n.to_string_lossy().into_owned());
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let written = (|| {
            let mut file = fs::File::create(&tmp).map_err(err("creating the temp file"))?;
            file.write_all(HEADER.as_bytes())
                .and_then(|()| file.write_all(config::state_to_toml(state).as_bytes()))
                .map_err(err("writing the temp file"))?;
            file.sync_all().map_err(err("syncing the temp file"))?;
            fs::rename(&tmp, &self.path).map_err(err("renaming the temp file"))
        })();
        if written.is_err() {
            // Best effort: the old state file is intact either way.
            fs::remove_file(&tmp).ok();
        }
        written?;
        // The rename is durable only once the folder is.
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err("syncing the folder"))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("lb-store-{tag}-{}", std::process::id()));
            fs::remove_dir_all(&dir).ok();
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            fs::set_permissions(&self.0, fs::Permissions::from_mode(0o755)).ok();
            fs::remove_dir_all(&self.0).ok();
        }
    }

    fn example() -> DesiredState {
        config::parse_config(include_str!("../lb.example.toml"))
            .unwrap()
            .state
    }

    #[test]
    fn saves_and_loads_back() {
        let dir = TempDir::new("roundtrip");
        let store = StateStore::new(dir.0.join("sub/state.toml"));
        assert!(store.load().unwrap().is_none());
        let mut state = example();
        let vip = *state.vips.keys().next().unwrap();
        let addr = state.vips[&vip].backends[0].addr;
        state.set_drain(&vip, addr, true).unwrap();
        store.save(&state).unwrap();
        assert_eq!(store.load().unwrap(), Some(state.clone()));
        store.save(&DesiredState::default()).unwrap();
        assert_eq!(store.load().unwrap(), Some(DesiredState::default()));
        // No temp file left behind.
        let names: Vec<_> = fs::read_dir(dir.0.join("sub")).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn corrupt_file_is_refused_and_kept() {
        let dir = TempDir::new("corrupt");
        let path = dir.0.join("state.toml");
        let store = StateStore::new(&path);
        store.save(&example()).unwrap();
        let full = fs::read_to_string(&path).unwrap();
        let truncated = &full[..full.len() * 2 / 3];
        fs::write(&path, truncated).unwrap();
        let e = store.load().unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("state file {}:", path.display())),
            "{e}"
        );
        assert!(e.contains("will not start over it"), "{e}");
        assert_eq!(fs::read_to_string(&path).unwrap(), truncated);
    }

    /// Every kind of damaged state file is refused with the file and the problem named (toml's
    /// line and column where it has them), and left byte for byte as it was.
    #[test]
    fn damaged_files_are_refused_with_the_problem_named() {
        let dir = TempDir::new("damaged");
        let path = dir.0.join("state.toml");
        let store = StateStore::new(&path);
        store.save(&example()).unwrap();
        let full = fs::read(&path).unwrap();
        let header_only = HEADER.as_bytes().to_vec();
        let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
            (
                "truncated",
                full[..full.len() * 2 / 3].to_vec(),
                &["TOML parse error at line", "column"],
            ),
            (
                "garbage",
                b"\x7fELF\x02\x01\x01\0\0\xff\xfe".to_vec(),
                &["not UTF-8 text (invalid byte at offset 9)"],
            ),
            (
                "text garbage",
                b"}}}} not toml at all".to_vec(),
                &["TOML parse error at line 1, column 1"],
            ),
            (
                "wrong schema: a config file",
                b"[settings]\nmax_vips = 4\n".to_vec(),
                &["line 1", "unknown field `settings`, expected `vip`"],
            ),
            (
                "wrong schema: JSON",
                br#"{"vip": []}"#.to_vec(),
                &["TOML parse error at line 1"],
            ),
            (
                "wrong schema: wrong type",
                b"vip = \"10.0.0.1:80/tcp\"\n".to_vec(),
                &["line 1", "invalid type: string"],
            ),
            ("empty", Vec::new(), &["no `vip` key", "empty or cut short"]),
            ("only the header", header_only, &["no `vip` key"]),
        ];
        for (what, bytes, wants) in cases {
            fs::write(&path, &bytes).unwrap();
            let e = store.load().unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("state file {}:", path.display())),
                "{what}: {e}"
            );
            assert!(e.contains("will not start over it"), "{what}: {e}");
            for want in wants {
                assert!(e.contains(want), "{what}: want {want:?} in {e}");
            }
            assert_eq!(fs::read(&path).unwrap(), bytes, "{what}: the file changed");
        }
        // An empty state as lbd writes it is fine.
        store.save(&DesiredState::default()).unwrap();
        assert_eq!(store.load().unwrap(), Some(DesiredState::default()));

        // A folder where the file should be.
        fs::remove_file(&path).unwrap();
        fs::create_dir(&path).unwrap();
        let e = store.load().unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("state file {}: cannot read:", path.display())),
            "{e}"
        );
        assert!(e.contains("Is a directory"), "{e}");
        assert!(path.is_dir());
    }

    #[test]
    fn failed_save_keeps_the_old_file() {
        // Root ignores folder permissions, so a read-only folder cannot be simulated here;
        // a state path whose parent is a file fails the same way.
        let dir = TempDir::new("fail");
        let blocker = dir.0.join("file");
        fs::write(&blocker, "x").unwrap();
        let store = StateStore::new(blocker.join("state.toml"));
        let e = store.save(&example()).unwrap_err().to_string();
        assert!(e.contains("cannot save: creating the folder"), "{e}");
        assert_eq!(fs::read_to_string(&blocker).unwrap(), "x");
    }
}
