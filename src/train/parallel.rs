//! Data-parallel training: which rank this process is, which sequences it reads, and the
//! gradient all-reduce.
//!
//! One process per rank, launched by `specauf train --ranks N` (CPU) or `--gpus N`, or by the
//! usual variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, and `MASTER_ADDR`/`MASTER_PORT` on the
//! CPU, as torchrun sets them). A step's global batch is `world × batch_sequences` sequences per
//! micro-batch, drawn from the one seeded order; global slot s goes to rank s mod world, and its
//! anchors are drawn from (seed, step, s) whatever rank runs it, so the union of the ranks'
//! batches is exactly the batch one process with `world × batch_sequences` would take.
//! Gradients, loss and metrics are averaged over ranks by an [`AllReduce`]; rank 0 alone writes
//! the run directory (atomically, as every file). The checkpoint records the global batch, and a
//! run resumed on another number of ranks keeps it (`trainer`).
//!
//! The all-reduces: [`SingleProcess`] (world size 1, every plain run), [`TcpGroup`] (CPU
//! processes over local TCP, the role gloo plays for PyTorch; run and tested), [`ThreadRank`]
//! (ranks as threads of one process; the in-process equivalence tests), and NCCL (behind the
//! `cuda` feature), which has never been compiled or run: no CUDA toolkit and no GPU were
//! available.
//!
//! What "identical to one process with N× the batch" means here: each rank's head normalises
//! its loss over its own rows, and the all-reduce averages the ranks' gradients (as PyTorch DDP
//! does). That equals the single-process gradient up to the order of float sums when every
//! rank's normaliser is the same (`norm: "sequences"` with equal per-rank batches; tested to
//! 1e-7 on the weights after 3 steps), and within the spread of the normalisers otherwise.

use std::sync::{Arc, Condvar, Mutex};

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
/// scalars. Implementations: [`SingleProcess`] (world 1), [`ThreadRank`] (ranks as threads of
/// one process, on the CPU), and NCCL with the `cuda` feature.
pub trait AllReduce: Send {
    fn world(&self) -> World;
    /// The mean over ranks of a buffer every rank passes with the same length: the one
    /// collective the others are made of.
    fn mean_flat(&mut self, values: Vec<f32>) -> Result<Vec<f32>, TrainError>;
    /// Replaces each variable's gradient by its mean over ranks (all in one exchange, in the
    /// order of `vars`, the same on every rank).
    fn mean_grads(&mut self, grads: &mut GradStore, vars: &[(String, Var)]) -> Result<(), TrainError> {
        let (flat, shapes) = flatten(grads, vars)?;
        let mean = self.mean_flat(flat)?;
        unflatten(grads, vars, shapes, &mean)
    }
    /// Replaces each value by its mean over ranks.
    fn mean_scalars(&mut self, values: &mut [f64]) -> Result<(), TrainError> {
        let mean = self.mean_flat(values.iter().map(|&x| x as f32).collect())?;
        for (d, s) in values.iter_mut().zip(mean) {
            *d = f64::from(s);
        }
        Ok(())
    }
}

/// World size 1: every mean is the value itself.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl AllReduce for SingleProcess {
    fn world(&self) -> World {
        World::single()
    }
    fn mean_flat(&mut self, values: Vec<f32>) -> Result<Vec<f32>, TrainError> {
        Ok(values)
    }
    // No copies through a buffer at world size 1.
    fn mean_grads(&mut self, _grads: &mut GradStore, _vars: &[(String, Var)]) -> Result<(), TrainError> {
        Ok(())
    }
    fn mean_scalars(&mut self, _values: &mut [f64]) -> Result<(), TrainError> {
        Ok(())
    }
}

/// How the error of a rank that stopped because another one failed begins.
pub const PEER_FAILED: &str = "stopped: data-parallel rank ";

/// One rank of a group of ranks that are threads of this process ([`thread_group`]). The mean
/// is summed in rank order by every rank, so all ranks hold the same bits afterwards. A rank
/// that fails calls [`ThreadRank::abort`]; the others then return an error at their next
/// collective instead of waiting forever.
pub struct ThreadRank {
    rank: usize,
    shared: Arc<Shared>,
}

