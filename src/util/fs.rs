//! Atomic files: every result, checkpoint and cache entry is written beside its final path under
//! a unique temporary name, fsynced, and renamed over it, so a kill at any moment leaves either
//! the old file or the new one, never a torn one.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A temporary sibling of `path`, `<name>.<pid>.<n>.tmp`: unique within and across processes, so
/// two writers of the same file never share a temporary.
pub fn tmp_sibling(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".{}.{}.tmp", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
    path.with_file_name(name)
}

/// Makes a rename into `path`'s folder durable; best effort (not every file system allows
/// opening a directory).
pub fn sync_parent(path: &Path) {
    if let Some(parent) = path.parent() {
        if let Ok(d) = File::open(parent) {
            let _ = d.sync_all();
        }
    }
}

/// Writes `bytes` to a [`tmp_sibling`] of `path`, fsyncs it, renames it over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_with(path, |tmp| {
        let mut f = File::create(tmp)?;
        f.write_all(bytes)
    })
}

/// Lets `write` create a [`tmp_sibling`] of `path` (for writers that want a path, such as
/// safetensors'), then fsyncs it and renames it over `path`. The temporary is removed on error.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> std::io::Result<()>) -> std::io::Result<()> {
    let tmp = tmp_sibling(path);
    let result = write(&tmp).and_then(|()| File::open(&tmp)?.sync_all()).and_then(|()| fs::rename(&tmp, path));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    sync_parent(path);
    Ok(())
}

/// Copies the files of `src` (not sub-folders) into `dst` through a temporary sibling folder and
/// one rename: `dst` is either absent, the old folder, or the complete copy.
pub fn copy_dir_atomic(src: &Path, dst: &Path) -> std::io::Result<()> {
    let tmp = tmp_sibling(dst);
    let result = (|| {
        fs::create_dir_all(&tmp)?;
        for entry in fs::read_dir(src)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                fs::copy(entry.path(), tmp.join(entry.file_name()))?;
            }
        }
        if dst.exists() {
            fs::remove_dir_all(dst)?;
        }
        fs::rename(&tmp, dst)
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result?;
    sync_parent(dst);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporaries_of_one_path_never_collide() {
        let p = Path::new("/x/y/results.json");
        let (a, b) = (tmp_sibling(p), tmp_sibling(p));
        assert_ne!(a, b);
        assert_eq!(a.parent(), p.parent());
    }

    #[test]
    fn copy_dir_atomic_replaces_the_old_folder_whole() {
        let d = tempfile::tempdir().unwrap();
        let (src, dst) = (d.path().join("src"), d.path().join("dst"));
        fs::create_dir_all(&src).unwrap();
        fs::create_dir_all(&dst).unwrap();
        fs::write(src.join("a"), b"new").unwrap();
        fs::write(dst.join("stale"), b"old").unwrap();
        copy_dir_atomic(&src, &dst).unwrap();
        assert_eq!(fs::read(dst.join("a")).unwrap(), b"new");
        assert!(!dst.join("stale").exists());
        let leftovers: Vec<_> = fs::read_dir(d.path()).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().ends_with(".tmp")).collect();
        assert!(leftovers.is_empty());
    }
}
