use specauf::model::*;
fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).unwrap();
    let n: usize = std::env::args().nth(2).unwrap().parse()?;
    let target = load_target(&ModelLocation::from_path(std::path::Path::new(&path))?, WeightsMode::Q8)?;
    let prompt: Vec<u32> = (0..256).map(|i| (i * 37 % 40000 + 100) as u32).collect();
    let mut cache = target.new_cache();
    target.forward(&prompt, &mut cache, &[], Logits::Last)?;
    let t = std::time::Instant::now();
    for _ in 0..100 { cache.truncate(256); target.forward(&prompt[..n], &mut cache, &[], Logits::All)?; }
    println!("{:.2} ms/forward", t.elapsed().as_secs_f64()*10.0);
    Ok(())
}