struct Shared {
    size: usize,
    state: Mutex<Exchange>,
    turn: Condvar,
}

/// The buffers of the collective in progress. A collective has two phases: every rank deposits
/// its values (phase 0), then every rank reads the sum (phase 1); `arrived` counts the ranks
/// through the current phase and `round` names it, so a fast rank cannot start the next
/// collective before the slow ones have read this one.
struct Exchange {
    slots: Vec<Arc<Vec<f32>>>,
    arrived: usize,
    round: u64,
    failed: Option<usize>,
}

/// `size` ranks that reduce with each other through shared memory: give rank r's to the thread
/// that runs rank r (see [`super::trainer::train_in_threads`]).
pub fn thread_group(size: usize) -> Vec<ThreadRank> {
    let shared = Arc::new(Shared {
        size,
        state: Mutex::new(Exchange { slots: (0..size).map(|_| Arc::new(Vec::new())).collect(), arrived: 0, round: 0, failed: None }),
        turn: Condvar::new(),
    });
    (0..size).map(|rank| ThreadRank { rank, shared: shared.clone() }).collect()
}

impl ThreadRank {
    /// Tells the other ranks that this one stopped with an error.
    pub fn abort(&self) {
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        st.failed.get_or_insert(self.rank);
        self.shared.turn.notify_all();
    }

    /// A handle that aborts the group when the rank's thread ends without finishing.
    pub fn abort_handle(&self) -> ThreadRank {
        ThreadRank { rank: self.rank, shared: self.shared.clone() }
    }

    fn wait_phase<'a>(&self, mut st: std::sync::MutexGuard<'a, Exchange>) -> Result<std::sync::MutexGuard<'a, Exchange>, TrainError> {
        let round = st.round;
        st.arrived += 1;
        if st.arrived == self.shared.size {
            st.arrived = 0;
            st.round += 1;
            self.shared.turn.notify_all();
        } else {
            while st.round == round && st.failed.is_none() {
                st = self.shared.turn.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        }
        match st.failed {
            Some(r) if st.round == round => Err(TrainError::Setup(format!("{PEER_FAILED}{r} stopped with an error (see its message)"))),
            _ => Ok(st),
        }
    }

    /// The mean over ranks of `values` (every rank passes the same length). The lock is held
    /// only to deposit and to take the others' buffers, not while summing.
    fn mean(&self, values: Vec<f32>) -> Result<Vec<f32>, TrainError> {
        let len = values.len();
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        st.slots[self.rank] = Arc::new(values);
        let st = self.wait_phase(st)?;
        let slots = st.slots.clone();
        drop(st);
        if slots.iter().any(|s| s.len() != len) {
            self.abort();
            return Err(TrainError::Setup("data-parallel ranks reduced buffers of different lengths".into()));
        }
        let n = self.shared.size as f32;
        let mut sum = vec![0f32; len];
        for slot in &slots {
            for (a, b) in sum.iter_mut().zip(slot.iter()) {
                *a += b;
            }
        }
        sum.iter_mut().for_each(|a| *a /= n);
        drop(slots);
        // Nobody refills a slot before every rank has taken this round's.
        let st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        drop(self.wait_phase(st)?);
        Ok(sum)
    }
}

impl AllReduce for ThreadRank {
    fn world(&self) -> World {
        World { rank: self.rank, size: self.shared.size, local_rank: 0 }
    }
    fn mean_flat(&mut self, values: Vec<f32>) -> Result<Vec<f32>, TrainError> {
        self.mean(values)
    }
}

/// The all-reduce for `world`: [`SingleProcess`] at size 1; above that, [`TcpGroup`] between
/// CPU processes, and NCCL between GPUs, which needs the `cuda` feature (never built in this
/// project).
pub fn all_reduce_for(world: World, cpu: bool) -> Result<Box<dyn AllReduce>, TrainError> {
    if world.size == 1 {
        return Ok(Box::new(SingleProcess));
    }
    if cpu {
        let addr = rendezvous_from(|k| std::env::var(k).ok())?;
        return Ok(Box::new(TcpGroup::connect(world, &addr, std::time::Duration::from_secs(120))?));
    }
    multi_process(world)
}

