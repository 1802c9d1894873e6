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
    Ok(())
}
#[allow(dead_code)]
fn unused() {}
