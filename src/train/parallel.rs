//! Data-parallel training: which rank this process is, which sequences it reads, and the
//! gradient all-reduce.
//!
//! One process per GPU, launched by `specauf train --gpus N` or by the usual variables
//! (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, as torchrun sets them). A step's global batch is
//! `world × batch_sequences` sequences per micro-batch, drawn from the one seeded order; global
//! slot s goes to rank s mod world, and its anchors are drawn from (seed, step, s) whatever rank
//! runs it, so the union of the ranks' batches is exactly the batch one process with
//! `world × batch_sequences` would take. Gradients, loss and metrics are averaged over ranks by
//! an [`AllReduce`]; rank 0 alone writes the run directory (atomically, as every file).
//!
//! World size 1 ([`SingleProcess`]) is the path every CPU run takes and the only one this project
//! has run. The NCCL implementation (`nccl` below, behind the `cuda` feature) has never been
//! compiled or run: no CUDA toolkit and no GPU were available.
//!
//! What "identical to one GPU with N× the batch" means here: each rank's head normalises its loss
//! over its own rows, and the all-reduce averages the ranks' gradients (as PyTorch DDP does).
//! That equals the single-process gradient exactly when every rank's normaliser is the same
//! (e.g. `norm: "blocks"` with full blocks) and within the spread of the normalisers otherwise.

use candle_core::backprop::GradStore;
use candle_core::Var;

use super::trainer::TrainError;

/// This process's place among the training processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub size: usize,
    /// The GPU of this process on its machine (`--device cuda:LOCAL_RANK`).
    pub local_rank: usize,
}

impl Default for World {
    fn default() -> Self {
        World::single()
    }
}

impl World {
    pub fn single() -> Self {
        World { rank: 0, size: 1, local_rank: 0 }
    }

    /// Reads `RANK`, `WORLD_SIZE` and `LOCAL_RANK` through `var` (pass `std::env::var(..).ok()`).
    /// None of them set: world size 1. Some set, or values that do not fit: an error naming them.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, TrainError> {
        let get = |k: &str| -> Result<Option<usize>, TrainError> {
            match var(k) {
                None => Ok(None),
                Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| TrainError::Setup(format!("{k}={v:?} is not a non-negative integer"))),
            }
        };
        let (rank, size, local) = (get("RANK")?, get("WORLD_SIZE")?, get("LOCAL_RANK")?);
        let world = match (rank, size) {
            (None, None) if local.is_none() => return Ok(World::single()),
            (Some(rank), Some(size)) => World { rank, size, local_rank: local.unwrap_or(rank) },
            _ => {
                return Err(TrainError::Setup(
                    "set both RANK and WORLD_SIZE (and LOCAL_RANK when several machines share the job), or none of them".into(),
                ))
            }
        };
        if world.size == 0 || world.rank >= world.size {
            return Err(TrainError::Setup(format!("RANK={} must be below WORLD_SIZE={} (and WORLD_SIZE at least 1)", world.rank, world.size)));
        }
        Ok(world)
    }

    /// Rank 0 writes the run directory (config, metrics, checkpoints, the final drafter).
    pub fn is_primary(&self) -> bool {
        self.rank == 0
    }

    /// Whether this rank trains on global slot `slot` of a micro-batch.
    pub fn owns(&self, slot: usize) -> bool {
        slot % self.size == self.rank
    }

    /// The global slots of a micro-batch of `per_rank` sequences per rank that this rank takes.
    pub fn slots(&self, per_rank: usize) -> Vec<usize> {
        (0..per_rank * self.size).filter(|&s| self.owns(s)).collect()
    }

    /// This rank's (global slot, sequence) pairs of one micro-batch: `next` is called once per
    /// global slot (every rank walks the whole shared order, so the cursors stay in step) and
    /// the sequences of the slots this rank owns are kept.
    pub fn take(&self, per_rank: usize, mut next: impl FnMut() -> usize) -> Vec<(usize, usize)> {
        (0..per_rank * self.size).map(|s| (s, next())).filter(|&(s, _)| self.owns(s)).collect()
    }
}

/// The collective a data-parallel trainer needs: the mean of every rank's gradients and of a few
/// scalars. Implementations: [`SingleProcess`] (world 1), and NCCL with the `cuda` feature.
pub trait AllReduce {
    fn world(&self) -> World;
    /// Replaces each variable's gradient by its mean over ranks.
    fn mean_grads(&self, grads: &mut GradStore, vars: &[(String, Var)]) -> Result<(), TrainError>;
    /// Replaces each value by its mean over ranks.
    fn mean_scalars(&self, values: &mut [f64]) -> Result<(), TrainError>;
}

