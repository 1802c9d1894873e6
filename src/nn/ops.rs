//! Differentiable tensor ops for the drafters' training path.
//!
//! candle's fused CPU kernels `candle_nn::ops::rms_norm`, `softmax_last_dim`,
//! `rotary_emb::rope` (and flash attention) are custom ops without a backward pass: a loss built on
//! them backpropagates to nothing upstream, silently. These are the same functions composed from
//! primitive ops that all have gradients. Inference may keep using the fused kernels; the forward
//! values agree to float rounding (see the tests).
//!
//! All functions work in the input dtype (f32 for training, f64 for gradient checks).

use candle_core::{Result, Tensor, D};

/// Additive attention bias for a masked key: large and finite, so that a row whose keys are all
/// masked (a padding block) yields uniform weights instead of NaN.
pub const MASKED_BIAS: f32 = -1e9;

/// RMSNorm: x / sqrt(mean(x², last dim) + eps) · weight.
///
/// x (..., D), weight (D).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let hidden = x.dim(D::Minus1)?;
    let w_len = weight.dims1()?;
    if w_len != hidden {
        candle_core::bail!("rms_norm: weight has {w_len} elements but x has last dim {hidden}");
    }
    // (..., 1)
    let inv_rms = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv_rms)?.broadcast_mul(weight)
}

/// Softmax over the last dimension, stabilised by subtracting the (detached) row maximum: the
/// maximum cancels out of the softmax, so it needs no gradient.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// A bias-free linear layer x·wᵀ whose product runs in the compute dtype of w's device
/// ([`super::device::compute_dtype_for`]: bf16 on CUDA, f32 on the CPU), with the result in x's
/// dtype. w stays the f32 master weight; the casts have gradients, so autograd reaches it in f32.
/// On the CPU this is exactly `x.matmul(&w.t())` in the inputs' dtype (no cast happens).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if w.device().is_cpu() {
        // The inputs' own dtype: f32 in training, f64 in the gradient checks.
        return x.matmul(&w.t()?);
    }
    linear_in(x, w, super::device::compute_dtype_for(w.device()))
}

/// [`linear`] at a precision: `Bf16` on the CPU runs the product and its two gradient products
/// on AVX512-BF16 ([`super::bf16::matmul`]; x (..., in) is flattened to rows); `F32`, or any
/// other device, is [`linear`]. The caller checks [`super::Precision::runs_here`] first.
pub fn linear_at(x: &Tensor, w: &Tensor, precision: super::Precision) -> Result<Tensor> {
    if precision.is_f32() || !w.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
        return linear(x, w);
    }
    let dims = x.dims().to_vec();
    let k = *dims.last().ok_or_else(|| candle_core::Error::Msg("linear: x is a scalar".into()))?;
    let rows = x.elem_count() / k.max(1);
    let y = super::bf16::matmul(&x.reshape((rows, k))?, &w.t()?)?;
    let mut out = dims;
    *out.last_mut().expect("non-empty") = w.dim(0)?;
    y.reshape(out)
}

/// [`linear`] with the product in `dtype` (tests run the bf16 product on the CPU with it).
pub fn linear_in(x: &Tensor, w: &Tensor, dtype: candle_core::DType) -> Result<Tensor> {
    if x.dtype() == dtype && w.dtype() == dtype {
        return x.matmul(&w.t()?);
    }
    x.to_dtype(dtype)?.matmul(&w.to_dtype(dtype)?.t()?)?.to_dtype(x.dtype())
}

/// SiLU x·σ(x); candle's unary silu has a backward, so this is it.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

