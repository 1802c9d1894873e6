//! The generic path (DESIGN §7.11) against the CPU kernels, on the CPU: what CI can check of the
//! code a CUDA build runs. The generic path holds dequantized f32 weights, so it is compared with
//! the CPU kernels' `f32` mode (the same weight values, f32 activations). The default `q8` mode
//! quantizes activations to int8 per row, which the generic path deliberately does not do, so
//! its logits differ from both by the int8 rounding (about 1e-2 on these fixtures), not by a bug.

mod spec_support;

use candle_core::{DType, Tensor};
use spec_support::{prompt, reference_greedy, FAMILIES};
use specauf::model::{self, BatchItem, Logits, ModelLocation, Target, WeightsMode};
use specauf::nn::{Backend, DeviceSpec, Kernels};
use specauf::spec::{generate, GenerateConfig, OracleErrors, OracleProposer, Proposer, RandomProposer};

fn fixture(family: &str, backend: &Backend) -> Target {
    let _ = spec_support::target(family); // pins candle to one thread, as the other spec tests
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(family);
    model::load_target_on(&ModelLocation::from_path(&dir).unwrap(), WeightsMode::F32, backend).unwrap()
}

/// The generic path on the CPU, or on `SPECAUF_TEST_DEVICE` (e.g. `cuda`; tools/gpu/verify.sh
/// sets it), computing in f32 so that it compares with the CPU's f32 kernels.
fn generic() -> Backend {
    let device = match std::env::var("SPECAUF_TEST_DEVICE") {
        Ok(d) => d.parse::<DeviceSpec>().unwrap_or_else(|e| panic!("SPECAUF_TEST_DEVICE: {e}")),
        Err(_) => DeviceSpec::Cpu,
    };
    Backend::open(device, Kernels::Generic).unwrap().with_compute_dtype(DType::F32)
}

fn greedy(max_new_tokens: usize) -> GenerateConfig {
    GenerateConfig { max_new_tokens, temperature: 0.0, top_p: 1.0, seed: 0, eos_token_ids: vec![], accept_rule: Default::default() }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
}

#[test]
fn the_generic_path_gives_the_f32_kernels_greedy_output_and_close_logits() {
    for family in FAMILIES {
        let kernels = fixture(family, &Backend::cpu());
        let gen = fixture(family, &generic());
        assert!(kernels.backend().cpu_kernels() && !gen.backend().cpu_kernels());
        for salt in 0..3u32 {
            let p = prompt(5 + 4 * salt as usize, salt);
            let a = generate(&kernels, None, &p, &greedy(32)).unwrap().token_ids;
            let b = generate(&gen, None, &p, &greedy(32)).unwrap().token_ids;
            assert_eq!(a, b, "{family} prompt {salt}: generic greedy differs from the f32 kernels");
            // Logits of the whole continuation in one forward, both paths.
            let seq: Vec<u32> = p.iter().chain(&a).copied().collect();
            let fwd = |t: &Target| t.forward(&seq, &mut t.new_cache(), &[t.config().num_hidden_layers - 1], Logits::All).unwrap();
            let (x, y) = (fwd(&kernels), fwd(&gen));
            let d = max_diff(x.logits.as_ref().unwrap(), y.logits.as_ref().unwrap());
            let dt = max_diff(&x.taps[0], &y.taps[0]);
            println!("{family} prompt {salt}: max |Δlogit| generic vs f32 kernels {d:.2e}, taps {dt:.2e}");
            assert!(d < 1e-4 && dt < 1e-4, "{family}: generic logits differ by {d}, taps by {dt}");
        }
    }
}

#[test]
fn generic_rows_are_bit_identical_whether_verified_in_a_block_decoded_alone_or_batched() {
    for family in FAMILIES {
        let t = fixture(family, &generic());
        assert!(t.is_batch_invariant());
        let p = prompt(7, 1);
        let block: Vec<u32> = prompt(6, 9);
        // One forward of the whole block ...
        let mut c1 = t.new_cache();
        t.forward(&p, &mut c1, &[], Logits::None).unwrap();
        let together = t.forward(&block, &mut c1, &[0], Logits::All).unwrap();
        // ... against token-by-token steps.
        let mut c2 = t.new_cache();
        t.forward(&p, &mut c2, &[], Logits::None).unwrap();
        for (i, &tok) in block.iter().enumerate() {
            let one = t.forward(&[tok], &mut c2, &[0], Logits::All).unwrap();
            let row = together.logits.as_ref().unwrap().narrow(0, i, 1).unwrap();
            assert_eq!(bits(&row), bits(one.logits.as_ref().unwrap()), "{family}: verify row {i} differs from its decode step");
            assert_eq!(bits(&together.taps[0].narrow(0, i, 1).unwrap()), bits(&one.taps[0]), "{family}: tap row {i}");
        }
        // Several sequences in one forward_batch: each gets its lone forward's bits.
        let (pa, pb) = (prompt(3, 4), prompt(8, 5));
        let (mut ca, mut cb) = (t.new_cache(), t.new_cache());
        let outs = t
            .forward_batch(&mut [
                BatchItem { tokens: &pa, cache: &mut ca, taps: &[], logits: Logits::All },
                BatchItem { tokens: &pb, cache: &mut cb, taps: &[], logits: Logits::Last },
            ])
            .unwrap();
        let lone_a = t.forward(&pa, &mut t.new_cache(), &[], Logits::All).unwrap();
        let lone_b = t.forward(&pb, &mut t.new_cache(), &[], Logits::Last).unwrap();
        assert_eq!(bits(outs[0].logits.as_ref().unwrap()), bits(lone_a.logits.as_ref().unwrap()), "{family}: batch item 0");
        assert_eq!(bits(outs[1].logits.as_ref().unwrap()), bits(lone_b.logits.as_ref().unwrap()), "{family}: batch item 1");
    }
}

