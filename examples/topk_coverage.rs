//! How often the target's next token is among the drafter's top k at each block position,
//! along the target's own greedy continuation of the bench's chat prompts (to its first EOS):
//! the acceptance a tree of k candidates per position would see, beside the chain's (k = 1).
//!
//! cargo run --release --example topk_coverage -- DRAFTER_DIR [--weights native] [--prompts 20]
//!     [--tokens 96] [--block 4] [--precision q4|int8|f32] [--head target|q4]
//!     [--costs 1,1.05,1.16,1.28] [--draft-cost 0.1]
//!
//! Then how well the drafter's confidence (its top-1 probability at a position) predicts
//! acceptance there, and what cutting each draft at its first position below a threshold would
//! give (llama.cpp's `--draft-p-min`): tokens a cycle, rows verified, and tokens per decode-step
//! of cycle cost, with verify(m) ÷ decode step from `--costs` (m = 1, 2, ...) and a draft's cost
//! from `--draft-cost`, both in decode steps.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use specauf::drafter::{AnyDrafter, DFlashInfer, DrafterPrecision};
use specauf::model::{load_model, Logits, WeightsMode};
use specauf::pipeline::spec_bench::chat_prompt_texts;
use specauf::spec::block_size::cut_stats;
use specauf::spec::sampling::argmax_rows;

