//! The decode loop at temperature 0: exactness against a cache-free greedy reference, accept
//! accounting, cache hygiene after rejections, the features a proposer receives, stopping.

mod spec_support;

use candle_core::Tensor;
use spec_support::{argmax, fresh_last_logits, prompt, reference_greedy, target, FAMILIES};
use specauf::model::{Logits, Target};
use specauf::spec::{
    generate, generate_streaming, AcceptStats, Draft, FinishReason, FixedProposer, GenerateConfig, Generation, OracleErrors,
    OracleProposer, Proposer, RandomProposer, SpecError,
};

const BLOCK_SIZES: [usize; 3] = [2, 4, 8];

fn greedy_cfg(max_new_tokens: usize, eos: &[u32]) -> GenerateConfig {
    GenerateConfig {
        max_new_tokens,
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
        eos_token_ids: eos.to_vec(),
        accept_rule: Default::default(),
    }
}

/// The most frequent token of `ids`: a fixed proposal that is sometimes right.
fn most_frequent(ids: &[u32]) -> u32 {
    let mut counts = [0usize; 256];
    ids.iter().for_each(|&t| counts[t as usize] += 1);
    (0..256u32).max_by_key(|&t| counts[t as usize]).unwrap_or(0)
}

/// The proposers every exactness check runs with, for one block size.
fn proposers(b: usize, continuation: &[u32], seed: u64) -> Vec<(String, Box<dyn Proposer>)> {
    vec![
        ("random".into(), Box::new(RandomProposer::uniform(b, seed)) as Box<dyn Proposer>),
        ("fixed".into(), Box::new(FixedProposer::new(b, most_frequent(continuation)))),
        (
            "oracle-30%-errors".into(),
            Box::new(OracleProposer::new(
                b,
                continuation.to_vec(),
                OracleErrors::Rate { rate: 0.3, seed },
            )),
        ),
    ]
}

#[test]
fn greedy_speculative_output_equals_plain_greedy_token_for_token() {
    let n = 24;
    let (mut accepted_somewhere, mut rejected_somewhere) = (false, false);
    for family in FAMILIES {
        let target = target(family);
        for (pi, plen) in [1usize, 5, 12].into_iter().enumerate() {
            let prompt = prompt(plen, pi as u32);
            let want = reference_greedy(&target, &prompt, n + 8);
            let ar = generate(&target, None, &prompt, &greedy_cfg(n, &[])).unwrap();
            assert_eq!(ar.token_ids, want[..n], "{family} prompt {pi}: plain AR through the loop");
            assert!(ar.accept_lengths.iter().all(|&a| a == 1), "plain AR commits one token per cycle");
            for b in BLOCK_SIZES {
                for (name, mut p) in proposers(b, &want, pi as u64) {
                    let out = generate(&target, Some(p.as_mut()), &prompt, &greedy_cfg(n, &[])).unwrap();
                    assert_eq!(out.token_ids, want[..n], "{family} prompt {pi} B={b} {name}");
                    assert_eq!(out.finish_reason, FinishReason::Length);
                    assert_eq!(out.cycles, out.accept_lengths.len());
                    assert!(out.accept_lengths.iter().all(|&a| (1..=b).contains(&a)));
                    // 1 (prefill) + Σ(acc+1) committed; the loop ran while ≤ n were committed.
                    let committed = 1 + out.accept_lengths.iter().sum::<usize>();
                    assert!(committed > n && committed - out.accept_lengths.last().unwrap() <= n);
                    accepted_somewhere |= out.accept_lengths.iter().any(|&a| a > 1);
                    rejected_somewhere |= out.accept_lengths.iter().any(|&a| a < b);
                }
            }
        }
    }
    assert!(
        accepted_somewhere && rejected_somewhere,
        "the proposers must exercise both accepts and rejections"
    );
}

