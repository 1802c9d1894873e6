//! The drafter's forwards run by a team of the pool's threads (`util::team`), as the target's
//! layers are (`model::target::team`).
//!
//! Why: a draft at B = 2 is eleven small matmuls (a few hundred KB of weights each) and the
//! steps between them. Dispatched to the pool one by one, each matmul wakes the other worker
//! and waits for it. In a team both members walk the same layers: each matmul's tiles are
//! shared out, and every step between matmuls is a handful of rows, which each member computes
//! on its own copy rather than meeting at a barrier for it. A B = 2 draft right after a verify
//! took 0.58–0.73 ms instead of 0.67–0.77, the context rows 0.12 instead of 0.20–0.25
//! (docs/perf.md § "The drafter in a team, in Q4_1"). Every value is computed by the same code
//! on the same inputs as the dispatched path, so the bits are the same (tests below).

use super::{rms_norm_rows, DFlashInfer, Layer};
use crate::model::attention::{attention_units, unit_count};
use crate::model::host_ops::silu_mul_serial;
use crate::model::qgemm::{parts_per_thread, team_matmul, QMatrix, SharedActs};
use crate::model::KvCache;
use crate::util::team::{SharedBuf, Team};

/// The drafter's cache: member 0 writes it in one phase, every member reads it after a barrier.
#[derive(Clone, Copy)]
struct CachePtr(*mut KvCache);
// SAFETY: the one `&mut` (member 0's writes) and the shared reads are in phases separated by
// barriers.
unsafe impl Send for CachePtr {}
unsafe impl Sync for CachePtr {}

impl CachePtr {
    /// The cache, through a method so that closures capture the whole (Sync) wrapper.
    fn get(self) -> *mut KvCache {
        self.0
    }
}

/// A layer's projections in int8 or Q4_1 blocks: q, [k; v], o, [gate; up], down.
type Mats<'a> = [&'a QMatrix; 5];

/// A member's quantized matmul inputs in a block forward, one per input width (its own: each
/// member quantizes every row for itself).
struct MemberActs {
    h: SharedActs,
    att: SharedActs,
    inter: SharedActs,
}

/// What the members of a block forward share: the matmuls' outputs.
struct BlockBufs {
    q: SharedBuf,
    kv: SharedBuf,
    att: SharedBuf,
    o: SharedBuf,
    gu: SharedBuf,
    down: SharedBuf,
}