/// Rotary position embedding, HF "rotate half" convention (non-interleaved):
/// out = [x₁·cos − x₂·sin, x₂·cos + x₁·sin] with x = [x₁, x₂] split at D/2.
///
/// x (B, heads, T, D); cos/sin (T', D/2) shared by the batch, or (B, T', D/2) for per-sequence
/// positions, with T' ≥ T (the first T rows are used).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, _heads, t, d) = x.dims4()?;
    if d % 2 != 0 {
        candle_core::bail!("rope: head dim {d} must be even");
    }
    let half = d / 2;
    let prepare = |c: &Tensor, what: &str| -> Result<Tensor> {
        match c.dims() {
            &[tc, hc] if hc == half && tc >= t => c.narrow(0, 0, t)?.reshape((1, 1, t, half)),
            &[bc, tc, hc] if bc == b && hc == half && tc >= t => c.narrow(1, 0, t)?.reshape((b, 1, t, half)),
            other => candle_core::bail!(
                "rope: {what} has shape {other:?}; expected ({t}+, {half}) or ({b}, {t}+, {half}) for x {:?}",
                x.dims()
            ),
        }
    };
    let cos = prepare(cos, "cos")?;
    let sin = prepare(sin, "sin")?;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let o1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let o2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Tensor::cat(&[&o1, &o2], D::Minus1)
}

/// (B, H_kv, T, D) → (B, H_kv·n_rep, T, D), each key/value head repeated for its query group.
pub fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, h, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, h, n_rep, t, d))?
        .reshape((b, h * n_rep, t, d))
}