/// World size 1: every mean is the value itself.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl AllReduce for SingleProcess {
    fn world(&self) -> World {
        World::single()
    }
    fn mean_grads(&self, _grads: &mut GradStore, _vars: &[(String, Var)]) -> Result<(), TrainError> {
        Ok(())
    }
    fn mean_scalars(&self, _values: &mut [f64]) -> Result<(), TrainError> {
        Ok(())
    }
}

/// The all-reduce for `world`: [`SingleProcess`] at size 1; NCCL above that, which needs the
/// `cuda` feature (never built in this project).
pub fn all_reduce_for(world: World) -> Result<Box<dyn AllReduce>, TrainError> {
    if world.size == 1 {
        return Ok(Box::new(SingleProcess));
    }
    multi_process(world)
}

#[cfg(not(feature = "cuda"))]
fn multi_process(world: World) -> Result<Box<dyn AllReduce>, TrainError> {
    Err(TrainError::Setup(format!(
        "WORLD_SIZE={} needs the NCCL all-reduce, which is built only with `--features cuda` (and has never been compiled or run by this project); train with one process",
        world.size
    )))
}

#[cfg(feature = "cuda")]
fn multi_process(world: World) -> Result<Box<dyn AllReduce>, TrainError> {
    Ok(Box::new(nccl::Nccl::new(world)?))
}

/// NCCL through cudarc 0.19 (the version candle 0.11 uses), as candle's own multi-process example
/// does. NEVER COMPILED OR RUN: this project had no CUDA toolkit and no GPU; it is written
/// against cudarc 0.19.10's source (`CudaContext`, `Comm::from_rank`, `all_reduce`). Rank 0
/// writes the NCCL unique id to the file named by `SPECAUF_NCCL_ID_FILE` (set by
/// `specauf train --gpus N`); the others wait for it. Tensors go through host memory, which is
/// simple and slow; a device-side reduce over candle's CUDA storage is the obvious next step.
#[cfg(feature = "cuda")]
mod nccl {
    use std::sync::Arc;

    use super::{AllReduce, TrainError, World};
    use candle_core::backprop::GradStore;
    use candle_core::{Tensor, Var};
    use cudarc::driver::{CudaContext, CudaStream};
    use cudarc::nccl::{Comm, Id, ReduceOp};

    pub struct Nccl {
        world: World,
        stream: Arc<CudaStream>,
        comm: Comm,
    }

    fn err(e: impl std::fmt::Debug) -> TrainError {
        TrainError::Setup(format!("NCCL: {e:?}"))
    }

    impl Nccl {
        pub fn new(world: World) -> Result<Self, TrainError> {
            let path = std::env::var("SPECAUF_NCCL_ID_FILE")
                .map_err(|_| TrainError::Setup("SPECAUF_NCCL_ID_FILE is not set; launch with `specauf train --gpus N`".into()))?;
            let id = if world.is_primary() {
                let id = Id::new().map_err(err)?;
                let bytes: Vec<u8> = id.internal().iter().map(|&b| b as u8).collect();
                crate::util::fs::write_atomic(std::path::Path::new(&path), &bytes).map_err(|e| TrainError::Setup(format!("{path}: {e}")))?;
                id
            } else {
                let bytes = loop {
                    match std::fs::read(&path) {
                        Ok(b) if b.len() == 128 => break b,
                        _ => std::thread::sleep(std::time::Duration::from_millis(50)),
                    }
                };
                let mut internal = [0 as core::ffi::c_char; 128];
                for (d, s) in internal.iter_mut().zip(bytes) {
                    *d = s as core::ffi::c_char;
                }
                Id::uninit(internal)
            };
            let stream = CudaContext::new(world.local_rank).map_err(err)?.default_stream();
            let comm = Comm::from_rank(stream.clone(), world.rank, world.size, id).map_err(err)?;
            Ok(Nccl { world, stream, comm })
        }

