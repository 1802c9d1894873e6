//! `specauf train --gpus N`: one training process per GPU, as torchrun would start them.
//!
//! Each child is this binary with the same arguments (less `--gpus`), `--device cuda:i`, and
//! `RANK=i WORLD_SIZE=N LOCAL_RANK=i` plus `SPECAUF_NCCL_ID_FILE` (where rank 0 publishes the
//! NCCL id). Only rank 0 writes the run directory. The children need the NCCL all-reduce, which
//! the `cuda` feature builds and which has NEVER been compiled or run by this project; without
//! the feature, N > 1 is refused before anything starts.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::stages::StageError;

/// Whether this binary was built with the `cuda` feature.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// The children's commands: `exe args... --device cuda:i` with the rank variables of GPU i.
pub fn rank_commands(exe: &Path, args: &[String], gpus: usize, id_file: &Path) -> Vec<Command> {
    (0..gpus)
        .map(|i| {
            let mut cmd = Command::new(exe);
            cmd.args(args).arg("--device").arg(format!("cuda:{i}"));
            cmd.env("RANK", i.to_string()).env("WORLD_SIZE", gpus.to_string()).env("LOCAL_RANK", i.to_string());
            cmd.env("SPECAUF_NCCL_ID_FILE", id_file);
            cmd
        })
        .collect()
}

/// Starts `gpus` ranks of `exe args` and waits for all of them; fails if any fails.
pub fn launch_ranks(exe: &Path, args: &[String], gpus: usize, work: &Path) -> Result<(), StageError> {
    if gpus < 2 {
        return Err(StageError::Invalid("--gpus launches ranks only for 2 or more GPUs; with one, train in this process".into()));
    }
    if !CUDA_BUILT {
        return Err(StageError::Invalid(format!(
            "--gpus {gpus} needs a CUDA build with NCCL: rebuild with `cargo build --release --features cuda` (never compiled or run by this project; see the README)"
        )));
    }
    std::fs::create_dir_all(work).map_err(|source| StageError::Io { path: work.to_path_buf(), source })?;
    let id_file: PathBuf = work.join(format!("nccl-id.{}", std::process::id()));
    let mut children = Vec::new();
    for (i, mut cmd) in rank_commands(exe, args, gpus, &id_file).into_iter().enumerate() {
        let child = cmd.spawn().map_err(|source| StageError::Io { path: exe.to_path_buf(), source })?;
        children.push((i, child));
    }
    let mut failed = Vec::new();
    for (i, mut child) in children {
        match child.wait() {
            Ok(s) if s.success() => {}
            Ok(s) => failed.push(format!("rank {i} exited with {s}")),
            Err(e) => failed.push(format!("rank {i}: {e}")),
        }
    }
    let _ = std::fs::remove_file(&id_file);
    if failed.is_empty() {
        Ok(())
    } else {
        Err(StageError::Invalid(format!("data-parallel training failed: {}", failed.join("; "))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rank_gets_its_gpu_and_the_rank_variables() {
        let args = vec!["train".to_string(), "--set".into(), "out=o".into()];
        let cmds = rank_commands(Path::new("specauf"), &args, 3, Path::new("/tmp/id"));
        assert_eq!(cmds.len(), 3);
        for (i, c) in cmds.iter().enumerate() {
            let a: Vec<String> = c.get_args().map(|s| s.to_string_lossy().into_owned()).collect();
            assert_eq!(a, ["train", "--set", "out=o", "--device", &format!("cuda:{i}")]);
            let env: std::collections::HashMap<String, String> = c
                .get_envs()
                .filter_map(|(k, v)| Some((k.to_string_lossy().into_owned(), v?.to_string_lossy().into_owned())))
                .collect();
            assert_eq!(env["RANK"], i.to_string());
            assert_eq!(env["WORLD_SIZE"], "3");
            assert_eq!(env["LOCAL_RANK"], i.to_string());
            assert_eq!(env["SPECAUF_NCCL_ID_FILE"], "/tmp/id");
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn several_gpus_without_the_cuda_build_are_refused_before_anything_starts() {
        let dir = tempfile::tempdir().unwrap();
        let e = launch_ranks(Path::new("/nonexistent/specauf"), &[], 2, dir.path()).unwrap_err().to_string();
        assert!(e.contains("--features cuda"), "{e}");
        assert!(launch_ranks(Path::new("x"), &[], 1, dir.path()).is_err());
    }
}
