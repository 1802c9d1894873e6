use specauf::model::{load_model, WeightsMode};
use specauf::train::data::{Dataset, ModelIdentity, Split};
use specauf::train::features::{target_features, FeatureCache};
fn main() -> anyhow::Result<()> {
    let dir = std::path::Path::new("/work/runs/data-regen");
    let m = load_model("smollm2", WeightsMode::Q8)?;
    let ds = Dataset::open(dir, Split::Train)?;
    let fc = FeatureCache::open(dir, Split::Train, &ModelIdentity::of(&m)?, &[1, 27])?;
    for i in [0usize, 1, 50, 170] {
        let s = ds.get(i);
        let a = target_features(&m.target, &s.input_ids, &[1, 27])?;
        let b = fc.get(i)?.to_dtype(candle_core::DType::F32)?;
        let d = (&a - &b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let mx = a.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        println!("seq {i}: len {} feats {:?} vs {:?}, max diff {d}, max |a| {mx}", s.input_ids.len(), a.dims(), b.dims());
    }
    Ok(())
}