#[test]
fn output_ends_at_the_first_eos_and_honours_the_token_limit() {
    let target = target("qwen2");
    let prompt = prompt(6, 3);
    let want = reference_greedy(&target, &prompt, 40);
    // An EOS that first occurs mid-output, one that is the very first token, and none.
    let mid = (8..want.len())
        .find(|&i| !want[..i].contains(&want[i]))
        .expect("a token that first occurs mid-output");
    let cases: Vec<(Vec<u32>, usize, Vec<u32>, FinishReason)> = vec![
        (
            vec![want[mid]],
            30,
            want[..=mid.min(29)].to_vec(),
            if mid < 30 { FinishReason::Eos } else { FinishReason::Length },
        ),
        (vec![999, want[0]], 30, vec![want[0]], FinishReason::Eos),
        (vec![], 1, want[..1].to_vec(), FinishReason::Length),
        (vec![], 7, want[..7].to_vec(), FinishReason::Length),
    ];
    for b in [1usize, 2, 4, 8] {
        for (eos, limit, expected, reason) in &cases {
            let cfg = greedy_cfg(*limit, eos);
            let mut p = OracleProposer::new(b, want.clone(), OracleErrors::At(vec![2, 5, 6]));
            let proposer: Option<&mut dyn Proposer> = if b == 1 { None } else { Some(&mut p) };
            let out = generate(&target, proposer, &prompt, &cfg).unwrap();
            assert_eq!(&out.token_ids, expected, "B={b} eos={eos:?} limit={limit}");
            assert_eq!(out.finish_reason, *reason, "B={b} eos={eos:?} limit={limit}");
            assert!(
                out.cycles >= 1,
                "even an EOS from the prefill is followed by one cycle (reference semantics)"
            );
        }
    }
}

/// Reference accept lengths of an oracle whose proposals are wrong exactly at `is_error`
/// indices, for a run of `limit` tokens without EOS (DESIGN §2 loop semantics).
fn predicted_accept_lengths(b: usize, limit: usize, available: usize, is_error: impl Fn(usize) -> bool) -> Vec<usize> {
    let mut committed = 1;
    let mut lens = Vec::new();
    while committed <= limit {
        let drafted = (committed..committed + b - 1).take_while(|&j| j < available);
        let acc = drafted.take_while(|&j| !is_error(j)).count();
        lens.push(acc + 1);
        committed += acc + 1;
    }
    lens
}

#[test]
fn an_error_free_oracle_is_accepted_in_full_and_known_errors_give_predicted_accept_lengths() {
    let target = target("llama");
    let prompt = prompt(4, 1);
    let n = 30;
    for b in BLOCK_SIZES {
        let want = reference_greedy(&target, &prompt, n + b);

        // Error-free with a long enough continuation: every cycle accepts all B-1 drafts.
        let mut oracle = OracleProposer::new(b, want.clone(), OracleErrors::At(vec![]));
        let out = generate(&target, Some(&mut oracle), &prompt, &greedy_cfg(n, &[])).unwrap();
        assert!(out.accept_lengths.iter().all(|&a| a == b), "B={b}: {:?}", out.accept_lengths);
        assert_eq!(out.tau, b as f64);
        let mut stats = AcceptStats::new();
        stats.add(&out);
        let m = stats.summary();
        assert_eq!((m.tau, m.tau_pooled), (b as f64, b as f64));
        assert_eq!(m.histogram_fraction[b], 1.0);
        assert_eq!(m.per_position_acceptance, vec![1.0; b - 1]);
        assert_eq!(out.cycles, n.div_ceil(b), "B={b}: ⌈n/B⌉ cycles after the prefill token");

        // Continuation of exactly n tokens: only the final cycle can come up short.
        let mut oracle = OracleProposer::new(b, want[..n].to_vec(), OracleErrors::At(vec![]));
        let out = generate(&target, Some(&mut oracle), &prompt, &greedy_cfg(n, &[])).unwrap();
        let (last, rest) = out.accept_lengths.split_last().unwrap();
        assert!(rest.iter().all(|&a| a == b) && *last <= b, "B={b}: {:?}", out.accept_lengths);
        assert_eq!(out.accept_lengths, predicted_accept_lengths(b, n, n, |_| false));

        // Known error positions, listed and drawn.
        for errors in [
            OracleErrors::At(vec![1, 3, 4, 10, 17, 18, 19, 26]),
            OracleErrors::Rate { rate: 0.25, seed: 9 },
        ] {
            let mut oracle = OracleProposer::new(b, want.clone(), errors.clone());
            let probe = oracle.clone();
            let out = generate(&target, Some(&mut oracle), &prompt, &greedy_cfg(n, &[])).unwrap();
            assert_eq!(out.token_ids, want[..n]);
            assert_eq!(
                out.accept_lengths,
                predicted_accept_lengths(b, n, want.len(), |j| probe.is_error(j)),
                "B={b} {errors:?}"
            );
            assert!(
                out.accept_lengths.iter().any(|&a| a < b),
                "B={b} {errors:?}: the errors must cause rejections"
            );
        }
    }
}

