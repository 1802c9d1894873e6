//! `specauf train --gpus N` / `--ranks N`: one training process per rank, as torchrun would
//! start them.
//!
//! Each child is this binary with the same arguments (less `--gpus`/`--ranks`), and
//! `RANK=i WORLD_SIZE=N LOCAL_RANK=i`. Only rank 0 writes the run directory.
//! - GPUs: `--device cuda:i` and `SPECAUF_NCCL_ID_FILE` (where rank 0 publishes the NCCL id).
//!   The children need the NCCL all-reduce, which the `cuda` feature builds and which has NEVER
//!   been compiled or run by this project; without the feature, N > 1 is refused before
//!   anything starts.
//! - CPU: `--device cpu`, `MASTER_ADDR`/`MASTER_PORT` (a free local port; the TCP all-reduce
//!   of `train::parallel`), and the machine's cores shared out (`RAYON_NUM_THREADS`,
//!   `CANDLE_NUM_THREADS`), so that each core trains its own sequences.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::stages::StageError;

/// Whether this binary was built with the `cuda` feature.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// Where the ranks run.
#[derive(Debug, Clone, PartialEq)]
pub enum RankDevices {
    /// Rank i on cuda:i; rank 0 publishes the NCCL id in `id_file`.
    Gpus { id_file: PathBuf },
    /// Every rank on the CPU with `threads` threads; rank 0 listens at `127.0.0.1:port`.
    Cpu { threads: usize, port: u16 },
}

/// The children's commands: `exe args... --device D` with the rank variables of rank i.
pub fn rank_commands(exe: &Path, args: &[String], ranks: usize, devices: &RankDevices) -> Vec<Command> {
    (0..ranks)
        .map(|i| {
            let mut cmd = Command::new(exe);
            cmd.args(args);
            cmd.env("RANK", i.to_string()).env("WORLD_SIZE", ranks.to_string()).env("LOCAL_RANK", i.to_string());
            match devices {
                RankDevices::Gpus { id_file } => {
                    cmd.arg("--device").arg(format!("cuda:{i}")).env("SPECAUF_NCCL_ID_FILE", id_file);
                }
                RankDevices::Cpu { threads, port } => {
                    cmd.arg("--device").arg("cpu").env("MASTER_ADDR", "127.0.0.1").env("MASTER_PORT", port.to_string());
                    cmd.env("RAYON_NUM_THREADS", threads.to_string()).env("CANDLE_NUM_THREADS", threads.to_string());
                }
            }
            cmd
        })
        .collect()
}

/// Starts `ranks` CPU ranks of `exe args`, sharing the machine's cores, and waits for all.
pub fn launch_cpu_ranks(exe: &Path, args: &[String], ranks: usize) -> Result<(), StageError> {
    if ranks < 2 {
        return Err(StageError::Invalid("--ranks launches processes only for 2 or more ranks; with one, train in this process".into()));
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|source| StageError::Io { path: PathBuf::from("127.0.0.1:0 (a free port for the ranks)"), source })?
        .port();
    run_ranks(exe, rank_commands(exe, args, ranks, &RankDevices::Cpu { threads: (cores / ranks).max(1), port }))
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
    let result = run_ranks(exe, rank_commands(exe, args, gpus, &RankDevices::Gpus { id_file: id_file.clone() }));
    let _ = std::fs::remove_file(&id_file);
    result
}

/// Spawns the ranks and waits for every one; an error names each rank that failed.
fn run_ranks(exe: &Path, commands: Vec<Command>) -> Result<(), StageError> {
    let mut children = Vec::new();
    for (i, mut cmd) in commands.into_iter().enumerate() {
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
        let cmds = rank_commands(Path::new("specauf"), &args, 3, &RankDevices::Gpus { id_file: "/tmp/id".into() });
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
        let cmds = rank_commands(Path::new("specauf"), &args, 2, &RankDevices::Cpu { threads: 1, port: 29500 });
        for (i, c) in cmds.iter().enumerate() {
            let a: Vec<String> = c.get_args().map(|s| s.to_string_lossy().into_owned()).collect();
            assert_eq!(a, ["train", "--set", "out=o", "--device", "cpu"]);
            let env: std::collections::HashMap<String, String> = c
                .get_envs()
                .filter_map(|(k, v)| Some((k.to_string_lossy().into_owned(), v?.to_string_lossy().into_owned())))
                .collect();
            assert_eq!((env["RANK"].as_str(), env["WORLD_SIZE"].as_str()), (i.to_string().as_str(), "2"));
            assert_eq!((env["MASTER_ADDR"].as_str(), env["MASTER_PORT"].as_str()), ("127.0.0.1", "29500"));
            assert_eq!((env["RAYON_NUM_THREADS"].as_str(), env["CANDLE_NUM_THREADS"].as_str()), ("1", "1"));
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
