//! The host layer forward run by a team of the pool's threads (`util::team`): the steps of
//! [`Layer::forward_host`] in the same order, each shared out by rows, by a matmul's tiles or by
//! attention units, with a barrier wherever a step reads what another member wrote. Every row's
//! arithmetic is unchanged, so the bits are those of the dispatched path
//! (tests/target_parity.rs); what goes is a pool dispatch per matmul and the time one thread
//! waits while the other runs a layer's small steps (docs/perf.md § "A team for the layers").

use super::{host_ops, BatchItem, HostBuffers, Layer, Span, Target};
use crate::model::attention::{attention_units, unit_count};
use crate::model::qgemm::{parts_per_thread, team_matmul, QMatrix, SharedActs};
use crate::model::weights::Linear;
use crate::util::team::{SharedBuf, Team};

/// The batch's items: member 0 writes the caches, all members read them after a barrier.
#[derive(Clone, Copy)]
struct Items(*mut (), usize);
// SAFETY: as for SharedBuf: the one `&mut` (member 0's cache write) and the shared reads are in
// phases separated by barriers.
unsafe impl Send for Items {}
unsafe impl Sync for Items {}

/// Rows a norm or RoPE step takes at once inside a team: at most the host ops' own pool split
/// (`host_ops::PARALLEL_ROWS`), so they run on the member that called them (members must not
/// use rayon, `util::team::run`).
const ROW_CHUNK: usize = host_ops::PARALLEL_ROWS;

/// What every member of the team reads: the layers' matrices and biases, the shared
/// activations and buffers, the batch's layout.
struct Shared<'a> {
    mats: Vec<[&'a QMatrix; 7]>,
    /// Qwen2's q/k/v biases on the host.
    biases: Vec<[Option<Vec<f32>>; 3]>,
    acts_h: SharedActs,
    acts_att: SharedActs,
    acts_i: SharedActs,
    x: SharedBuf,
    h: SharedBuf,
    q: SharedBuf,
    k: SharedBuf,
    v: SharedBuf,
    o: SharedBuf,
    gate: SharedBuf,
    up: SharedBuf,
    att: SharedBuf,
    taps: Vec<Option<SharedBuf>>,
    items: Items,
    spans: &'a [Span],
    /// Each item's first attention unit, numbered item after item, then the total.
    unit_base: Vec<usize>,
    units: usize,
    cos: &'a [f32],
    sin: &'a [f32],
    total: usize,
    /// Chunks of a matmul's tiles per member, read once, so every member cuts alike (the
    /// claims' bookkeeping relies on it).
    parts: usize,
}