#[test]
fn rejected_tail_leaves_no_trace_in_the_cache() {
    for family in FAMILIES {
        let target = target(family);
        let prompt = prompt(7, 2);
        let want = reference_greedy(&target, &prompt, 40);
        // Errors early in each block force rejected tails of several tokens.
        let mut oracle = OracleProposer::new(8, want.clone(), OracleErrors::At(vec![2, 3, 9, 11, 20]));
        let mut generation = Generation::start(&target, Some(&mut oracle), &prompt, &greedy_cfg(32, &[])).unwrap();
        let mut rejections = 0;
        while !generation.is_finished() {
            let cycle = generation.step().unwrap();
            rejections += usize::from(cycle.accepted < cycle.drafted);
            let committed = generation.committed().to_vec();
            let cache = generation.cache();
            assert_eq!(
                cache.len(),
                prompt.len() + committed.len() - 1,
                "{family}: cache = prompt + committed - last"
            );
            // The next logits through the speculative cache equal a fresh prefill's. A cache
            // clone shares buffers but only writes rows past `len`, which the generation
            // overwrites before reading.
            let mut probe = cache.clone();
            let out = target
                .forward(&committed[committed.len() - 1..], &mut probe, &[], Logits::Last)
                .unwrap();
            let got = out.logits.unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut full = prompt.clone();
            full.extend_from_slice(&committed);
            let fresh = fresh_last_logits(&target, &full);
            let diff = got.iter().zip(&fresh).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-4, "{family}: after start {} max |Δlogit| = {diff}", cycle.start);
        }
        assert!(rejections >= 3, "{family}: only {rejections} cycles rejected a tail");
        assert_eq!(generation.finish().token_ids, want[..32]);
    }
}

/// Wraps a proposer and records what the driver hands it.
struct Recorder {
    inner: OracleProposer,
    taps: Vec<usize>,
    begin: Option<(Vec<u32>, Tensor)>,
    proposes: Vec<(u32, usize)>,
    commits: Vec<(Vec<u32>, Tensor, usize)>,
}

impl Proposer for Recorder {
    fn block_size(&self) -> usize {
        self.inner.block_size()
    }
    fn target_layer_ids(&self) -> &[usize] {
        &self.taps
    }
    fn begin(&mut self, target: &Target, prompt_ids: &[u32], features: Option<&Tensor>) -> Result<(), SpecError> {
        self.begin = Some((prompt_ids.to_vec(), features.expect("taps were requested").clone()));
        self.inner.begin(target, prompt_ids, None)
    }
    fn propose(&mut self, target: &Target, last_token: u32, start: usize) -> Result<Draft, SpecError> {
        self.proposes.push((last_token, start));
        self.inner.propose(target, last_token, start)
    }
    fn commit(&mut self, tokens: &[u32], features: Option<&Tensor>, start: usize) -> Result<(), SpecError> {
        self.commits
            .push((tokens.to_vec(), features.expect("taps were requested").clone(), start));
        Ok(())
    }
}