/// `MASTER_ADDR:MASTER_PORT`, where rank 0 listens (as torchrun sets them; `specauf train
/// --ranks N` sets them for its children).
pub fn rendezvous_from(var: impl Fn(&str) -> Option<String>) -> Result<String, TrainError> {
    match (var("MASTER_ADDR"), var("MASTER_PORT")) {
        (Some(a), Some(p)) if p.trim().parse::<u16>().is_ok() => Ok(format!("{}:{}", a.trim(), p.trim())),
        (a, p) => Err(TrainError::Setup(format!(
            "several CPU processes meet at MASTER_ADDR:MASTER_PORT (got {a:?}:{p:?}); set both, or launch with `specauf train --ranks N`"
        ))),
    }
}

/// The all-reduce of data-parallel CPU processes over TCP (the role gloo plays for PyTorch):
/// rank 0 listens at the rendezvous address, every other rank connects. A mean is gathered on
/// rank 0, summed in rank order and sent back, so every rank gets the same bits. A rank that
/// dies closes its connection, and the others fail with an error naming it instead of waiting.
pub struct TcpGroup {
    world: World,
    /// Rank 0: the connection of rank r at index r − 1. Other ranks: the one to rank 0.
    peers: Vec<std::net::TcpStream>,
}

impl TcpGroup {
    /// Rank 0 binds `addr` and accepts the others; the others connect, retrying until `wait`.
    pub fn connect(world: World, addr: &str, wait: std::time::Duration) -> Result<Self, TrainError> {
        use std::io::{Read, Write};
        use std::net::{TcpListener, TcpStream};
        let setup = |what: &str, e: std::io::Error| TrainError::Setup(format!("data-parallel rank {} {what} {addr}: {e}", world.rank));
        let deadline = std::time::Instant::now() + wait;
        if world.is_primary() {
            let listener = TcpListener::bind(addr).map_err(|e| setup("could not listen at", e))?;
            listener.set_nonblocking(true).map_err(|e| setup("at", e))?;
            let mut slots: Vec<Option<TcpStream>> = (1..world.size).map(|_| None).collect();
            while slots.iter().any(|s| s.is_none()) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).map_err(|e| setup("at", e))?;
                        let mut r = [0u8; 8];
                        s.read_exact(&mut r).map_err(|e| setup("lost a rank at", e))?;
                        let r = u64::from_le_bytes(r) as usize;
                        match slots.get_mut(r.wrapping_sub(1)) {
                            Some(slot @ None) => *slot = Some(s),
                            _ => return Err(TrainError::Setup(format!("a process at {addr} claimed rank {r}, which is not free among {} ranks", world.size))),
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if std::time::Instant::now() > deadline {
                            let missing: Vec<String> = slots.iter().enumerate().filter(|(_, s)| s.is_none()).map(|(i, _)| (i + 1).to_string()).collect();
                            return Err(TrainError::Setup(format!("data-parallel ranks {} did not connect to {addr} within {wait:?}", missing.join(", "))));
                        }
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    Err(e) => return Err(setup("could not accept at", e)),
                }
            }
            let peers: Vec<TcpStream> = slots.into_iter().map(|s| s.expect("every slot filled")).collect();
            for p in &peers {
                p.set_nodelay(true).map_err(|e| setup("at", e))?;
            }
            return Ok(TcpGroup { world, peers });
        }
        let mut stream = loop {
            match TcpStream::connect(addr) {
                Ok(s) => break s,
                Err(e) if std::time::Instant::now() > deadline => return Err(setup("could not reach rank 0 at", e)),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
            }
        };
        stream.set_nodelay(true).map_err(|e| setup("at", e))?;
        stream.write_all(&(world.rank as u64).to_le_bytes()).map_err(|e| setup("could not register at", e))?;
        Ok(TcpGroup { world, peers: vec![stream] })
    }

    fn lost(&self, peer: usize, e: std::io::Error) -> TrainError {
        TrainError::Setup(format!("{PEER_FAILED}{peer} disconnected ({e}); it stopped with an error (see its output)"))
    }

    fn mean(&mut self, mut values: Vec<f32>) -> Result<Vec<f32>, TrainError> {
        if self.world.is_primary() {
            let mut buf = vec![0f32; values.len()];
            for i in 0..self.peers.len() {
                recv_exact(&mut self.peers[i], bytemuck::cast_slice_mut(&mut buf)).map_err(|e| self.lost(i + 1, e))?;
                for (a, b) in values.iter_mut().zip(&buf) {
                    *a += b;
                }
            }
            let n = self.world.size as f32;
            values.iter_mut().for_each(|a| *a /= n);
            for i in 0..self.peers.len() {
                send_all(&mut self.peers[i], bytemuck::cast_slice(&values)).map_err(|e| self.lost(i + 1, e))?;
            }
        } else {
            send_all(&mut self.peers[0], bytemuck::cast_slice(&values)).map_err(|e| self.lost(0, e))?;
            recv_exact(&mut self.peers[0], bytemuck::cast_slice_mut(&mut values)).map_err(|e| self.lost(0, e))?;
        }
        Ok(values)
    }
}