/// Scaled dot-product attention with grouped-query heads and an additive mask.
///
/// q (B, H_q, T_q, D); k, v (B, H_kv, T_k, D) with H_q a multiple of H_kv; `mask_bias` broadcastable
/// to (B, H_q, T_q, T_k), 0 where a query may attend and [`MASKED_BIAS`] where it may not. Returns
/// (B, H_q, T_q, D). Scores are scaled by 1/√D.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask_bias: Option<&Tensor>) -> Result<Tensor> {
    let (b, hq, _tq, d) = q.dims4()?;
    let (bk, hkv, tk, dk) = k.dims4()?;
    if bk != b || dk != d || hkv == 0 || hq % hkv != 0 || v.dims4()? != (b, hkv, tk, d) {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} do not fit (B, H_q, T_q, D) / (B, H_kv, T_k, D) with H_q % H_kv = 0",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let n_rep = hq / hkv;
    let k = repeat_kv(k, n_rep)?;
    let v = repeat_kv(v, n_rep)?;
    // (B, H_q, T_q, T_k)
    let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?;
    let scores = match mask_bias {
        Some(m) => scores.broadcast_add(&m.to_dtype(scores.dtype())?)?,
        None => scores,
    };
    softmax_last_dim(&scores)?.matmul(&v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_is_the_plain_product_on_the_cpu_and_bf16_keeps_f32_master_gradients() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let x = rand(&mut rng, &[5, 32], DType::F32);
        let w = Var::from_tensor(&rand(&mut rng, &[12, 32], DType::F32)).unwrap();
        let plain = x.matmul(&w.as_tensor().t().unwrap()).unwrap();
        let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect::<Vec<_>>();
        assert_eq!(bits(&linear(&x, w.as_tensor()).unwrap()), bits(&plain), "the CPU computes in f32, unchanged");
        // The bf16 product (what CUDA runs): close to f32, result and gradient in f32.
        let y = linear_in(&x, w.as_tensor(), DType::BF16).unwrap();
        assert_eq!(y.dtype(), DType::F32);
        let d = max_diff(&y, &plain);
        assert!(d > 0.0 && d < 0.1, "bf16 product differs by {d}");
        let g16 = y.sum_all().unwrap().backward().unwrap();
        let g32 = plain.sum_all().unwrap().backward().unwrap();
        let (a, b) = (g16.get(w.as_tensor()).unwrap(), g32.get(w.as_tensor()).unwrap());
        assert_eq!(a.dtype(), DType::F32, "the master weight's gradient is f32");
        let dg = max_diff(a, b);
        assert!(dg < 0.05, "bf16 gradient differs by {dg}");
    }
    use candle_core::{DType, Device, Var};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn rand(rng: &mut ChaCha8Rng, shape: &[usize], dtype: DType) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Σ r ⊙ f(x) with a fixed random r: a scalar whose gradient exercises every output element.
    fn probe(out: &Tensor, seed: u64) -> Tensor {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let r = rand(&mut rng, out.dims(), out.dtype());
        (out * r).unwrap().sum_all().unwrap()
    }

    /// Central finite differences of `loss` at a few coordinates of `inputs[which]` (f64), compared
    /// with the autograd gradient; also checks that the gradient is not identically zero.
    fn check_grad(inputs: &[Tensor], which: usize, loss: impl Fn(&[Tensor]) -> Tensor) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let grads = loss(&ts).backward().unwrap();
        let g = grads
            .get(vars[which].as_tensor())
            .expect("no gradient reached the input: the op dropped it")
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert!(
            g.iter().any(|&x| x.abs() > 1e-8),
            "gradient is identically zero"
        );
        let base: Vec<f64> = inputs[which].flatten_all().unwrap().to_vec1().unwrap();
        let eps = 1e-6;
        let n = base.len();
        for idx in [0, n / 3, n / 2, n - 1] {
            let at = |delta: f64| {
                let mut x = base.clone();
                x[idx] += delta;
                let mut ins = inputs.to_vec();
                ins[which] = Tensor::from_vec(x, inputs[which].dims(), &Device::Cpu).unwrap();
                loss(&ins).to_scalar::<f64>().unwrap()
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            assert!(
                (fd - g[idx]).abs() < 1e-6 * (1.0 + fd.abs()),
                "input {which} index {idx}: fd {fd} vs autograd {}",
                g[idx]
            );
        }
    }

    #[test]
    fn rms_norm_matches_the_fused_kernel_and_its_gradient_matches_finite_differences() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let x = rand(&mut rng, &[2, 5, 64], DType::F32);
        let w = rand(&mut rng, &[64], DType::F32);
        let ours = rms_norm(&x, &w, 1e-6).unwrap();
        let fused = candle_nn::ops::rms_norm(&x, &w, 1e-6).unwrap();
        let diff = max_diff(&ours, &fused);
        println!("rms_norm forward max |Δ| = {diff:e}");
        assert!(diff < 1e-5);
        let x64 = rand(&mut rng, &[3, 16], DType::F64);
        let w64 = rand(&mut rng, &[16], DType::F64);
        for which in 0..2 {
            check_grad(&[x64.clone(), w64.clone()], which, |t| {
                probe(&rms_norm(&t[0], &t[1], 1e-6).unwrap(), 9)
            });
        }
    }

    #[test]
    fn softmax_matches_the_fused_kernel_and_its_gradient_is_analytic() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let x = (rand(&mut rng, &[3, 4, 50], DType::F32) * 20.0).unwrap();
        let diff = max_diff(
            &softmax_last_dim(&x).unwrap(),
            &candle_nn::ops::softmax_last_dim(&x).unwrap(),
        );
        println!("softmax forward max |Δ| = {diff:e}");
        assert!(diff < 1e-6);
        // d/dx Σ r⊙s = s ⊙ (r − Σ s⊙r).
        let x64 = rand(&mut rng, &[4, 9], DType::F64);
        let r = rand(&mut rng, &[4, 9], DType::F64);
        let xv = Var::from_tensor(&x64).unwrap();
        let s = softmax_last_dim(xv.as_tensor()).unwrap();
        let g = (&s * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let got = g.get(xv.as_tensor()).unwrap();
        let sr = (&s * &r).unwrap().sum_keepdim(D::Minus1).unwrap();
        let want = (&s * r.broadcast_sub(&sr).unwrap()).unwrap();
        assert!(max_diff(got, &want) < 1e-12);
        check_grad(&[x64], 0, |t| probe(&softmax_last_dim(&t[0]).unwrap(), 3));
    }

    #[test]
    fn softmax_of_a_fully_masked_row_is_uniform_not_nan() {
        let x = Tensor::new(
            &[
                [MASKED_BIAS, MASKED_BIAS, MASKED_BIAS],
                [0.0, MASKED_BIAS, 1.0],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let s: Vec<Vec<f32>> = softmax_last_dim(&x).unwrap().to_vec2().unwrap();
        assert!(s[0].iter().all(|&p| (p - 1.0 / 3.0).abs() < 1e-6));
        assert_eq!(s[1][1], 0.0);
    }

    #[test]
    fn silu_gradient_is_analytic() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let x = (rand(&mut rng, &[40], DType::F64) * 6.0).unwrap();
        let xv = Var::from_tensor(&x).unwrap();
        let y = silu(xv.as_tensor()).unwrap();
        let sig = (x.neg().unwrap().exp().unwrap() + 1.0)
            .unwrap()
            .recip()
            .unwrap();
        assert!(max_diff(&y, &(&x * &sig).unwrap()) < 1e-12);
        let g = y.sum_all().unwrap().backward().unwrap();
        // σ(x)·(1 + x·(1 − σ(x)))
        let want =
            (&sig * ((&x * (sig.affine(-1.0, 1.0).unwrap())).unwrap() + 1.0).unwrap()).unwrap();
        assert!(max_diff(g.get(xv.as_tensor()).unwrap(), &want) < 1e-12);
        check_grad(&[x], 0, |t| probe(&silu(&t[0]).unwrap(), 4));
    }

    fn cos_sin(rng: &mut ChaCha8Rng, shape: &[usize]) -> (Tensor, Tensor) {
        let theta = (rand(rng, shape, DType::F64) * 3.0).unwrap();
        (theta.cos().unwrap(), theta.sin().unwrap())
    }

    #[test]
    fn rope_matches_the_fused_kernel_for_shared_and_per_sequence_positions() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let x = rand(&mut rng, &[2, 3, 7, 8], DType::F32);
        let (cos, sin) = cos_sin(&mut rng, &[7, 4]);
        let (cos, sin) = (
            cos.to_dtype(DType::F32).unwrap(),
            sin.to_dtype(DType::F32).unwrap(),
        );
        let diff = max_diff(
            &rope(&x, &cos, &sin).unwrap(),
            &candle_nn::rotary_emb::rope(&x, &cos, &sin).unwrap(),
        );
        println!("rope (T, D/2) forward max |Δ| = {diff:e}");
        assert!(diff < 1e-6);
        let (cb, sb) = cos_sin(&mut rng, &[2, 7, 4]);
        let (cb, sb) = (
            cb.to_dtype(DType::F32).unwrap(),
            sb.to_dtype(DType::F32).unwrap(),
        );
        let diff = max_diff(
            &rope(&x, &cb, &sb).unwrap(),
            &candle_nn::rotary_emb::rope(&x, &cb, &sb).unwrap(),
        );
        println!("rope (B, T, D/2) forward max |Δ| = {diff:e}");
        assert!(diff < 1e-6);
        // Longer tables are cut to T, as position tables usually are.
        let (cl, sl) = cos_sin(&mut rng, &[20, 4]);
        let xl = rand(&mut rng, &[1, 2, 5, 8], DType::F64);
        let want = rope(
            &xl,
            &cl.narrow(0, 0, 5).unwrap(),
            &sl.narrow(0, 0, 5).unwrap(),
        )
        .unwrap();
        assert!(max_diff(&rope(&xl, &cl, &sl).unwrap(), &want) < 1e-15);
        assert!(rope(
            &xl,
            &cl.narrow(0, 0, 4).unwrap(),
            &sl.narrow(0, 0, 4).unwrap()
        )
        .is_err());
    }

    #[test]
    fn rope_gradient_matches_finite_differences() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let x = rand(&mut rng, &[2, 2, 5, 6], DType::F64);
        let (cos, sin) = cos_sin(&mut rng, &[2, 5, 3]);
        check_grad(&[x], 0, |t| probe(&rope(&t[0], &cos, &sin).unwrap(), 6));
    }

    /// Attention written with loops over plain vectors.
    #[allow(clippy::too_many_arguments)]
    fn naive_attention(
        q: &[f64],
        k: &[f64],
        v: &[f64],
        mask: &[f64],
        b: usize,
        hq: usize,
        hkv: usize,
        tq: usize,
        tk: usize,
        d: usize,
    ) -> Vec<f64> {
        let mut out = vec![0.0; b * hq * tq * d];
        let group = hq / hkv;
        for bi in 0..b {
            for h in 0..hq {
                let kh = h / group;
                for i in 0..tq {
                    let qrow = &q[((bi * hq + h) * tq + i) * d..][..d];
                    let scores: Vec<f64> = (0..tk)
                        .map(|j| {
                            let krow = &k[((bi * hkv + kh) * tk + j) * d..][..d];
                            let dot: f64 = qrow.iter().zip(krow).map(|(a, b)| a * b).sum();
                            dot / (d as f64).sqrt() + mask[(bi * tq + i) * tk + j]
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for j in 0..tk {
                        let vrow = &v[((bi * hkv + kh) * tk + j) * d..][..d];
                        for c in 0..d {
                            out[((bi * hq + h) * tq + i) * d + c] += e[j] / z * vrow[c];
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn grouped_query_attention_matches_a_loop_reference_and_its_gradients_match_finite_differences()
    {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let (b, hq, hkv, tq, tk, d) = (2, 4, 2, 3, 5, 4);
        let q = rand(&mut rng, &[b, hq, tq, d], DType::F64);
        let k = rand(&mut rng, &[b, hkv, tk, d], DType::F64);
        let v = rand(&mut rng, &[b, hkv, tk, d], DType::F64);
        // Query i of batch bi may not see key j when (i + j + bi) % 3 == 0: a mixed mask.
        let mask: Vec<f64> = (0..b * tq * tk)
            .map(|n| {
                let (bi, i, j) = (n / (tq * tk), (n / tk) % tq, n % tk);
                if (i + j + bi) % 3 == 0 {
                    MASKED_BIAS as f64
                } else {
                    0.0
                }
            })
            .collect();
        let mask_t = Tensor::from_vec(mask.clone(), (b, 1, tq, tk), &Device::Cpu).unwrap();
        let got = attention(&q, &k, &v, Some(&mask_t)).unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let want = naive_attention(
            &flat(&q),
            &flat(&k),
            &flat(&v),
            &mask,
            b,
            hq,
            hkv,
            tq,
            tk,
            d,
        );
        let want = Tensor::from_vec(want, (b, hq, tq, d), &Device::Cpu).unwrap();
        let diff = max_diff(&got, &want);
        println!("attention forward max |Δ| vs loops = {diff:e}");
        assert!(diff < 1e-12);
        for which in 0..3 {
            check_grad(&[q.clone(), k.clone(), v.clone()], which, |t| {
                probe(&attention(&t[0], &t[1], &t[2], Some(&mask_t)).unwrap(), 7)
            });
        }
        // f32 with the mask in f32 works too.
        let q32 = q.to_dtype(DType::F32).unwrap();
        let k32 = k.to_dtype(DType::F32).unwrap();
        let v32 = v.to_dtype(DType::F32).unwrap();
        let m32 = mask_t.to_dtype(DType::F32).unwrap();
        assert!(max_diff(&attention(&q32, &k32, &v32, Some(&m32)).unwrap(), &want) < 1e-5);
    }

    #[test]
    fn gradients_flow_through_these_ops_where_the_fused_kernels_drop_them() {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let x = Var::from_tensor(&rand(&mut rng, &[1, 2, 4, 8], DType::F32)).unwrap();
        let w = rand(&mut rng, &[8], DType::F32);
        let (cos, sin) = cos_sin(&mut rng, &[4, 4]);
        let (cos, sin) = (
            cos.to_dtype(DType::F32).unwrap(),
            sin.to_dtype(DType::F32).unwrap(),
        );
        let xt = x.as_tensor();
        let reaches = |out: Tensor| {
            let g = probe(&out, 1).backward().unwrap();
            g.get(xt)
                .map(|g| {
                    g.abs()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                        > 0.0
                })
                .unwrap_or(false)
        };
        assert!(reaches(rms_norm(xt, &w, 1e-6).unwrap()));
        assert!(reaches(softmax_last_dim(xt).unwrap()));
        assert!(reaches(rope(xt, &cos, &sin).unwrap()));
        assert!(reaches(silu(xt).unwrap()));
        assert!(reaches(attention(xt, xt, xt, None).unwrap()));
        // The motivation: candle 0.11's fused kernels have no backward.
        assert!(!reaches(candle_nn::ops::rms_norm(xt, &w, 1e-6).unwrap()));
        assert!(!reaches(candle_nn::ops::softmax_last_dim(xt).unwrap()));
        assert!(!reaches(
            candle_nn::rotary_emb::rope(xt, &cos, &sin).unwrap()
        ));
    }
}
