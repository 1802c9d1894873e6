//! The qgemm kernels (src/model/qgemm.rs) beside candle's QMatMul over the same Q8_0 weights
//! and the other weight modes, interleaved in one run so machine load hits all of them.
//!
//! cargo run --release --example bench_qgemm [-- [--reps N] [--hot] [--no-model] [--model PATH.gguf]]
//! `--hot`: one copy of each weight, left in the caches between calls (the kernel alone).
//! One thread: RAYON_NUM_THREADS=1 CANDLE_NUM_THREADS=1 (candle's quantized matmul has its own
//! spinning thread pool, sized once from these variables; on an oversubscribed machine its
//! barriers can cost more than the work).
//!
//! 1. Per-matmul medians (µs) on SmolLM2-135M shapes for m = 1, 4, 8, 16, with the multiply-add
//!    rate of the one-thread int8 call and of the Q4_1 call (compare with `examples/vnni_peak.rs`).
//! 2. Whole model (default: the SmolLM2 Q4_1 GGUF from the asset cache) in `WeightsMode::Q8`
//!    (qgemm int8), `Native` (qgemm Q4_1 layers, int8 Q8_0 head) and `F32`, interleaved.
//!    Checks accuracy against f32 mode and that a 16-token forward gives the bits of 16 decode
//!    steps; reports prefill of 256 tokens, decode ms/token and a 16-token forward (all logits)
//!    at context 256, medians over rounds. (Commit 3116d0b of this file also ran candle's
//!    QMatMul on a Q8_0 copy of the model; that path no longer exists in any mode.)

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use specauf::model::qgemm::{Exec, Kernel, QMatrix};
use specauf::model::{load_target, Logits, ModelLocation, Target, WeightsMode};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn matmuls(reps: usize, hot: bool) -> anyhow::Result<()> {
    println!(
        "== per matmul (medians of {reps}), rayon threads {}, RAYON_NUM_THREADS={:?} CANDLE_NUM_THREADS={:?}, load {}",
        rayon::current_num_threads(),
        std::env::var("RAYON_NUM_THREADS").ok(),
        std::env::var("CANDLE_NUM_THREADS").ok(),
        load()
    );
    println!(
        "{:>12} {:>3} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>12} {:>11}",
        "in->out", "m", "candle µs", "int8 µs", "int8 1t µs", "q4_1 µs", "avx2 µs", "int8 GB/s", "q4_1 GB/s", "int8 1t GMAC", "q4_1 GMAC"
    );
    for (out, inp) in [(576usize, 576usize), (1536, 576), (576, 1536), (49152, 576)] {
        // Enough copies of the weight that a call never finds its weights in L2 left by the
        // previous call, as in a model whose 150 MB of weights stream through every token.
        // With --hot, one copy: the weights stay in the caches (the kernel's compute alone).
        let copies = if hot { 1 } else { (16_000_000 / (out * inp)).max(1) };
        let (mut ours, mut q4, mut theirs) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..copies {
            let w = Tensor::randn(0f32, 0.05, (out, inp), &Device::Cpu)?;
            let qt = QTensor::quantize(&w, GgmlDType::Q8_0)?;
            ours.push(QMatrix::from_qtensor("w", &qt)?);
            theirs.push(QMatMul::from_qtensor(qt)?);
            q4.push(QMatrix::from_q4_1("w", &QTensor::quantize(&w, GgmlDType::Q4_1)?)?);
        }
        let mut next = 0usize;
        let mut pick = || {
            next += 1;
            next % copies
        };
        for m in [1usize, 4, 8, 16] {
            let xv: Vec<f32> = (0..m * inp).map(|i| (i * 7919 % 1000) as f32 / 500.0 - 1.0).collect();
            let x = Tensor::from_vec(xv.clone(), (m, inp), &Device::Cpu)?;
            let mut y = vec![0f32; m * out];
            let (mut tc, mut to, mut t1, mut t4, mut tp) = (vec![], vec![], vec![], vec![], vec![]);
            let portable_reps = if out * inp * m > 4_000_000 { 1 } else { 3 };
            for rep in 0..reps {
                let (c, o, o1, o4, p) = (pick(), pick(), pick(), pick(), pick());
                let t = Instant::now();
                std::hint::black_box(theirs[c].forward(&x)?);
                tc.push(t.elapsed().as_secs_f64());
                let t = Instant::now();
                ours[o].matmul(&xv, m, &mut y)?;
                to.push(t.elapsed().as_secs_f64());
                let t = Instant::now();
                ours[o1].matmul_with(&xv, m, &mut y, Exec { kernel: Kernel::Auto, threads: 1 })?;
                t1.push(t.elapsed().as_secs_f64());
                let t = Instant::now();
                q4[o4].matmul(&xv, m, &mut y)?;
                t4.push(t.elapsed().as_secs_f64());
                if rep < portable_reps && Kernel::Avx2.available() {
                    let t = Instant::now();
                    ours[p].matmul_with(&xv, m, &mut y, Exec { kernel: Kernel::Avx2, threads: 0 })?;
                    tp.push(t.elapsed().as_secs_f64());
                }
            }
            let (c, o, o1, o4) = (median(tc), median(to), median(t1), median(t4));
            let p = if tp.is_empty() { f64::NAN } else { median(tp) };
            println!(
                "{:>12} {:>3} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>9.1} {:>9.1} {:>12.1} {:>11.1}",
                format!("{inp}->{out}"),
                m,
                c * 1e6,
                o * 1e6,
                o1 * 1e6,
                o4 * 1e6,
                p * 1e6,
                ours[0].bytes() as f64 / o / 1e9,
                q4[0].bytes() as f64 / o4 / 1e9,
                (m * inp * out) as f64 / o1 / 1e9,
                (m * inp * out) as f64 / o4 / 1e9
            );
        }
    }
    Ok(())
}