#[test]
fn proposer_sees_features_of_exactly_the_committed_positions() {
    let target = target("qwen3");
    let h = target.config().hidden_size;
    let prompt = prompt(6, 4);
    let want = reference_greedy(&target, &prompt, 30);
    let taps = vec![0, 3, 1];
    let mut rec = Recorder {
        inner: OracleProposer::new(4, want.clone(), OracleErrors::At(vec![2, 7, 8, 15])),
        taps: taps.clone(),
        begin: None,
        proposes: Vec::new(),
        commits: Vec::new(),
    };
    let out = generate(&target, Some(&mut rec), &prompt, &greedy_cfg(20, &[])).unwrap();
    assert_eq!(out.token_ids, want[..20]);

    // Reference features: one cache-free forward over prompt + all committed tokens.
    let mut full = prompt.clone();
    full.extend_from_slice(&want[..30]);
    let mut cache = target.new_cache();
    let reference = target.forward(&full, &mut cache, &taps, Logits::None).unwrap();
    let reference = Tensor::cat(&reference.taps, 1).unwrap(); // (len, 3·H)
    let close = |got: &Tensor, from: usize, what: &str| {
        let n = got.dim(0).unwrap();
        assert_eq!(got.dims(), [n, 3 * h], "{what}");
        let want = reference.narrow(0, from, n).unwrap();
        let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-4, "{what}: max |Δ| = {diff}");
    };

    let (ids, features) = rec.begin.as_ref().unwrap();
    assert_eq!(ids, &prompt);
    close(features, 0, "prompt features");
    // Every commit continues where the previous one ended; the next propose starts at the
    // bonus that follows it.
    let mut pos = prompt.len();
    for (i, (tokens, features, start)) in rec.commits.iter().enumerate() {
        assert_eq!(*start, pos, "commit {i}");
        assert_eq!(rec.proposes[i], (full[pos], pos), "propose {i}: last token and its position");
        assert_eq!(tokens[..], full[pos..pos + tokens.len()], "commit {i}: tokens");
        assert_eq!(tokens.len(), out.accept_lengths[i], "commit {i}: acc+1 positions");
        close(features, pos, &format!("commit {i} features"));
        pos += tokens.len();
    }
    assert_eq!(rec.commits.len(), out.cycles);
}

#[test]
fn streamed_chunks_concatenate_to_the_output() {
    let target = target("llama");
    let prompt = prompt(5, 7);
    let want = reference_greedy(&target, &prompt, 30);
    let eos = want[12];
    for b in [1usize, 4] {
        let mut chunks: Vec<Vec<u32>> = Vec::new();
        let mut oracle = OracleProposer::new(b, want.clone(), OracleErrors::At(vec![3, 8]));
        let proposer: Option<&mut dyn Proposer> = if b == 1 { None } else { Some(&mut oracle) };
        let out = generate_streaming(&target, proposer, &prompt, &greedy_cfg(25, &[eos]), &mut |c| {
            chunks.push(c.to_vec())
        })
        .unwrap();
        assert_eq!(chunks[0].len(), 1, "the prefill's token streams first, alone");
        assert!(chunks.iter().all(|c| !c.is_empty() && c.len() <= b));
        assert_eq!(chunks.concat(), out.token_ids);
        assert_eq!(out.token_ids.last(), Some(&eos));
    }
}

struct Misbehaving {
    block_size: usize,
    taps: Vec<usize>,
    tokens: Vec<u32>,
}

impl Proposer for Misbehaving {
    fn block_size(&self) -> usize {
        self.block_size
    }
    fn target_layer_ids(&self) -> &[usize] {
        &self.taps
    }
    fn begin(&mut self, _: &Target, _: &[u32], _: Option<&Tensor>) -> Result<(), SpecError> {
        Ok(())
    }
    fn propose(&mut self, _: &Target, _: u32, _: usize) -> Result<Draft, SpecError> {
        Ok(Draft::tokens(self.tokens.clone()))
    }
    fn commit(&mut self, _: &[u32], _: Option<&Tensor>, _: usize) -> Result<(), SpecError> {
        Ok(())
    }
}

