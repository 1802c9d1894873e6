use specauf::model::*;
use std::time::Instant;
fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).unwrap();
    for mode in [WeightsMode::F32, WeightsMode::Q8, WeightsMode::Native] {
        let loc = ModelLocation::from_path(std::path::Path::new(&path))?;
        let target = load_target(&loc, mode)?;
        let prompt: Vec<u32> = (0..256).map(|i| (i * 37 % 40000 + 100) as u32).collect();
        let mut cache = target.new_cache();
        let t = Instant::now();
        target.forward(&prompt, &mut cache, &[], Logits::Last)?;
        let prefill = t.elapsed().as_secs_f64();
        let mut dec = vec![];
        for i in 0..32 { let t = Instant::now(); target.forward(&[(i+200) as u32], &mut cache, &[], Logits::Last)?; dec.push(t.elapsed().as_secs_f64()); }
        dec.sort_by(|a,b| a.partial_cmp(b).unwrap());
        let mut ver = vec![];
        for _ in 0..8 { cache.truncate(256); let t = Instant::now(); target.forward(&prompt[..16], &mut cache, &[], Logits::All)?; ver.push(t.elapsed().as_secs_f64()); }
        ver.sort_by(|a,b| a.partial_cmp(b).unwrap());
        println!("{mode:?}: prefill {:.0} tok/s, decode {:.1} ms ({:.1} tok/s), verify16 {:.1} ms, ratio {:.2}", 256.0/prefill, dec[16]*1e3, 1.0/dec[16], ver[4]*1e3, ver[4]/dec[16]);
    }
    Ok(())
}