/// CPU seconds used by this process so far (all threads): on a shared machine, wall time
/// includes waiting for the CPU; CPU time does not (but includes rayon's spinning).
fn cpu_time() -> f64 {
    #[repr(C)]
    struct Timespec {
        sec: i64,
        nsec: i64,
    }
    extern "C" {
        fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
    }
    const CLOCK_PROCESS_CPUTIME_ID: i32 = 2;
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: clock_gettime writes one timespec (two 64-bit fields on x86_64 Linux).
    let rc = unsafe { clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc == 0 {
        ts.sec as f64 + ts.nsec as f64 * 1e-9
    } else {
        f64::NAN
    }
}

/// Wall and CPU seconds of each timed call.
#[derive(Default)]
struct Times {
    prefill: Vec<(f64, f64)>,
    decode: Vec<(f64, f64)>,
    verify: Vec<(f64, f64)>,
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, (f64, f64)) {
    let (w, c) = (Instant::now(), cpu_time());
    let r = f();
    (r, (w.elapsed().as_secs_f64(), cpu_time() - c))
}

fn medians(v: &[(f64, f64)]) -> (f64, f64) {
    (median(v.iter().map(|x| x.0).collect()), median(v.iter().map(|x| x.1).collect()))
}

/// One round: prefill the prompt (256 tokens), `steps` decode steps, then `verifies` 16-token
/// forwards at context 256.
fn round(target: &Target, prompt: &[u32], steps: usize, verifies: usize, t: &mut Times) -> anyhow::Result<()> {
    let cache = &mut target.new_cache();
    let (r, dt) = timed(|| target.forward(prompt, cache, &[], Logits::Last));
    r?;
    t.prefill.push(dt);
    for i in 0..steps {
        let (r, dt) = timed(|| target.forward(&[(i * 101 + 200) as u32], cache, &[], Logits::Last));
        r?;
        t.decode.push(dt);
    }
    for _ in 0..verifies {
        cache.truncate(prompt.len());
        let (r, dt) = timed(|| target.forward(&prompt[..16], cache, &[], Logits::All));
        r?;
        t.verify.push(dt);
    }
    Ok(())
}

fn max_diff_and_agreement(a: &Tensor, b: &Tensor) -> anyhow::Result<(f32, usize)> {
    let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let agree = a.argmax(1)?.to_vec1::<u32>()?.iter().zip(b.argmax(1)?.to_vec1::<u32>()?).filter(|(x, y)| **x == *y).count();
    Ok((diff, agree))
}

fn logits(t: &Target, ids: &[u32]) -> anyhow::Result<Tensor> {
    let mut cache = t.new_cache();
    t.forward(ids, &mut cache, &[], Logits::All)?.logits.ok_or_else(|| anyhow::anyhow!("no logits"))
}

/// The verify contract on the real model: 16 tokens in one forward == 16 single steps.
fn verify_is_bit_exact(t: &Target, prompt: &[u32]) -> anyhow::Result<bool> {
    let mut cache = t.new_cache();
    t.forward(&prompt[..200], &mut cache, &[], Logits::None)?;
    let chunk = t.forward(&prompt[200..216], &mut cache, &[], Logits::All)?.logits.ok_or_else(|| anyhow::anyhow!("no logits"))?;
    cache.truncate(200);
    let mut steps = Vec::new();
    for &tok in &prompt[200..216] {
        steps.push(t.forward(&[tok], &mut cache, &[], Logits::All)?.logits.ok_or_else(|| anyhow::anyhow!("no logits"))?);
    }
    let (a, b) = (chunk.flatten_all()?.to_vec1::<f32>()?, Tensor::cat(&steps, 0)?.flatten_all()?.to_vec1::<f32>()?);
    Ok(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()))
}