impl DFlashInfer {
    /// Every projection's blocks, layer by layer; None where any is held in f32.
    fn block_mats(&self) -> Option<Vec<Mats<'_>>> {
        self.layers.iter().map(|l| Some([l.q.blocks()?, l.kv.blocks()?, l.o.blocks()?, l.gate_up.blocks()?, l.down.blocks()?])).collect()
    }

    /// The block's layers (`forward_block` from the embedded inputs to the last layer's
    /// output), by a team: `x` (B, H) in place, the block's K/V written past the context as the
    /// dispatched path writes them. None (nothing done) where no team can be formed now or the
    /// projections are in f32.
    pub(super) fn block_layers_team(&self, x: &mut [f32], cache: &mut KvCache, start: usize) -> Option<()> {
        if !crate::util::team::possible() {
            return None;
        }
        let mats = self.block_mats()?;
        let b = self.block_size;
        let (h, qw, kvw) = (self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let mut q = vec![0f32; b * qw];
        let mut kv = vec![0f32; b * 2 * kvw];
        let mut att = vec![0f32; b * qw];
        let mut o = vec![0f32; b * h];
        let mut gu = vec![0f32; b * 2 * self.inter];
        let mut down = vec![0f32; b * h];
        let bufs = BlockBufs {
            q: SharedBuf::of(&mut q),
            kv: SharedBuf::of(&mut kv),
            att: SharedBuf::of(&mut att),
            o: SharedBuf::of(&mut o),
            gu: SharedBuf::of(&mut gu),
            down: SharedBuf::of(&mut down),
        };
        let (cache, input, parts) = (CachePtr(cache), &*x, parts_per_thread());
        let out = crate::util::team::run(|t| {
            let mut x = input.to_vec();
            // This member's own quantized inputs of each matmul width, reused layer by layer.
            let acts = MemberActs { h: SharedActs::new(b, h), att: SharedActs::new(b, qw), inter: SharedActs::new(b, self.inter) };
            for (l, (layer, m)) in self.layers.iter().zip(&mats).enumerate() {
                // SAFETY: the phases below write only claimed tiles or units of the shared
                // buffers, or (member 0) the cache, and read them only after the barrier that
                // ends the phase that wrote them.
                unsafe {
                    self.team_block_attention(t, parts, &bufs, &acts, cache, l, layer, m, &mut x, start);
                    self.team_block_mlp(t, parts, &bufs, &acts, layer, m, &mut x);
                }
            }
            x
        })?;
        x.copy_from_slice(&out);
        Some(())
    }

    /// A layer's attention for the block, one member: norm, q and [k; v] tiles, member 0's
    /// cache write, attention units, o tiles, the residual.
    ///
    /// # Safety
    /// See `block_layers_team`: every member calls this with the same arguments.
    #[allow(clippy::too_many_arguments)]
    unsafe fn team_block_attention(&self, t: &Team, parts: usize, c: &BlockBufs, acts: &MemberActs, cache: CachePtr, l: usize, layer: &Layer, m: &Mats<'_>, x: &mut [f32], start: usize) {
        let b = self.block_size;
        let (h, qw, kvw) = (self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let mut hn = x.to_vec();
        rms_norm_rows(&mut hn, &layer.input_norm, self.eps);
        acts.h.quantize_rows(&hn, 0, b);
        team_matmul(t, parts, &m[..2], &acts.h, &[c.q, c.kv]);
        t.sync();
        let mut q = c.q.get(0, b * qw).to_vec();
        self.norm_rope(&mut q, self.heads, &layer.q_norm, start);
        if t.id() == 0 {
            let (k, v) = self.split_keys_values(layer, c.kv.get(0, b * 2 * kvw), start);
            (*cache.get()).write(l, &k, &v, b);
        }
        t.sync();
        let kvc = &*cache.get();
        t.claim(unit_count(b, self.kv_heads), 1, |r| {
            attention_units(&q, kvc.layer(l), b, self.heads, self.kv_heads, self.head_dim, kvc.capacity(), |_| start + b, r, c.att.0);
        });
        t.sync();
        acts.att.quantize_rows(c.att.get(0, b * qw), 0, b);
        team_matmul(t, parts, &m[2..3], &acts.att, &[c.o]);
        t.sync();
        for (xi, oi) in x.iter_mut().zip(c.o.get(0, b * h)) {
            *xi += oi;
        }
    }

    /// A layer's MLP for the block, one member: norm, [gate; up] tiles, SiLU · up, down tiles,
    /// the residual.
    ///
    /// # Safety
    /// See `block_layers_team`.
    unsafe fn team_block_mlp(&self, t: &Team, parts: usize, c: &BlockBufs, acts: &MemberActs, layer: &Layer, m: &Mats<'_>, x: &mut [f32]) {
        let (b, h, inter) = (self.block_size, self.hidden, self.inter);
        let mut hn = x.to_vec();
        rms_norm_rows(&mut hn, &layer.post_norm, self.eps);
        acts.h.quantize_rows(&hn, 0, b);
        team_matmul(t, parts, &m[3..4], &acts.h, &[c.gu]);
        t.sync();
        let mut a = Vec::with_capacity(b * inter);
        for row in c.gu.get(0, b * 2 * inter).chunks_exact(2 * inter) {
            let (g, u) = row.split_at(inter);
            let s = a.len();
            a.extend_from_slice(g);
            silu_mul_serial(&mut a[s..], u);
        }
        acts.inter.quantize_rows(&a, 0, b);
        team_matmul(t, parts, &m[4..5], &acts.inter, &[c.down]);
        t.sync();
        for (xi, di) in x.iter_mut().zip(c.down.get(0, b * h)) {
            *xi += di;
        }
    }

    /// `extend_context`'s work for `n` rows of features (n, n_taps·H), by a team: the fc
    /// projection, then every layer's [k; v] in one group, written into the cache past its
    /// length (the caller advances it). None (nothing done) where no team can be formed now or
    /// the projections are in f32.
    pub(super) fn context_team(&self, cache: &mut KvCache, features: &[f32], n: usize) -> Option<()> {
        if !crate::util::team::possible() {
            return None;
        }
        let fc = self.fc.blocks()?;
        let kv_mats: Vec<&QMatrix> = self.layers.iter().map(|l| l.kv.blocks()).collect::<Option<_>>()?;
        let (h, kvw) = (self.hidden, self.kv_heads * self.head_dim);
        let start = cache.len();
        let mut c = vec![0f32; n * h];
        let mut kv: Vec<Vec<f32>> = kv_mats.iter().map(|_| vec![0f32; n * 2 * kvw]).collect();
        let (cbuf, kvbufs): (SharedBuf, Vec<SharedBuf>) = (SharedBuf::of(&mut c), kv.iter_mut().map(|v| SharedBuf::of(v)).collect());
        let (cache, parts) = (CachePtr(cache), parts_per_thread());
        crate::util::team::run(|t| {
            // SAFETY: as in `block_layers_team`.
            unsafe {
                let acts = SharedActs::new(n, fc.in_features());
                acts.quantize_rows(features, 0, n);
                team_matmul(t, parts, &[fc], &acts, &[cbuf]);
                t.sync();
                let mut hn = cbuf.get(0, n * h).to_vec();
                rms_norm_rows(&mut hn, &self.hidden_norm, self.eps);
                let acts = SharedActs::new(n, h);
                acts.quantize_rows(&hn, 0, n);
                team_matmul(t, parts, &kv_mats, &acts, &kvbufs);
                t.sync();
                if t.id() == 0 {
                    for (l, (layer, kvb)) in self.layers.iter().zip(&kvbufs).enumerate() {
                        let (k, v) = self.split_keys_values(layer, kvb.get(0, n * 2 * kvw), start);
                        (*cache.get()).write(l, &k, &v, n);
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::drafter::{DFlashDrafter, DFlashInfer, DFlashInitConfig, DrafterPrecision as Precision};
    use crate::model::{load_target, Logits, ModelLocation, Target, WeightsMode};

    fn bits(x: &[f32]) -> Vec<u32> {
        x.iter().map(|v| v.to_bits()).collect()
    }

    /// `f` in a two-thread pool of its own (the team's shape on the machine it is built for),
    /// retried while another test holds the team.
    fn teamed<R: Send>(f: impl Fn() -> Option<R> + Sync + Send) -> R {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        pool.install(|| loop {
            if let Some(r) = f() {
                return r;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        })
    }

    /// The team's context rows and block forward against the dispatched path: the same bits in
    /// the cache and in the block's hidden, for blocks of 2, 3 and 5 positions (2 is what
    /// `eval` picks here; 5 is more rows than a tile of attention queries), on two fixture
    /// families.
    #[test]
    fn the_team_forwards_have_the_bits_of_the_dispatched_ones() {
        for family in ["qwen3", "llama"] {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(family);
            let target: Target = load_target(&ModelLocation::from_path(&dir).unwrap(), WeightsMode::Q8).unwrap();
            let layers = target.config().num_hidden_layers;
            let ids: Vec<u32> = (0..30u32).map(|i| 3 + (i * 37) % 250).collect();
            let mut cache = target.new_cache();
            let taps = target.forward(&ids, &mut cache, &[1, layers - 1], Logits::None).unwrap().taps;
            let feats = candle_core::Tensor::cat(&taps, 1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let fin = feats.len() / ids.len();
            for block in [2usize, 3, 5] {
                let mut init = DFlashInitConfig::new(2, block, 5);
                init.target_layer_ids = Some(vec![1, layers - 1]);
                let d = DFlashDrafter::init_random(target.config(), &init, 7 + block as u64).unwrap();
                for precision in [Precision::Q4, Precision::Int8] {
                    let infer = DFlashInfer::with_precision(&d, precision).unwrap();
                    check(&target, &d, &infer, &ids, &feats, fin, block, &format!("{family}, {precision:?}"));
                }
            }
        }
    }

    /// One drafter's team and dispatched forwards, compared (see the test above).
    #[allow(clippy::too_many_arguments)]
    fn check(target: &Target, d: &DFlashDrafter, infer: &DFlashInfer, ids: &[u32], feats: &[f32], fin: usize, block: usize, what: &str) {
        // Context rows: 17 at once (a prefill), then 3 (a cycle's commit).
        let (mut a, mut b) = (infer.new_cache(), infer.new_cache());
        for (r0, r1) in [(0usize, 17usize), (17, 20)] {
            let rows = &feats[r0 * fin..r1 * fin];
            a = teamed(|| {
                let mut c = a.clone();
                c.reserve(r1 - r0);
                infer.context_team(&mut c, rows, r1 - r0).map(|_| c)
            });
            a.advance(r1 - r0);
            b.reserve(r1 - r0);
            infer.context_rows(&mut b, rows, r1 - r0).unwrap();
            b.advance(r1 - r0);
        }
        let start = a.len();
        let x0 = target.embed(&d.block_ids(&[ids[start]])).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (ta, tx) = teamed(|| {
            let (mut c, mut x) = (a.clone(), x0.clone());
            c.reserve(block);
            infer.block_layers_team(&mut x, &mut c, start).map(|_| (c, x))
        });
        let mut x = x0.clone();
        b.reserve(block);
        infer.block_layers(&mut x, &mut b, start).unwrap();
        assert_eq!(bits(&tx), bits(&x), "{what}, block {block}: the block's hidden");
        let len = start + block;
        for l in 0..infer.layers.len() {
            let (p, q) = (ta.layer(l), b.layer(l));
            for g in 0..infer.kv_heads {
                let at = |kv: &[f32], cap: usize| bits(&kv[g * cap * infer.head_dim..(g * cap + len) * infer.head_dim]);
                assert_eq!(at(&p.k, ta.capacity()), at(&q.k, b.capacity()), "{what}, block {block}: layer {l} head {g} keys");
                assert_eq!(at(&p.v, ta.capacity()), at(&q.v, b.capacity()), "{what}, block {block}: layer {l} head {g} values");
            }
        }
    }
}
