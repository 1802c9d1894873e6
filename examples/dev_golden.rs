use specauf::model::*;
fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).unwrap();
    let mode = match std::env::args().nth(2).as_deref() { Some("f32") => WeightsMode::F32, Some("native") => WeightsMode::Native, _ => WeightsMode::Q8 };
    let t0 = std::time::Instant::now();
    let loc = ModelLocation::from_path(std::path::Path::new(&path))?;
    let target = load_target(&loc, mode)?;
    println!("load {:?} {:?}", t0.elapsed(), target.config());
    for ids in [vec![504u32, 3575, 282, 4649, 314], vec![1604, 3987, 46477, 24, 94, 727, 2367]] {
        let mut cache = target.new_cache();
        let out = target.forward(&ids, &mut cache, &[], Logits::All)?;
        let logits = out.logits.unwrap();
        let last = logits.get(ids.len()-1)?.to_vec1::<f32>()?;
        let mut idx: Vec<usize> = (0..last.len()).collect();
        idx.sort_by(|a,b| last[*b].partial_cmp(&last[*a]).unwrap());
        println!("top {:?}", idx[..3].iter().map(|&i| (i, last[i])).collect::<Vec<_>>());
        println!("nll {}", specauf::model::target::mean_nll(&logits, &ids)?);
    }
    let ids: Vec<u32> = (0..40).map(|i| (i * 997 % 40000 + 50) as u32).collect();
    let mut c1 = target.new_cache();
    let a = target.forward(&ids, &mut c1, &[5], Logits::All)?.logits.unwrap();
    let mut c2 = target.new_cache();
    target.forward(&ids[..20], &mut c2, &[5], Logits::All)?;
    let mut rows = vec![];
    for &t in &ids[20..] { rows.push(target.forward(&[t], &mut c2, &[5], Logits::All)?.logits.unwrap()); }
    let b = candle_core::Tensor::cat(&rows, 0)?;
    let d = (a.narrow(0, 20, 20)? - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    println!("chunked vs token-by-token max diff {d}");
    Ok(())
}
#[allow(dead_code)]
fn unused() {}