#[test]
fn speculative_decoding_at_t0_on_the_generic_path_equals_its_own_greedy_output() {
    let n = 24;
    for family in FAMILIES {
        let t = fixture(family, &generic());
        for (pi, plen) in [1usize, 6, 11].into_iter().enumerate() {
            let p = prompt(plen, pi as u32 + 3);
            let ar = generate(&t, None, &p, &greedy(n)).unwrap().token_ids;
            assert_eq!(ar, reference_greedy(&t, &p, n), "{family}: generic AR against the cache-free reference");
            for b in [2usize, 4, 8] {
                let mut proposers: Vec<(&str, Box<dyn Proposer>)> = vec![
                    ("random", Box::new(RandomProposer::uniform(b, 7 + pi as u64))),
                    ("oracle-30%", Box::new(OracleProposer::new(b, ar.clone(), OracleErrors::Rate { rate: 0.3, seed: 5 }))),
                ];
                for (name, prop) in proposers.iter_mut() {
                    let spec = generate(&t, Some(prop.as_mut()), &p, &greedy(n)).unwrap();
                    assert_eq!(spec.token_ids, ar, "{family} prompt {pi} B={b} {name}: speculative differs from AR");
                }
            }
        }
    }
}

#[test]
fn the_bf16_generic_path_runs_on_the_cpu_and_stays_close_to_f32() {
    // What a CUDA build computes in (bf16 matmuls, f32 residual stream), run here on the CPU.
    let bf16 = generic().with_compute_dtype(DType::BF16);
    for family in FAMILIES {
        let f = fixture(family, &generic());
        let h = fixture(family, &bf16);
        let p = prompt(9, 2);
        let fwd = |t: &Target| t.forward(&p, &mut t.new_cache(), &[], Logits::All).unwrap().logits.unwrap();
        let (a, b) = (fwd(&f), fwd(&h));
        let scale = a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let d = max_diff(&a, &b);
        println!("{family}: bf16 vs f32 generic logits: max |Δ| {d:.3e} of max |logit| {scale:.3}");
        assert!(d > 0.0, "{family}: bf16 gave f32's exact bits: the compute dtype did not take effect");
        assert!(d < 0.05 * scale.max(1.0), "{family}: bf16 logits differ by {d} (scale {scale})");
    }
}

#[test]
fn dflash_and_domino_drafters_on_the_generic_path_keep_t0_exactness() {
    use specauf::drafter::{AnyDrafter, DFlashInitConfig, DrafterInit, DrafterKind};
    let n = 16;
    let g = generic();
    for family in FAMILIES {
        let t = fixture(family, &g);
        let layers = t.config().num_hidden_layers;
        for kind in [DrafterKind::DFlash, DrafterKind::Domino] {
            let mut backbone = DFlashInitConfig::new(2, 4, 5);
            backbone.target_layer_ids = Some(vec![0, layers - 1]);
            let init = DrafterInit { kind, backbone, gru_hidden_dim: Some(8), emb_dim: Some(8) };
            let d = AnyDrafter::init_random(t.config(), &init, 3).unwrap().to_device(t.device()).unwrap();
            for (pi, plen) in [2usize, 9].into_iter().enumerate() {
                let p = prompt(plen, pi as u32 + 1);
                let ar = generate(&t, None, &p, &greedy(n)).unwrap().token_ids;
                let mut prop = d.proposer_on(t.backend());
                let spec = generate(&t, Some(&mut *prop as &mut dyn Proposer), &p, &greedy(n)).unwrap();
                assert_eq!(spec.token_ids, ar, "{family} {kind:?} prompt {pi}");
            }
        }
    }
}
