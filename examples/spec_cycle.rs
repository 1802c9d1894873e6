//! Where the time of one speculative cycle goes: the target's verify forward, the drafter's
//! context extension, its block forward, its LM head, the verdict, the cache rollback, side by
//! side with one decode step, all at the same context and interleaved so machine load hits
//! every part alike. The "fast" rows are the inference path (`DFlashInfer`) in its default
//! precision (Q4_1 projections), beside f32 and int8 rows.
//!
//! cargo run --release --example spec_cycle -- DRAFTER_DIR [--weights q8|native|f32]
//!     [--context 256] [--block 8] [--rounds 30] [--ctx-rows 2] [--draft-vocab 8192]
//!
//! `--ctx-rows`: context rows appended per cycle (acc + 1 of the cycle before: τ).

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor};
use specauf::drafter::{AnyDrafter, DFlashDrafter, DFlashInfer, DrafterPrecision};
use specauf::model::{load_model, KvCache, Logits, WeightsMode};
use specauf::spec::sampling::argmax_rows;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |name: &str, default: &str| -> String {
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
    };
    let dir = PathBuf::from(args.first().ok_or_else(|| anyhow::anyhow!("usage: spec_cycle DRAFTER_DIR [options]"))?);
    let mode: WeightsMode = opt("--weights", "q8").parse().map_err(anyhow::Error::msg)?;
    let ctx: usize = opt("--context", "256").parse()?;
    let rounds: usize = opt("--rounds", "30").parse()?;
    let ctx_rows: usize = opt("--ctx-rows", "2").parse()?;
    let model = load_model("smollm2", mode)?;
    let target = &model.target;
    let mut any = AnyDrafter::load(&dir, target.config())?;
    if let Some(k) = args.iter().position(|a| a == "--draft-vocab").and_then(|i| args.get(i + 1)) {
        any.set_draft_vocab_size(k.parse()?);
    }
    let b: usize = opt("--block", &any.block_size().to_string()).parse()?;
    let drafter: DFlashDrafter = match any.at_block_size(b)? {
        AnyDrafter::DFlash(d) => d,
        _ => anyhow::bail!("spec_cycle profiles DFlash drafters"),
    };
    let taps = drafter.target_layer_ids().to_vec();
    let text = "The quick brown fox jumps over the lazy dog while the cat watches from the window. ";
    let mut prompt = Vec::new();
    while prompt.len() < ctx {
        prompt.extend(model.tokenizer.encode(text, false)?);
    }
    prompt.truncate(ctx);
    let mut cache = target.new_cache();
    let out = target.forward(&prompt, &mut cache, &taps, Logits::Last)?;
    let feats = Tensor::cat(&out.taps, 1)?;
    let mut dcache = drafter.new_cache();
    drafter.extend_context(&mut dcache, &feats)?;
    let block: Vec<u32> = prompt[..b].to_vec();
    let infer = DFlashInfer::new(&drafter)?;
    let mut fcache = infer.new_cache();
    let infer32 = DFlashInfer::with_precision(&drafter, DrafterPrecision::F32)?;
    infer.extend_context(&mut fcache, &feats.flatten_all()?.to_vec1::<f32>()?)?;
    let infer8 = DFlashInfer::with_precision(&drafter, DrafterPrecision::Int8)?;
    let mut fcache8 = infer8.new_cache();
    infer8.extend_context(&mut fcache8, &feats.flatten_all()?.to_vec1::<f32>()?)?;
    let small_rows = feats.narrow(0, 0, ctx_rows)?.flatten_all()?.to_vec1::<f32>()?;
    let names = ["decode step", "verify(B) + taps", "rollback", "verdict (argmax B rows)", "drafter extend ctx", "drafter block fwd", "drafter LM head + argmax", "drafter draft() total", "fast: extend ctx", "fast: block fwd", "fast: draft() total", "fast f32: block fwd", "fast f32: draft() total", "fast, draft vocab: draft() total", "after a verify: draft (vocab)", "after a verify, head warmed: draft (vocab)", "int8 layers, after a verify: draft (vocab)"];
    let mut t = vec![Vec::new(); names.len()];
    let small_feats = feats.narrow(0, 0, ctx_rows)?;
    // The draft vocabulary of the drafter's folder (draft_vocab.json), over the prompt's tokens too.
    let mut vocab_head = match drafter.draft_ids() {
        Some(ids) => specauf::drafter::DraftHead::new(target, ids)?,
        None => None,
    };
    if let Some(h) = &mut vocab_head {
        h.observe(&prompt);
    }
    // `--part verify|draft`: loop only that part (for `perf record`).
    let part = opt("--part", "");
    if !part.is_empty() {
        for _ in 0..rounds {
            if part == "verify" {
                target.forward(&block, &mut cache, &taps, Logits::All)?;
                cache.truncate(ctx);
            } else if part == "fast" {
                infer.draft_in(target, &mut fcache, block[0], ctx, vocab_head.as_mut())?;
            } else {
                drafter.draft(target, &dcache, block[0], ctx)?;
            }
        }
        return Ok(());
    }
    for _ in 0..rounds {
        let t0 = Instant::now();
        target.forward(&block[..1], &mut cache, &[], Logits::Last)?;
        t[0].push(ms(t0));
        cache.truncate(ctx);
        let t0 = Instant::now();
        let v = target.forward(&block, &mut cache, &taps, Logits::All)?;
        let _f = Tensor::cat(&v.taps, 1)?;
        t[1].push(ms(t0));
        let t0 = Instant::now();
        cache.truncate(ctx);
        t[2].push(ms(t0));
        let logits = v.logits.ok_or_else(|| anyhow::anyhow!("no logits"))?;
        let t0 = Instant::now();
        let _best = argmax_rows(&logits)?;
        t[3].push(ms(t0));
        let mut dc = dcache.clone();
        let t0 = Instant::now();
        drafter.extend_context(&mut dc, &small_feats)?;
        t[4].push(ms(t0));
        let ids = drafter.block_ids(&[block[0]]);
        let t0 = Instant::now();
        let hidden = drafter.forward_block(target, &dcache, &ids, ctx)?;
        t[5].push(ms(t0));
        let t0 = Instant::now();
        let l = target.lm_head(&hidden.narrow(0, 1, b - 1)?)?;
        let _d = argmax_rows(&l)?;
        t[6].push(ms(t0));
        let t0 = Instant::now();
        drafter.draft(target, &dcache, block[0], ctx)?;
        t[7].push(ms(t0));
        let mut fc = fcache.clone();
        let t0 = Instant::now();
        infer.extend_context(&mut fc, &small_rows)?;
        t[8].push(ms(t0));
        let t0 = Instant::now();
        infer.forward_block(target, &mut fcache, block[0], ctx)?;
        t[9].push(ms(t0));
        let t0 = Instant::now();
        infer.draft(target, &mut fcache, block[0], ctx)?;
        t[10].push(ms(t0));
        let t0 = Instant::now();
        infer32.forward_block(target, &mut fcache, block[0], ctx)?;
        t[11].push(ms(t0));
        let t0 = Instant::now();
        infer32.draft(target, &mut fcache, block[0], ctx)?;
        t[12].push(ms(t0));
        if vocab_head.is_some() {
            let t0 = Instant::now();
            infer.draft_in(target, &mut fcache, block[0], ctx, vocab_head.as_mut())?;
            t[13].push(ms(t0));
            // A draft as the decode loop runs it: right after a verify forward has streamed the
            // target's weights through the caches; then the same with the draft head's rows
            // brought back into the caches first (what a head streamed last by the verify would
            // save); then with int8 layers.
            let mut after_verify = |infer: &DFlashInfer, fcache: &mut KvCache, warm: bool| -> anyhow::Result<f64> {
                target.forward(&block, &mut cache, &taps, Logits::All)?;
                cache.truncate(ctx);
                if let (true, Some(h)) = (warm, vocab_head.as_mut()) {
                    h.argmax(target, &vec![0.01f32; (b - 1) * target.config().hidden_size], b - 1)?;
                }
                let t0 = Instant::now();
                infer.draft_in(target, fcache, block[0], ctx, vocab_head.as_mut())?;
                Ok(ms(t0))
            };
            t[14].push(after_verify(&infer, &mut fcache, false)?);
            t[15].push(after_verify(&infer, &mut fcache, true)?);
            t[16].push(after_verify(&infer8, &mut fcache8, false)?);
        }
    }
    let dec = median(t[0].clone());
    println!("spec_cycle: {mode:?} weights, context {ctx}, B = {b}, {ctx_rows} context rows per cycle, {rounds} rounds, rayon threads {}, load {}", rayon::current_num_threads(), load());
    println!("| part | median ms | ÷ decode step |");
    println!("|---|---|---|");
    for (name, v) in names.iter().zip(t).filter(|(_, v)| !v.is_empty()) {
        let m = median(v);
        println!("| {name} | {m:.2} | {:.2} |", m / dec);
    }
    let _ = Device::Cpu;
    Ok(())
}
