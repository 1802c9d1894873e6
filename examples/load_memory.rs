//! Resident memory after each loading phase: the target, the tokenizer, a drafter and its
//! inference path (VmRSS and the high-water mark VmHWM from /proc/self/status, Linux).
//!
//! cargo run --release --example load_memory -- [q8|native|f32] [DRAFTER_DIR [choose]]
//!
//! `choose`: choose the block size from measurement first, as `generate --drafter` does without
//! `--block-size`.
//!
//! Where the peak of a `generate --drafter` process comes from; see the README's speed section
//! for the whole-process figures beside llama.cpp's.

use specauf::model::{load_target, WeightsMode};
fn st(tag: &str) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let g = |k: &str| s.lines().find(|l| l.starts_with(k)).unwrap().split_whitespace().nth(1).unwrap().parse::<f64>().unwrap() / 1024.0;
    println!("{tag:>20}: rss {:.0} MiB  hwm {:.0} MiB", g("VmRSS:"), g("VmHWM:"));
}
fn main() -> anyhow::Result<()> {
    st("start");
    let loc = specauf::model::load::resolve("smollm2")?;
    st("resolved");
    let mode: WeightsMode = std::env::args().nth(1).unwrap_or("q8".into()).parse().map_err(anyhow::Error::msg)?;
    let t = load_target(&loc, mode)?;
    st("target loaded");
    let (_, _, c) = specauf::model::open(&loc)?;
    st("gguf reopened");
    let tok = specauf::tokenizer::Tokenizer::from_gguf(c.as_ref().unwrap())?;
    st("tokenizer");
    if let Some(dir) = std::env::args().nth(2) {
        let mut d = specauf::drafter::AnyDrafter::load_for(std::path::Path::new(&dir), &t)?;
        st("drafter f32");
        if std::env::args().nth(3).as_deref() == Some("choose") {
            let (chosen, c) = specauf::drafter::block_choice::choose_for(&t, d, std::path::Path::new(&dir), None)?;
            d = chosen;
            st(&format!("block size {} chosen", c.block_size));
        }
        let p = d.into_proposer();
        st("proposer");
        drop(p);
        st("proposer dropped");
    }
    drop(tok);
    drop(t);
    st("dropped");
    Ok(())
}