/// A length-prefixed message: the length must match on both sides (the ranks reduce the same
/// variables), checked so a mismatch is an error, not a hang.
fn send_all(s: &mut std::net::TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    s.write_all(&(bytes.len() as u64).to_le_bytes())?;
    s.write_all(bytes)
}

fn recv_exact(s: &mut std::net::TcpStream, buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    let mut len = [0u8; 8];
    s.read_exact(&mut len)?;
    if u64::from_le_bytes(len) as usize != buf.len() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("a message of {} bytes where {} were expected", u64::from_le_bytes(len), buf.len())));
    }
    s.read_exact(buf)
}

impl AllReduce for TcpGroup {
    fn world(&self) -> World {
        self.world
    }
    fn mean_flat(&mut self, values: Vec<f32>) -> Result<Vec<f32>, TrainError> {
        self.mean(values)
    }
}

type GradShapes = Vec<(candle_core::Shape, candle_core::DType, candle_core::Device)>;

/// Every variable's gradient, in the order of `vars` (the same on every rank), as one buffer.
fn flatten(grads: &GradStore, vars: &[(String, Var)]) -> Result<(Vec<f32>, GradShapes), TrainError> {
    let mut flat = Vec::new();
    let mut shapes = Vec::with_capacity(vars.len());
    for (name, v) in vars {
        let g = grads.get(v.as_tensor()).ok_or_else(|| TrainError::Setup(format!("no gradient for {name} to reduce")))?;
        shapes.push((g.shape().clone(), g.dtype(), g.device().clone()));
        flat.extend(g.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok((flat, shapes))
}

/// Puts the reduced buffer back as the variables' gradients.
fn unflatten(grads: &mut GradStore, vars: &[(String, Var)], shapes: GradShapes, mean: &[f32]) -> Result<(), TrainError> {
    let mut at = 0;
    for ((_, v), (shape, dtype, device)) in vars.iter().zip(shapes) {
        let n = shape.elem_count();
        let t = candle_core::Tensor::from_slice(&mean[at..at + n], shape, &device)?.to_dtype(dtype)?;
        grads.insert(v.as_tensor(), t);
        at += n;
    }
    Ok(())
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
        fn mean_flat(&mut self, values: Vec<f32>) -> Result<Vec<f32>, TrainError> {
            let n = values.len();
            Ok(self.mean(&Tensor::from_vec(values, n, &candle_core::Device::Cpu)?)?.to_vec1()?)
        }
        fn mean_grads(&mut self, grads: &mut GradStore, vars: &[(String, Var)]) -> Result<(), TrainError> {
            for (_, v) in vars {
                if let Some(g) = grads.remove(v.as_tensor()) {
                    let m = self.mean(&g)?;
                    grads.insert(v.as_tensor(), m);
                }
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
    fn more_than_one_gpu_process_needs_the_cuda_build() {
        assert!(all_reduce_for(World::single(), false).is_ok());
        let e = all_reduce_for(World { rank: 0, size: 2, local_rank: 0 }, false).err().unwrap().to_string();
        assert!(e.contains("--features cuda") && e.contains("WORLD_SIZE=2"), "{e}");
    }

    #[test]
    fn cpu_processes_meet_at_the_rendezvous_address() {
        assert_eq!(rendezvous_from(vars(&[("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")])).unwrap(), "127.0.0.1:29500");
        for bad in [vec![("MASTER_ADDR", "127.0.0.1")], vec![("MASTER_ADDR", "h"), ("MASTER_PORT", "x")], vec![]] {
            let e = rendezvous_from(vars(&bad)).unwrap_err().to_string();
            assert!(e.contains("MASTER_PORT") && e.contains("--ranks"), "{e}");
        }
    }

    /// Three ranks, one thread each, reduce over TCP and over shared memory: every rank gets the
    /// mean, in the same bits, and each group gets the same bits as the other.
    #[test]
    fn tcp_and_thread_groups_give_every_rank_the_same_mean() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let size = 3;
        let input = |r: usize| -> Vec<f64> { (0..5).map(|i| (r * 10 + i) as f64 * 0.1 + 1e-3).collect() };
        let want: Vec<f64> = (0..5).map(|i| (0..size).map(|r| input(r)[i] as f32).sum::<f32>() as f64 / size as f64).collect();
        let tcp: Vec<Vec<f64>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..size)
                .map(|rank| {
                    let addr = addr.clone();
                    s.spawn(move || {
                        let mut g = TcpGroup::connect(World { rank, size, local_rank: 0 }, &addr, std::time::Duration::from_secs(20)).unwrap();
                        let mut v = input(rank);
                        g.mean_scalars(&mut v).unwrap();
                        v
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let threads: Vec<Vec<f64>> = std::thread::scope(|s| {
            let hs: Vec<_> = thread_group(size)
                .into_iter()
                .enumerate()
                .map(|(rank, mut g)| s.spawn(move || {
                    let mut v = input(rank);
                    g.mean_scalars(&mut v).unwrap();
                    v
                }))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for v in tcp.iter().chain(&threads) {
            assert_eq!(v, &tcp[0], "every rank holds the same bits");
            for (a, b) in v.iter().zip(&want) {
                assert!((a - b).abs() < 1e-6, "{v:?} vs {want:?}");
            }
        }
    }

    /// A rank that fails makes the others' next collective an error instead of a hang.
    #[test]
    fn a_failed_rank_stops_the_others() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let a2 = addr.clone();
        let waiter = std::thread::spawn(move || {
            let mut g = TcpGroup::connect(World { rank: 0, size: 2, local_rank: 0 }, &a2, std::time::Duration::from_secs(20)).unwrap();
            g.mean_scalars(&mut [1.0]).unwrap_err().to_string()
        });
        drop(TcpGroup::connect(World { rank: 1, size: 2, local_rank: 1 }, &addr, std::time::Duration::from_secs(20)).unwrap());
        let e = waiter.join().unwrap();
        assert!(e.starts_with(PEER_FAILED) && e.contains("rank 1"), "{e}");
        let mut group = thread_group(2);
        let t1 = group.pop().unwrap();
        let mut t0 = group.pop().unwrap();
        let h = std::thread::spawn(move || t0.mean_scalars(&mut [1.0]).unwrap_err().to_string());
        std::thread::sleep(std::time::Duration::from_millis(50));
        t1.abort();
        let e = h.join().unwrap();
        assert!(e.starts_with(PEER_FAILED) && e.contains("rank 1"), "{e}");
        // Nobody listening: a clear error after the wait, not a hang.
        let e = TcpGroup::connect(World { rank: 1, size: 2, local_rank: 1 }, &addr, std::time::Duration::from_millis(200)).err().unwrap().to_string();
        assert!(e.contains("could not reach rank 0"), "{e}");
    }
}
