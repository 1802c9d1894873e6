//! The public golden values of docs/DESIGN.md §6 for the embedded default (SmolLM2-135M
//! Instruct, Q4_1 GGUF): an f32 reference forward of the dequantized weights, HF conventions.
//! The asset is fetched on first use.

use candle_core::{DType, Tensor, D};
use specauf::model::{load_model, Logits, WeightsMode};
use specauf::spec::driver::{generate, GenerateConfig};

fn top(logits: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    idx[..k].iter().map(|&i| (i, logits[i])).collect()
}

#[test]
fn smollm2_f32_logits_match_the_public_golden_values() {
    let m = load_model("smollm2", WeightsMode::F32).expect("load the embedded default");
    let cases: [(&str, Vec<u32>, Vec<(usize, f32)>, Option<f32>); 2] = [
        ("The capital of France is", vec![504, 3575, 282, 4649, 314], vec![(7042, 17.371), (260, 14.889), (4528, 13.245)], Some(3.692)),
        ("def fibonacci(n):\n    ", vec![1604, 3987, 46477, 24, 94, 727, 2367], vec![(753, 21.81), (3987, 21.773)], None),
    ];
    for (text, ids, want, nll) in cases {
        assert_eq!(m.tokenizer.encode(text, true).unwrap(), ids, "tokenization of {text:?}");
        let mut cache = m.target.new_cache();
        let logits = m.target.forward(&ids, &mut cache, &[], Logits::All).unwrap().logits.unwrap();
        let last = logits.get(ids.len() - 1).unwrap().to_vec1::<f32>().unwrap();
        let got = top(&last, want.len());
        let mut max_d = 0f32;
        for ((gi, gl), (wi, wl)) in got.iter().zip(&want) {
            assert_eq!(gi, wi, "{text:?}: top tokens {got:?}, expected {want:?}");
            max_d = max_d.max((gl - wl).abs());
        }
        println!("{text:?}: top {got:?}; max |Δlogit| vs golden {max_d:.4}");
        assert!(max_d < 0.05, "{text:?}: logits {got:?} differ from the golden {want:?} by {max_d}");
        if let Some(nll) = nll {
            let got = mean_nll(&logits, &ids).unwrap();
            println!("{text:?}: mean prompt NLL {got:.4} (golden {nll})");
            assert!((got - nll).abs() < 0.01);
        }
    }
}

#[test]
fn smollm2_greedy_chat_answer_matches_the_golden_in_every_weights_mode() {
    // The golden chat ids are the user turn alone (no default system turn; see tests/tokenizer.rs).
    let ids = [1u32, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198];
    for mode in [WeightsMode::F32, WeightsMode::Q8] {
        let m = load_model("smollm2", mode).unwrap();
        let out = generate(&m.target, None, &ids, &GenerateConfig::greedy(&m.target, 24)).unwrap();
        let text = m.tokenizer.decode(&out.token_ids, false).unwrap();
        println!("{mode:?}: {text:?}");
        assert_eq!(text, "The capital of France is Paris.<|im_end|>", "{mode:?}");
    }
}

/// Mean next-token NLL of `ids` under `logits` (T, V): the quantity the published golden NLL is.
fn mean_nll(logits: &Tensor, ids: &[u32]) -> candle_core::Result<f32> {
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let logp = logp.to_vec2::<f32>()?;
    let n = ids.len();
    let mut total = 0.0;
    for i in 0..n - 1 {
        total -= logp[i][ids[i + 1] as usize];
    }
    Ok(total / (n - 1) as f32)
}
