//! Measuring: medians and the process's peak memory, for benchmarks.

use std::time::Duration;

/// Median of a sample (NaN-free input); NaN for an empty one.
pub fn median(xs: &mut [f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        0.5 * (xs[n / 2 - 1] + xs[n / 2])
    }
}

/// The machine's 1-minute load average (Linux `/proc/loadavg`): benches report it beside their
/// timings.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

/// Peak resident memory of this process in MiB since the last [`reset_peak_rss`] (Linux).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb as f64 / 1024.0)
}

/// Resets the peak-RSS counter (Linux: writing 5 to clear_refs); false where unsupported.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Runs `cmd` to completion with its stdout and stderr captured, sampling the child's peak
/// resident memory (`VmHWM` of /proc/PID/status, Linux) every few milliseconds; the last sample
/// before it exits is its peak (a high-water mark only grows). Returns the output and the peak in
/// MiB (None where /proc is unavailable).
pub fn run_measuring_rss(cmd: &mut std::process::Command) -> std::io::Result<(std::process::Output, Option<f64>)> {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let status_path = format!("/proc/{}/status", child.id());
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out_reader = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let err_reader = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let mut peak: Option<u64> = None;
    let status = loop {
        if let Some(kb) = std::fs::read_to_string(&status_path).ok().and_then(|s| vm_hwm_kb(&s)) {
            peak = Some(peak.map_or(kb, |p| p.max(kb)));
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Ok((std::process::Output { status, stdout, stderr }, peak.map(|kb| kb as f64 / 1024.0)))
}

fn vm_hwm_kb(status: &str) -> Option<u64> {
    status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_childs_peak_memory_is_sampled_while_it_runs() {
        // A child that holds about 64 MiB for a moment: its peak covers them, its output comes back.
        let mut cmd = std::process::Command::new("python3");
        cmd.args(["-c", "import time; b = bytearray(64 << 20); time.sleep(0.2); print('done')"]);
        let (out, peak) = super::run_measuring_rss(&mut cmd).unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "done");
        let peak = peak.expect("VmHWM on Linux");
        assert!(peak > 64.0 && peak < 1024.0, "{peak} MiB");
    }

    #[test]
    fn medians_of_odd_and_even_samples() {
        assert_eq!(super::median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(super::median(&mut []).is_nan());
    }
}

/// Keeps freed memory for reuse instead of handing it back to the operating system, for the rest
/// of the process (glibc's `mallopt`): blocks up to 32 MiB (the largest mmap threshold glibc
/// accepts on every 64-bit build) come from the heap rather than fresh mappings, and the heap is
/// not trimmed below 1 GiB of free top. A training step allocates and frees the same large
/// temporaries (activations, attention scores, their gradients) every step; with the defaults,
/// many of them came back as fresh zeroed pages each time, and the page faults and clearing
/// were about a tenth of a step (`bench train`, decay, alternating runs: 691 and 725 ms against
/// 806 and 740; with a 1 GiB trim threshold alone, which pins the mmap threshold at its 128 KiB
/// default, 1100 ms). Peak RSS stays that of the largest step. Training calls this; inference
/// does not, since there freed buffers handed back keep the resident set small. A no-op where
/// the C library is not glibc.
pub fn retain_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
        }
        // glibc's malloc.h: M_TRIM_THRESHOLD = -1, M_MMAP_THRESHOLD = -3.
        const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
        const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
        // SAFETY: mallopt only changes allocator parameters; it takes no pointers.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 32 << 20);
            mallopt(M_TRIM_THRESHOLD, 1 << 30);
        }
    }
}

/// Makes every thread allocate from glibc's main arena (`mallopt(M_ARENA_MAX, 1)`), for the
/// rest of the process; call it before any thread starts. A thread other than the first gets an
/// arena of its own, made of 64 MiB mappings that glibc unmaps as soon as one is entirely free,
/// whatever the trim threshold ([`retain_freed_heap`]). A training step runs on a pool worker
/// (DESIGN §7.12), so its large temporaries came from such mappings, each step afresh, and
/// paid the page faults, zeroing and TLB shootdowns again: `bench train` (decay, bf16 products,
/// three alternating pairs) took 405–494 ms a step with per-thread arenas and 404–412 ms with
/// one, at 40 MiB less peak memory. Inference allocates little on its threads and measured the
/// same either way (`bench decode`, native). A no-op where the C library is not glibc.
pub fn single_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
        }
        // glibc's malloc.h: M_ARENA_MAX = -8.
        const M_ARENA_MAX: std::ffi::c_int = -8;
        // SAFETY: mallopt only changes allocator parameters; it takes no pointers.
        unsafe {
            mallopt(M_ARENA_MAX, 1);
        }
    }
}

/// Returns the heap's free memory to the operating system (glibc's `malloc_trim`), so that
/// buffers a start-up measurement allocated and freed do not stay resident beside the ones the
/// real work allocates next. A no-op where the C library is not glibc.
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: malloc_trim only unmaps free heap pages; it takes no pointers.
        unsafe {
            malloc_trim(0);
        }
    }
}