fn whole_model(path: &std::path::Path, rounds: usize) -> anyhow::Result<()> {
    let loc = ModelLocation::from_path(path)?;
    let targets = [
        ("Q8 (qgemm int8)", load_target(&loc, WeightsMode::Q8)?),
        ("Native (qgemm Q4_1)", load_target(&loc, WeightsMode::Native)?),
        ("F32 (candle f32 matmul)", load_target(&loc, WeightsMode::F32)?),
    ];
    let prompt: Vec<u32> = (0..256).map(|i| (i * 37 % 40000 + 100) as u32).collect();

    // Accuracy: against f32 on the dequantized GGUF weights (what Q4_1 encodes exactly).
    {
        let reference = logits(&targets[2].1, &prompt[..64])?;
        for (name, t) in &targets[..2] {
            let (d, agree) = max_diff_and_agreement(&logits(t, &prompt[..64])?, &reference)?;
            println!("{name:>23} vs f32 mode, 64 tokens: max |Δlogit| {d:.3}, argmax agrees at {agree}/64");
        }
    }
    for (name, t) in &targets[..2] {
        let exact = verify_is_bit_exact(t, &prompt)?;
        println!("{name:>23}: 16-token forward == 16 decode steps, bit for bit: {exact}");
        anyhow::ensure!(exact, "{name} broke batch invariance on the real model");
    }

    println!("== whole model, {rounds} rounds interleaved, load before {}", load());
    let mut times: Vec<Times> = targets.iter().map(|_| Times::default()).collect();
    for _ in 0..rounds {
        for ((_, t), times) in targets.iter().zip(&mut times) {
            round(t, &prompt, 32, 8, times)?;
        }
    }
    for ((name, _), t) in targets.iter().zip(&times) {
        let ((p, pc), (d, dc), (v, vc)) = (medians(&t.prefill), medians(&t.decode), medians(&t.verify));
        println!(
            "{name:>23}: prefill-256 {:.0} tok/s ({:.0} ms), decode {:.2} ms/token ({:.1} tok/s), 16-token forward {:.2} ms = {:.2}× decode",
            256.0 / p,
            p * 1e3,
            d * 1e3,
            1.0 / d,
            v * 1e3,
            v / d
        );
        println!(
            "{:>23}  CPU time: prefill {:.0} ms, decode {:.2} ms, 16-token forward {:.2} ms = {:.2}× decode",
            "",
            pc * 1e3,
            dc * 1e3,
            vc * 1e3,
            vc / dc
        );
    }
    println!("load after {}", load());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let reps: usize = flag("--reps").map(|s| s.parse()).transpose()?.unwrap_or(15);
    matmuls(reps, args.iter().any(|a| a == "--hot"))?;
    if args.iter().any(|a| a == "--no-model") {
        return Ok(());
    }
    let path = match flag("--model") {
        Some(p) => std::path::PathBuf::from(p),
        None => specauf::assets::file(&specauf::assets::SMOLLM2, specauf::assets::SMOLLM2_GGUF)?,
    };
    whole_model(&path, 3)
}
