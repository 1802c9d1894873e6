use specauf::model::*;
use std::time::Instant;
fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).unwrap();
    let mode = match std::env::args().nth(2).as_deref() { Some("f32") => WeightsMode::F32, Some("native") => WeightsMode::Native, _ => WeightsMode::Q8 };
    let loc = ModelLocation::from_path(std::path::Path::new(&path))?;
    let target = load_target(&loc, mode)?;
    let prompt: Vec<u32> = (0..256).map(|i| (i * 37 % 40000 + 100) as u32).collect();
    let mut cache = target.new_cache();
    let t = Instant::now();
    target.forward(&prompt, &mut cache, &[], Logits::Last)?;
    println!("prefill {:.0} tok/s", 256.0 / t.elapsed().as_secs_f64());
    for n in [1usize, 2, 4, 8, 16] {
        let mut v = vec![];
        for _ in 0..9 { cache.truncate(256); let t = Instant::now(); target.forward(&prompt[..n], &mut cache, &[], Logits::All)?; v.push(t.elapsed().as_secs_f64()*1e3); }
        v.sort_by(|a,b| a.partial_cmp(b).unwrap());
        println!("{mode:?} n={n}: {:.1} ms", v[4]);
    }
    Ok(())
}