impl Target {
    /// All layers of a host forward, run by a team (see the module docs). Returns the tapped
    /// layers' outputs (total, H), or None (nothing done) where no team can be formed now.
    pub(super) fn layers_team(&self, x: &mut [f32], buf: &mut HostBuffers, items: &mut [BatchItem<'_>], spans: &[Span], cos: &[f32], sin: &[f32]) -> Option<Vec<Option<Vec<f32>>>> {
        if !self.host_layers || self.layers.is_empty() || !crate::util::team::possible() {
            return None;
        }
        let mats: Vec<[&QMatrix; 7]> = self
            .layers
            .iter()
            .map(|l| {
                let (a, m) = (&l.attn, &l.mlp);
                Some([a.q_proj.blocks()?, a.k_proj.blocks()?, a.v_proj.blocks()?, a.o_proj.blocks()?, m.gate.blocks()?, m.up.blocks()?, m.down.blocks()?])
            })
            .collect::<Option<_>>()?;
        // Fallible, so before the team starts.
        let host = |l: &Linear| l.bias().map(|b| b.to_vec1::<f32>()).transpose();
        let biases = self
            .layers
            .iter()
            .map(|l| Ok([host(&l.attn.q_proj)?, host(&l.attn.k_proj)?, host(&l.attn.v_proj)?]))
            .collect::<candle_core::Result<_>>()
            .ok()?;
        let a0 = &self.layers[0].attn;
        let (hs, qw) = (self.cfg.hidden_size, a0.heads * a0.head_dim);
        let total = x.len() / hs.max(1);
        let mut att = vec![0f32; total * qw];
        let mut taps: Vec<Option<Vec<f32>>> =
            (0..self.layers.len()).map(|i| items.iter().any(|it| it.taps.contains(&i)).then(|| vec![0f32; total * hs])).collect();
        let kv_heads = a0.kv_heads;
        // Prefix sums: item i's units are unit_base[i]..unit_base[i + 1].
        let unit_base: Vec<usize> = std::iter::once(0)
            .chain(spans.iter().scan(0, |acc, s| {
                *acc += unit_count(s.n, kv_heads);
                Some(*acc)
            }))
            .collect();
        let shared = Shared {
            mats,
            biases,
            acts_h: SharedActs::new(total, hs),
            acts_att: SharedActs::new(total, qw),
            acts_i: SharedActs::new(total, self.cfg.intermediate_size),
            x: SharedBuf::of(x),
            h: SharedBuf::of(&mut buf.h),
            q: SharedBuf::of(&mut buf.q),
            k: SharedBuf::of(&mut buf.k),
            v: SharedBuf::of(&mut buf.v),
            o: SharedBuf::of(&mut buf.o),
            gate: SharedBuf::of(&mut buf.gate),
            up: SharedBuf::of(&mut buf.up),
            att: SharedBuf::of(&mut att),
            taps: taps.iter_mut().map(|t| t.as_mut().map(|t| SharedBuf::of(t))).collect(),
            items: Items(items.as_mut_ptr() as *mut (), items.len()),
            units: unit_base[spans.len()],
            unit_base,
            spans,
            cos,
            sin,
            total,
            parts: parts_per_thread(),
        };
        crate::util::team::run(|t| {
            for (idx, layer) in self.layers.iter().enumerate() {
                // SAFETY: every phase writes only this member's rows, or the tiles or units it
                // claims, and reads whole buffers only after the `sync` that ends the phase that
                // wrote them.
                unsafe {
                    team_attention(t, &shared, idx, layer);
                    team_mlp(t, &shared, idx, layer);
                }
            }
        })?;
        Some(taps)
    }
}

/// A member's rows in chunks of at most [`ROW_CHUNK`].
fn row_chunks(t: &Team, total: usize) -> impl Iterator<Item = (usize, usize)> {
    let rows = t.share(total);
    (rows.start..rows.end).step_by(ROW_CHUNK).map(move |r| (r, (r + ROW_CHUNK).min(rows.end)))
}

/// Steps 1–7 of a layer (norm, q/k/v, RoPE, the cache, attention, o_proj) for one member.
///
/// # Safety
/// See `layers_team`: all members call this with the same arguments.
unsafe fn team_attention(t: &Team, c: &Shared<'_>, idx: usize, layer: &Layer) {
    let a = &layer.attn;
    let (nh, nkv, hd) = (a.heads, a.kv_heads, a.head_dim);
    let hs = layer.input_norm.host.len();
    let (qw, kvw, half) = (nh * hd, nkv * hd, hd / 2);
    let m = &c.mats[idx];
    // 1. norm and quantize own rows (the residual add before it was on the same rows)
    for (r0, r1) in row_chunks(t, c.total) {
        host_ops::rms_norm(c.x.get(r0 * hs, r1 * hs), &layer.input_norm.host, layer.input_norm.eps, c.h.get_mut(r0 * hs, r1 * hs));
        c.acts_h.quantize_rows(c.h.get(r0 * hs, r1 * hs), r0, r1);
    }
    t.sync();
    // 2. q, k, v tiles
    team_matmul(t, c.parts, &m[..3], &c.acts_h, &[c.q, c.k, c.v]);
    t.sync();
    // 3. biases, per-head norms (row by row, below their own pool split) and RoPE, own rows
    for (r0, r1) in row_chunks(t, c.total) {
        let (q, k, v) = (c.q.get_mut(r0 * qw, r1 * qw), c.k.get_mut(r0 * kvw, r1 * kvw), c.v.get_mut(r0 * kvw, r1 * kvw));
        for (y, b) in [&mut *q, &mut *k, v].into_iter().zip(&c.biases[idx]) {
            if let Some(b) = b {
                host_ops::add_bias(y, b);
            }
        }
        if let Some(nm) = &a.q_norm {
            q.chunks_mut(qw).for_each(|row| host_ops::rms_norm_in_place(row, &nm.host, nm.eps));
        }
        if let Some(nm) = &a.k_norm {
            k.chunks_mut(kvw).for_each(|row| host_ops::rms_norm_in_place(row, &nm.host, nm.eps));
        }
        let (cs, sn) = (&c.cos[r0 * half..r1 * half], &c.sin[r0 * half..r1 * half]);
        host_ops::rope_in_place(q, nh, hd, cs, sn);
        host_ops::rope_in_place(k, nkv, hd, cs, sn);
    }
    t.sync();
    // 4. member 0 writes every item's K/V into its cache
    if t.id() == 0 {
        let items = std::slice::from_raw_parts_mut(c.items.0 as *mut BatchItem<'_>, c.items.1);
        for (item, s) in items.iter_mut().zip(c.spans) {
            let (k0, k1) = (s.row * kvw, (s.row + s.n) * kvw);
            item.cache.write(idx, c.k.get(k0, k1), c.v.get(k0, k1), s.n);
        }
    }
    t.sync();
    // 5. attention units of all items
    let items = std::slice::from_raw_parts(c.items.0 as *const BatchItem<'_>, c.items.1);
    t.claim(c.units, 1, |r| {
        for u in r {
            let i = c.unit_base.partition_point(|&b| b <= u) - 1;
            let (s, cache, local) = (&c.spans[i], &*items[i].cache, u - c.unit_base[i]);
            let q = c.q.get(s.row * qw, (s.row + s.n) * qw);
            let out = c.att.0.add(s.row * qw);
            attention_units(q, cache.layer(idx), s.n, nh, nkv, hd, cache.capacity(), |i| s.start + i + 1, local..local + 1, out);
        }
    });
    t.sync();
    // 6. quantize own rows of the attention output
    let rows = t.share(c.total);
    c.acts_att.quantize_rows(c.att.get(rows.start * qw, rows.end * qw), rows.start, rows.end);
    t.sync();
    // 7. o_proj tiles
    team_matmul(t, c.parts, &m[3..4], &c.acts_att, &[c.o]);
    t.sync();
}

/// Steps 8–12 of a layer (residual, norm, gate/up, SiLU · up, down, residual) for one member.
///
/// # Safety
/// See `layers_team`: all members call this with the same arguments.
unsafe fn team_mlp(t: &Team, c: &Shared<'_>, idx: usize, layer: &Layer) {
    let (hs, inter) = (layer.input_norm.host.len(), c.acts_i.width());
    let m = &c.mats[idx];
    // 8. residual, post-attention norm, quantize, own rows
    for (r0, r1) in row_chunks(t, c.total) {
        host_ops::add_in_place(c.x.get_mut(r0 * hs, r1 * hs), c.o.get(r0 * hs, r1 * hs));
        host_ops::rms_norm(c.x.get(r0 * hs, r1 * hs), &layer.post_norm.host, layer.post_norm.eps, c.h.get_mut(r0 * hs, r1 * hs));
        c.acts_h.quantize_rows(c.h.get(r0 * hs, r1 * hs), r0, r1);
    }
    t.sync();
    // 9. gate, up tiles
    team_matmul(t, c.parts, &m[4..6], &c.acts_h, &[c.gate, c.up]);
    t.sync();
    // 10. SiLU · up and quantize, own rows
    for (r0, r1) in row_chunks(t, c.total) {
        host_ops::silu_mul_serial(c.gate.get_mut(r0 * inter, r1 * inter), c.up.get(r0 * inter, r1 * inter));
        c.acts_i.quantize_rows(c.gate.get(r0 * inter, r1 * inter), r0, r1);
    }
    t.sync();
    // 11. down tiles
    team_matmul(t, c.parts, &m[6..7], &c.acts_i, &[c.o]);
    t.sync();
    // 12. residual on own rows, and the tap's copy of them. The next layer's step 1 reads only
    // these rows, so no barrier is needed before it.
    let rows = t.share(c.total);
    let xr = c.x.get_mut(rows.start * hs, rows.end * hs);
    host_ops::add_in_place(xr, c.o.get(rows.start * hs, rows.end * hs));
    if let Some(tb) = c.taps[idx] {
        tb.get_mut(rows.start * hs, rows.end * hs).copy_from_slice(xr);
    }
}