#[test]
fn mismatched_drafters_and_oversized_requests_fail_with_clear_errors() {
    let target = target("llama");
    let layers = target.config().num_hidden_layers;
    let max = target.config().max_position_embeddings;
    let p = prompt(4, 0);
    let cfg = greedy_cfg(8, &[]);
    let run = |m: &mut Misbehaving, prompt: &[u32], cfg: &GenerateConfig| generate(&target, Some(m), prompt, cfg).map(|_| ());

    let mut tap = Misbehaving {
        block_size: 4,
        taps: vec![layers],
        tokens: vec![1, 2, 3],
    };
    assert!(matches!(run(&mut tap, &p, &cfg), Err(SpecError::TapOutOfRange { layer, .. }) if layer == layers));
    let mut long = Misbehaving {
        block_size: 4,
        taps: vec![],
        tokens: vec![1, 2, 3, 4],
    };
    assert!(matches!(
        run(&mut long, &p, &cfg),
        Err(SpecError::TooManyDraftTokens { got: 4, max: 3, .. })
    ));
    let mut oov = Misbehaving {
        block_size: 4,
        taps: vec![],
        tokens: vec![1, 256],
    };
    assert!(matches!(
        run(&mut oov, &p, &cfg),
        Err(SpecError::DraftTokenOutOfRange {
            token: 256,
            position: 2,
            ..
        })
    ));
    let mut zero = Misbehaving {
        block_size: 0,
        taps: vec![],
        tokens: vec![],
    };
    assert!(matches!(run(&mut zero, &p, &cfg), Err(SpecError::ZeroBlockSize)));

    // prompt + max_new_tokens + B - 1 positions must fit the context.
    let mut ok = Misbehaving {
        block_size: 8,
        taps: vec![],
        tokens: vec![],
    };
    let fits = prompt(max - 8 - 7, 0);
    assert!(run(&mut ok, &fits, &greedy_cfg(8, &[])).is_ok());
    let too_long = prompt(max - 8 - 6, 0);
    let err = run(&mut ok, &too_long, &greedy_cfg(8, &[])).unwrap_err();
    assert!(
        matches!(err, SpecError::ContextOverflow { needed, .. } if needed == max + 1),
        "{err}"
    );
    assert!(err.to_string().contains("lower max_new_tokens"));

    assert!(matches!(generate(&target, None, &[], &cfg), Err(SpecError::EmptyPrompt)));
    assert!(matches!(
        generate(&target, None, &p, &greedy_cfg(0, &[])),
        Err(SpecError::InvalidConfig { .. })
    ));
    let mut hot = greedy_cfg(8, &[]);
    hot.top_p = 0.0;
    hot.temperature = 1.0;
    assert!(matches!(generate(&target, None, &p, &hot), Err(SpecError::InvalidConfig { .. })));
    // The plain greedy loop still agrees with argmax of a fresh prefill for its first token.
    let first = generate(&target, None, &p, &cfg).unwrap().token_ids[0];
    assert_eq!(first, argmax(&fresh_last_logits(&target, &p)));
}

/// Sleeps `ms[i]` in its i-th propose (the last value after the list ends), drafting nothing
/// useful; the calibration's draft timer must see through it.
struct SleepyProposer {
    inner: FixedProposer,
    ms: Vec<u64>,
    calls: usize,
}

impl Proposer for SleepyProposer {
    fn block_size(&self) -> usize {
        self.inner.block_size()
    }
    fn target_layer_ids(&self) -> &[usize] {
        self.inner.target_layer_ids()
    }
    fn begin(&mut self, target: &Target, prompt_ids: &[u32], features: Option<&Tensor>) -> Result<(), SpecError> {
        self.inner.begin(target, prompt_ids, features)
    }
    fn propose(&mut self, target: &Target, last_token: u32, start: usize) -> Result<Draft, SpecError> {
        let ms = self.ms.get(self.calls).or(self.ms.last()).copied().unwrap_or(0);
        self.calls += 1;
        std::thread::sleep(std::time::Duration::from_millis(ms));
        self.inner.propose(target, last_token, start)
    }
    fn commit(&mut self, tokens: &[u32], features: Option<&Tensor>, start: usize) -> Result<(), SpecError> {
        self.inner.commit(tokens, features, start)
    }
}

#[test]
fn the_block_size_calibration_times_a_typical_draft_and_a_curve_that_never_falls() {
    use specauf::spec::block_size::{measure_draft_ms, measure_verify_curve};
    let target = target("llama");
    // the first propose (the prompt's context) and two stretched by load are slow: the median
    // of the others is what a cycle's draft costs
    let mut slow_starts = SleepyProposer { inner: FixedProposer::new(4, 7), ms: vec![200, 5, 120, 5, 5, 90, 5], calls: 0 };
    let timing = measure_draft_ms(&target, &mut slow_starts).unwrap();
    assert!(slow_starts.calls >= 10, "too few cycles timed: {}", slow_starts.calls);
    let ms = timing.draft_ms;
    assert!((4.5..60.0).contains(&ms), "a 5 ms draft measured as {ms} ms");
    // a cycle is the draft and a verify: longer than the draft, shorter than the stretched ones
    assert!(timing.cycle_ms > ms && timing.cycle_ms < 80.0, "{timing:?}");
    assert_eq!(timing.rest_ms(1e3), 0.0, "the rest is never negative");
    let curve = measure_verify_curve(&target, 6, &[], 3).unwrap();
    assert_eq!(curve.len(), 6);
    assert!(curve.iter().all(|v| v.is_finite() && *v > 0.0) && curve.windows(2).all(|w| w[0] <= w[1]), "{curve:?}");
}
