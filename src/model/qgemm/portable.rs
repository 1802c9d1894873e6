//! The reference kernel: the integer dot as a plain sum, then the same fma sequence as the
//! SIMD kernels, so it gives the same bits.

use super::{f16_at, Format, TileJob, BLOCK, TILE};

// Indices o (output lane) and j (input in a lane) mirror the layout; iterators would hide it.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn tile_generic(job: &TileJob) {
    let (a, f) = (job.acts, job.format);
    for i in 0..job.rows {
        let r = job.r0 + i;
        let mut acc = [0f32; TILE];
        for b in 0..job.blocks {
            let w = &job.rec[f.weights_line(b)..][..f.block_lines()];
            let xq = &a.q[(r * a.blocks + b) * BLOCK..][..BLOCK];
            let (dx, sx) = (a.d[r * a.blocks + b], a.sx[r * a.blocks + b]);
            let mut isum = [0i32; TILE];
            for (k, xk) in xq.chunks_exact(4).enumerate() {
                for o in 0..TILE {
                    for j in 0..4 {
                        let q = match f {
                            Format::Int8 => w[k].0[o * 4 + j] as i32 - 128,
                            Format::Q4_1 if k < 4 => (w[k].0[o * 4 + j] & 0x0f) as i32,
                            Format::Q4_1 => (w[k - 4].0[o * 4 + j] >> 4) as i32,
                        };
                        isum[o] += q * xk[j] as i32;
                    }
                }
            }
            let scales = &job.rec[f.scales_line(b)];
            for o in 0..TILE {
                acc[o] = (isum[o] as f32).mul_add(f16_at(scales, b % 2, o) * dx, acc[o]);
            }
            if f == Format::Q4_1 {
                let mins = &job.rec[f.mins_line(b)];
                for o in 0..TILE {
                    acc[o] = f16_at(mins, b % 2, o).mul_add(sx, acc[o]);
                }
            }
        }
        // SAFETY (caller): dst row i has `valid` writable elements.
        let dst = std::slice::from_raw_parts_mut(job.dst.add(i * job.ldy), job.valid);
        dst.copy_from_slice(&acc[..job.valid]);
    }
}

/// # Safety
/// `job.dst` rows 0..rows (stride ldy) have `valid` writable f32 each.
pub(super) unsafe fn tile(job: &TileJob) {
    tile_generic(job)
}