const KS: [usize; 6] = [1, 2, 3, 4, 6, 8];

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |name: &str, default: &str| -> String {
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
    };
    let dir = PathBuf::from(args.first().ok_or_else(|| anyhow::anyhow!("usage: topk_coverage DRAFTER_DIR [options]"))?);
    let mode: WeightsMode = opt("--weights", "native").parse().map_err(anyhow::Error::msg)?;
    let n_prompts: usize = opt("--prompts", "20").parse()?;
    let tokens: usize = opt("--tokens", "96").parse()?;
    let model = load_model("smollm2", mode)?;
    let target = &model.target;
    let any = AnyDrafter::load(&dir, target.config())?;
    let b: usize = opt("--block", &any.block_size().to_string()).parse()?;
    let drafter = match any.at_block_size(b)? {
        AnyDrafter::DFlash(d) => d,
        _ => anyhow::bail!("topk_coverage reads DFlash drafters"),
    };
    let taps = drafter.target_layer_ids().to_vec();
    let eos = model.eos_token_ids();
    let precision = match opt("--precision", "int8").as_str() {
        "int8" => DrafterPrecision::Int8,
        "q4" => DrafterPrecision::Q4,
        "f32" => DrafterPrecision::F32,
        other => anyhow::bail!("--precision {other}: expected int8, q4 or f32"),
    };
    let infer = DFlashInfer::with_precision(&drafter, precision)?;
    // `--head q4`: the target's head rows requantized to Q4_1 (what a Q4_1 draft head would score).
    let (vocab, h) = (target.config().vocab_size, target.config().hidden_size);
    let q4_head = match opt("--head", "target").as_str() {
        "target" => None,
        "q4" => {
            let all: Vec<u32> = (0..vocab as u32).collect();
            let rows = target.head_rows(&all)?.ok_or_else(|| anyhow::anyhow!("the target's head has no block form"))?;
            let t = Tensor::from_vec(rows.dequantize(), (vocab, h), &Device::Cpu)?;
            let qt = candle_core::quantized::QTensor::quantize(&t, candle_core::quantized::GgmlDType::Q4_1)?;
            Some(specauf::model::qgemm::QMatrix::from_q4_1_bytes("head", &qt.data()?, vocab, h)?)
        }
        other => anyhow::bail!("--head {other}: expected target or q4"),
    };
    // hits[p][i]: the true token at block position p + 1 was within the drafter's top KS[i];
    // chain[p]: positions 1..=p + 1 all top-1 (what a chain accepts).
    let mut hits = vec![[0usize; KS.len()]; b - 1];
    let mut chain = vec![0usize; b - 1];
    let mut n = 0usize;
    // Per anchor: the drafter's top-1 probability at each position, and whether its top-1 was
    // the target's token there.
    let mut anchors: Vec<Vec<(f32, bool)>> = Vec::new();
    for text in chat_prompt_texts(&model, n_prompts)? {
        let prompt = model.tokenizer.encode(&text, false)?;
        let mut cache = target.new_cache();
        let out = target.forward(&prompt, &mut cache, &taps, Logits::Last)?;
        let mut dcache = infer.new_cache();
        infer.extend_context(&mut dcache, &Tensor::cat(&out.taps, 1)?.flatten_all()?.to_vec1::<f32>()?)?;
        let greedy = |logits: Option<Tensor>| -> anyhow::Result<u32> { Ok(argmax_rows(&logits.ok_or_else(|| anyhow::anyhow!("no logits"))?)?[0]) };
        let first = greedy(out.logits)?;
        // The target's greedy continuation up to its first EOS, with the features of every
        // position.
        let mut seq = vec![first];
        let mut feats = Vec::new();
        while seq.len() < tokens + b && !eos.contains(&seq[seq.len() - 1]) {
            let o = target.forward(&seq[seq.len() - 1..], &mut cache, &taps, Logits::Last)?;
            feats.push(Tensor::cat(&o.taps, 1)?.flatten_all()?.to_vec1::<f32>()?);
            seq.push(greedy(o.logits)?);
        }
        // At each anchor seq[t] (position prompt + t) whose block lies within the text, the
        // drafter sees the context before it.
        for t in 0..tokens.min(seq.len().saturating_sub(b - 1)) {
            let start = prompt.len() + t;
            let x = infer.forward_block(target, &mut dcache, seq[t], start)?;
            let rows = Tensor::from_slice(&x[h..], (b - 1, h), &Device::Cpu)?;
            let logits = match &q4_head {
                None => target.lm_head(&rows)?.to_vec2::<f32>()?,
                Some(q) => {
                    let mut y = vec![0f32; (b - 1) * vocab];
                    q.matmul(&x[h..], b - 1, &mut y)?;
                    y.chunks_exact(vocab).map(|r| r.to_vec()).collect()
                }
            };
            let mut all = true;
            let mut conf = Vec::with_capacity(b - 1);
            for (p, row) in logits.iter().enumerate() {
                let truth = seq[t + p + 1];
                let tv = row[truth as usize];
                let rank = row.iter().filter(|&&v| v > tv).count();
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f64 = row.iter().map(|&v| f64::from(v - max).exp()).sum();
                conf.push(((1.0 / sum) as f32, rank == 0));
                for (i, &k) in KS.iter().enumerate() {
                    hits[p][i] += usize::from(rank < k);
                }
                all &= rank == 0;
                chain[p] += usize::from(all);
            }
            anchors.push(conf);
            n += 1;
            infer.extend_context(&mut dcache, &feats[t])?;
        }
    }
    println!("topk_coverage: {n} anchors ({n_prompts} prompts, up to {tokens} each, to the first EOS), B = {b}, {mode:?} weights, drafter {precision:?}");
    println!("| block position | chain (all top-1 so far) | {} |", KS.iter().map(|k| format!("top-{k}")).collect::<Vec<_>>().join(" | "));
    println!("|---|---|{}", "---|".repeat(KS.len()));
    for p in 0..b - 1 {
        let cells: Vec<String> = hits[p].iter().map(|&h| format!("{:.3}", h as f64 / n as f64)).collect();
        println!("| {} | {:.3} | {} |", p + 1, chain[p] as f64 / n as f64, cells.join(" | "));
    }
    // Acceptance by confidence, where the chain reached the position.
    let edges = [0.0f32, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.01];
    println!("\nacceptance by the drafter's top-1 probability (anchors whose chain reached the position: accepted / reached)");
    println!("| position | {} |", edges.windows(2).map(|w| format!("[{:.2}, {:.2})", w[0], w[1].min(1.0))).collect::<Vec<_>>().join(" | "));
    println!("|---|{}", "---|".repeat(edges.len() - 1));
    for p in 0..b - 1 {
        let mut cells = Vec::new();
        for w in edges.windows(2) {
            let reached: Vec<&Vec<(f32, bool)>> = anchors.iter().filter(|a| a[..p].iter().all(|x| x.1) && a[p].0 >= w[0] && a[p].0 < w[1]).collect();
            let acc = reached.iter().filter(|a| a[p].1).count();
            cells.push(format!("{acc}/{} ({:.2})", reached.len(), acc as f64 / reached.len().max(1) as f64));
        }
        println!("| {} | {} |", p + 1, cells.join(" | "));
    }
    let costs: Vec<f64> = opt("--costs", "1,1.05,1.16,1.28").split(',').map(|c| c.trim().parse()).collect::<Result<_, _>>()?;
    let draft_cost: f64 = opt("--draft-cost", "0.1").parse()?;
    anyhow::ensure!(costs.len() >= b, "--costs needs verify(m) for m = 1..={b}");
    println!("\ndrafts cut at the first position below p_min (cost in decode steps: verify {costs:?}, draft {draft_cost})");
    println!("| max rows | p_min | tokens a cycle | rows verified | cycles without drafts | tokens per decode step of cost |");
    println!("|---|---|---|---|---|---|");
    for c in cut_stats(&anchors, b) {
        let rows: f64 = c.rows.iter().enumerate().map(|(m, share)| (m + 1) as f64 * share).sum();
        let cost: f64 = c.rows.iter().zip(&costs).map(|(share, v)| share * v).sum::<f64>() + draft_cost;
        println!("| {} | {:.2} | {:.3} | {:.2} | {:.0}% | {:.3} |", c.block_size, c.p_min, c.tokens, rows, 100.0 * c.rows[0], c.tokens / cost);
    }
    Ok(())
}
