//! The peak rate of AVX-512 VNNI `vpdpbusd zmm` on this CPU, one thread: the ceiling that the
//! qgemm kernels (src/model/qgemm/vnni.rs) are measured against in docs/perf.md.
//!
//! cargo run --release --example vnni_peak [-- --seconds 1]
//! Pin it to one core to see one core's rate: `taskset -c 0 target/release/examples/vnni_peak`.
//!
//! Twelve independent accumulator chains (more than the instruction's latency times its
//! issue rate), written in `asm!` so that the compiler can neither drop the work nor move the
//! accumulators through memory between iterations. Two forms are timed: all-register operands,
//! and the form the kernel issues, with the activation broadcast from memory (`{1to16}`).
//! One `vpdpbusd zmm` is 64 int8 multiply-adds.

#[cfg(target_arch = "x86_64")]
fn main() -> anyhow::Result<()> {
    use std::time::Instant;
    if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni")) {
        anyhow::bail!("this CPU lacks AVX-512 VNNI; the qgemm kernels use their portable path here");
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let seconds: f64 = match args.iter().position(|a| a == "--seconds") {
        Some(i) => args.get(i + 1).ok_or_else(|| anyhow::anyhow!("--seconds needs a value"))?.parse()?,
        None => 1.0,
    };
    let xs = [0x0102_0304i32; 16];
    // One iteration = 12 instructions; run in batches of 1M iterations until `seconds` pass.
    let run = |memory: bool| -> f64 {
        let t = Instant::now();
        let mut iters = 0u64;
        while t.elapsed().as_secs_f64() < seconds {
            // SAFETY: the CPU has avx512f and avx512vnni (checked above); the asm reads 48 bytes
            // of `xs` (16 i32) and writes only the zmm registers it declares clobbered.
            unsafe { peak_loop(xs.as_ptr(), 1_000_000, memory) };
            iters += 1_000_000;
        }
        (iters * 12) as f64 / t.elapsed().as_secs_f64()
    };
    println!("vpdpbusd zmm, one thread, 12 independent chains, {seconds} s per form (medians of 5)");
    for (name, memory) in [("register operands", false), ("activation broadcast from memory {1to16}", true)] {
        let mut v: Vec<f64> = (0..5).map(|_| run(memory)).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        let ips = v[2];
        println!("{name:>42}: {:6.2} G instructions/s = {:6.1} G int8 multiply-adds/s", ips / 1e9, ips * 64.0 / 1e9);
    }
    Ok(())
}

/// `n` iterations of 12 independent `vpdpbusd zmm` on zmm0..zmm11.
///
/// # Safety
/// The CPU has avx512f and avx512vnni, and `x` points to at least 12 readable i32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn peak_loop(x: *const i32, n: u64, memory: bool) {
    use std::arch::asm;
    macro_rules! twelve {
        ($($form:literal),*) => {
            asm!(
                "vpxord zmm12, zmm12, zmm12",
                "vpternlogd zmm13, zmm13, zmm13, 0xff",
                "prefetcht0 [{x}]",
                "2:",
                $($form,)*
                "dec {n}",
                "jnz 2b",
                n = inout(reg) n => _,
                x = in(reg) x,
                out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _, out("zmm4") _, out("zmm5") _,
                out("zmm6") _, out("zmm7") _, out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
                out("zmm12") _, out("zmm13") _,
                options(nostack, readonly),
            )
        };
    }
    if memory {
        twelve!(
            "vpdpbusd zmm0, zmm12, dword ptr [{x}]{{1to16}}",
            "vpdpbusd zmm1, zmm12, dword ptr [{x} + 4]{{1to16}}",
            "vpdpbusd zmm2, zmm12, dword ptr [{x} + 8]{{1to16}}",
            "vpdpbusd zmm3, zmm12, dword ptr [{x} + 12]{{1to16}}",
            "vpdpbusd zmm4, zmm12, dword ptr [{x} + 16]{{1to16}}",
            "vpdpbusd zmm5, zmm12, dword ptr [{x} + 20]{{1to16}}",
            "vpdpbusd zmm6, zmm12, dword ptr [{x} + 24]{{1to16}}",
            "vpdpbusd zmm7, zmm12, dword ptr [{x} + 28]{{1to16}}",
            "vpdpbusd zmm8, zmm12, dword ptr [{x} + 32]{{1to16}}",
            "vpdpbusd zmm9, zmm12, dword ptr [{x} + 36]{{1to16}}",
            "vpdpbusd zmm10, zmm12, dword ptr [{x} + 40]{{1to16}}",
            "vpdpbusd zmm11, zmm12, dword ptr [{x} + 44]{{1to16}}"
        );
    } else {
        twelve!(
            "vpdpbusd zmm0, zmm12, zmm13",
            "vpdpbusd zmm1, zmm12, zmm13",
            "vpdpbusd zmm2, zmm12, zmm13",
            "vpdpbusd zmm3, zmm12, zmm13",
            "vpdpbusd zmm4, zmm12, zmm13",
            "vpdpbusd zmm5, zmm12, zmm13",
            "vpdpbusd zmm6, zmm12, zmm13",
            "vpdpbusd zmm7, zmm12, zmm13",
            "vpdpbusd zmm8, zmm12, zmm13",
            "vpdpbusd zmm9, zmm12, zmm13",
            "vpdpbusd zmm10, zmm12, zmm13",
            "vpdpbusd zmm11, zmm12, zmm13"
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn main() -> anyhow::Result<()> {
    anyhow::bail!("vnni_peak measures an x86-64 instruction")
}
