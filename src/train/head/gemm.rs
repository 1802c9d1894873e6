//! Plain-slice access to candle tensors and the `gemm` call the head's products go through.

use candle_core::{DType, Storage, Tensor};

use super::HeadError;

/// A read view of a contiguous CPU f32 tensor.
pub(super) struct F32View<'a> {
    guard: candle_core::StorageRef<'a>,
    start: usize,
    len: usize,
}

impl<'a> F32View<'a> {
    pub(super) fn new(t: &'a Tensor, what: &'static str) -> Result<Self, HeadError> {
        let bad = || HeadError::NotCpuF32 {
            what,
            dtype: t.dtype(),
            device: format!("{:?}", t.device()),
        };
        if t.dtype() != DType::F32 || !t.device().is_cpu() {
            return Err(bad());
        }
        let (guard, layout) = t.storage_and_layout();
        if !layout.is_contiguous() {
            return Err(HeadError::Shape {
                what,
                got: t.dims().to_vec(),
                expected: "a contiguous tensor (call .contiguous()? first)".into(),
            });
        }
        let start = layout.start_offset();
        let len = t.elem_count();
        match &*guard {
            Storage::Cpu(cpu) => {
                if cpu.as_slice::<f32>()?.len() < start + len {
                    return Err(bad());
                }
            }
            _ => return Err(bad()),
        }
        Ok(F32View { guard, start, len })
    }

    pub(super) fn slice(&self) -> &[f32] {
        match &*self.guard {
            Storage::Cpu(cpu) => match cpu.as_slice::<f32>() {
                Ok(s) => &s[self.start..self.start + self.len],
                Err(_) => &[],
            },
            _ => &[],
        }
    }
}

pub(super) fn dims2(
    t: &Tensor,
    what: &'static str,
    expected: &str,
) -> Result<(usize, usize), HeadError> {
    t.dims2().map_err(|_| HeadError::Shape {
        what,
        got: t.dims().to_vec(),
        expected: expected.into(),
    })
}

/// A strided read-only matrix operand for [`gemm_f32`].
#[derive(Clone, Copy)]
pub(super) struct Mat<'a> {
    data: &'a [f32],
    /// Row and column strides in elements.
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    pub(super) fn new(data: &'a [f32], rs: usize, cs: usize) -> Self {
        Mat { data, rs, cs }
    }
}

/// dst (m × n, row stride `dst_rs`, unit column stride) = [dst +] lhs (m × k) · rhs (k × n).
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat<'_>,
    rhs: Mat<'_>,
) -> Result<(), HeadError> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let span =
        |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs + 1;
    if span(m, n, dst_rs, 1) > dst.len() {
        return Err(internal_shape(
            "gemm destination",
            dst.len(),
            span(m, n, dst_rs, 1),
        ));
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(0.0);
            }
        }
        return Ok(());
    }
    if span(m, k, lhs.rs, lhs.cs) > lhs.data.len() {
        return Err(internal_shape(
            "gemm lhs",
            lhs.data.len(),
            span(m, k, lhs.rs, lhs.cs),
        ));
    }
    if span(k, n, rhs.rs, rhs.cs) > rhs.data.len() {
        return Err(internal_shape(
            "gemm rhs",
            rhs.data.len(),
            span(k, n, rhs.rs, rhs.cs),
        ));
    }
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the spans above keep every index the kernel touches inside the three slices, and
    // dst is borrowed mutably, so it does not alias lhs or rhs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

fn internal_shape(what: &'static str, got: usize, needed: usize) -> HeadError {
    HeadError::Shape {
        what,
        got: vec![got],
        expected: format!("at least {needed} elements"),
    }
}