        fn mean(&self, t: &Tensor) -> Result<Tensor, TrainError> {
            let v: Vec<f32> = t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
            let send = self.stream.clone_htod(&v).map_err(err)?;
            let mut recv = self.stream.alloc_zeros::<f32>(v.len()).map_err(err)?;
            self.comm.all_reduce(&send, &mut recv, &ReduceOp::Sum).map_err(err)?;
            let out: Vec<f32> = self.stream.clone_dtoh(&recv).map_err(err)?;
            let n = self.world.size as f32;
            Ok(Tensor::from_vec(out.into_iter().map(|x| x / n).collect::<Vec<_>>(), t.shape(), t.device())?)
        }
    }

    impl AllReduce for Nccl {
        fn world(&self) -> World {
            self.world
        }
        fn mean_grads(&self, grads: &mut GradStore, vars: &[(String, Var)]) -> Result<(), TrainError> {
            for (_, v) in vars {
                if let Some(g) = grads.remove(v.as_tensor()) {
                    let m = self.mean(&g)?;
                    grads.insert(v.as_tensor(), m);
                }
            }
            Ok(())
        }
        fn mean_scalars(&self, values: &mut [f64]) -> Result<(), TrainError> {
            let t = Tensor::from_vec(values.iter().map(|&x| x as f32).collect::<Vec<_>>(), values.len(), &candle_core::Device::Cpu)?;
            let m: Vec<f32> = self.mean(&t)?.to_vec1()?;
            for (d, s) in values.iter_mut().zip(m) {
                *d = f64::from(s);
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn the_launch_variables_are_read_and_checked() {
        assert_eq!(World::from_vars(vars(&[])).unwrap(), World::single());
        assert_eq!(World::from_vars(vars(&[("RANK", "2"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "0")])).unwrap(), World { rank: 2, size: 4, local_rank: 0 });
        assert_eq!(World::from_vars(vars(&[("RANK", "1"), ("WORLD_SIZE", "2")])).unwrap().local_rank, 1);
        for bad in [
            vec![("RANK", "4"), ("WORLD_SIZE", "4")],
            vec![("RANK", "0"), ("WORLD_SIZE", "0")],
            vec![("RANK", "x"), ("WORLD_SIZE", "2")],
            vec![("RANK", "1")],
            vec![("LOCAL_RANK", "1")],
        ] {
            let e = World::from_vars(vars(&bad)).unwrap_err().to_string();
            assert!(e.contains("RANK") || e.contains("WORLD_SIZE"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn the_ranks_slots_partition_every_micro_batch() {
        for size in 1..=5 {
            for per_rank in [1usize, 2, 3, 8] {
                let mut seen = vec![0usize; size * per_rank];
                for rank in 0..size {
                    let w = World { rank, size, local_rank: rank };
                    let slots = w.slots(per_rank);
                    assert_eq!(slots.len(), per_rank, "every rank gets the same number of sequences");
                    for s in slots {
                        seen[s] += 1;
                    }
                }
                assert!(seen.iter().all(|&c| c == 1), "size {size} × {per_rank}: {seen:?}");
            }
        }
        assert_eq!(World::single().slots(3), vec![0, 1, 2], "world 1 takes the slots of the single-process trainer");
    }

    #[test]
    fn the_ranks_shards_of_a_run_partition_what_one_process_with_the_whole_batch_reads() {
        // A shared seeded order over 23 sequences, walked for 5 micro-batches.
        let order: Vec<usize> = (0..23).map(|i| (i * 7 + 3) % 23).collect();
        let per_rank = 2;
        for size in [1usize, 2, 3, 4] {
            let whole = World::single();
            let mut c = 0;
            let mut want = Vec::new();
            for _ in 0..5 {
                want.push(whole.take(per_rank * size, || { c += 1; order[(c - 1) % order.len()] }));
            }
            let mut got: Vec<Vec<(usize, usize)>> = vec![Vec::new(); 5];
            for rank in 0..size {
                let w = World { rank, size, local_rank: rank };
                let mut c = 0;
                for mb in got.iter_mut() {
                    mb.extend(w.take(per_rank, || { c += 1; order[(c - 1) % order.len()] }));
                }
            }
            for (g, w) in got.iter_mut().zip(&want) {
                g.sort();
                assert_eq!(g, w, "world {size}: the ranks together take the single process's (slot, sequence) pairs, each once");
            }
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn more_than_one_process_needs_the_cuda_build() {
        assert!(all_reduce_for(World::single()).is_ok());
        let e = all_reduce_for(World { rank: 0, size: 2, local_rank: 0 }).err().unwrap().to_string();
        assert!(e.contains("--features cuda") && e.contains("WORLD_SIZE=2"), "{e}");
    }
}
