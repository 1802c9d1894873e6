//! The evaluation runner over tiny fixture targets: exactness flagged correctly, one shared AR
//! baseline, MT-Bench's second turn conditioned on each run's own first answer, context skips, and
//! bad inputs refused before any generation.

mod spec_support;

use std::cell::RefCell;

use spec_support::target;
use specauf::eval::datasets::{BenchRequest, Benchmark, BenchmarkName};
use specauf::eval::runner::{
    self, EvalConfig, EvalDrafter, EvalError, EvalObserver, PromptRenderer, RenderError, RequestRecord, Silent, AR_LABEL,
};
use specauf::model::Target;
use specauf::spec::{AcceptRule, Draft, FixedProposer, Proposer, RandomProposer, SpecError};

/// Renders a conversation without a tokenizer: `[1] ([3] bytes(user) [4] answer [5])*`, the last
/// turn ending at `[4]` where the answer starts. Records every call.
/// (1-based turn, the answers passed in, the prompt ids returned) of one render.
type RenderCall = (usize, Vec<Vec<u32>>, Vec<u32>);

#[derive(Default)]
struct ByteRenderer {
    calls: RefCell<Vec<RenderCall>>,
    /// When set, every call after the first n appends an extra token (a renderer that is not a
    /// function of its input, so runs see different prompts).
    drift_after: Option<usize>,
}

impl PromptRenderer for ByteRenderer {
    fn render(&self, user_turns: &[String], answers: &[Vec<u32>]) -> Result<Vec<u32>, RenderError> {
        let mut ids = vec![1u32];
        for (i, user) in user_turns.iter().take(answers.len() + 1).enumerate() {
            ids.push(3);
            ids.extend(user.bytes().map(|b| 10 + u32::from(b) % 200));
            ids.push(4);
            if let Some(a) = answers.get(i) {
                ids.extend_from_slice(a);
                ids.push(5);
            }
        }
        let mut calls = self.calls.borrow_mut();
        if let Some(n) = self.drift_after {
            if calls.len() >= n {
                ids.push(7 + calls.len() as u32 % 50);
            }
        }
        calls.push((answers.len() + 1, answers.to_vec(), ids.clone()));
        Ok(ids)
    }
}

fn bench(name: BenchmarkName, requests: &[(&str, &[&str])]) -> Benchmark {
    Benchmark {
        name,
        source: name.source(),
        requests: requests
            .iter()
            .map(|(id, turns)| BenchRequest {
                id: id.to_string(),
                turns: turns.iter().map(|t| t.to_string()).collect(),
            })
            .collect(),
    }
}

fn two_benchmarks() -> Vec<Benchmark> {
    vec![
        bench(
            BenchmarkName::Gsm8k,
            &[("g1", &["two plus two"]), ("g2", &["a train leaves at noon"])],
        ),
        bench(BenchmarkName::MtBench, &[("81", &["write a poem", "now shorter"])]),
    ]
}

fn cfg(target: &Target, max_new_tokens: usize) -> EvalConfig {
    EvalConfig {
        seed: 3,
        ..EvalConfig::greedy(target, max_new_tokens)
    }
}

/// Counts `begin` calls of the proposer it wraps.
struct Counting<P: Proposer> {
    inner: P,
    begins: std::sync::Arc<std::sync::Mutex<usize>>,
    taps: Vec<usize>,
}

impl<P: Proposer> Proposer for Counting<P> {
    fn block_size(&self) -> usize {
        self.inner.block_size()
    }
    fn target_layer_ids(&self) -> &[usize] {
        &self.taps
    }
    fn begin(&mut self, target: &Target, prompt_ids: &[u32], features: Option<&candle_core::Tensor>) -> Result<(), SpecError> {
        *self.begins.lock().unwrap() += 1;
        self.inner.begin(target, prompt_ids, features)
    }
    fn propose(&mut self, target: &Target, last_token: u32, start: usize) -> Result<Draft, SpecError> {
        self.inner.propose(target, last_token, start)
    }
    fn commit(&mut self, tokens: &[u32], features: Option<&candle_core::Tensor>, start: usize) -> Result<(), SpecError> {
        self.inner.commit(tokens, features, start)
    }
}

#[derive(Default)]
struct CountingObserver {
    starts: usize,
    total: usize,
    done: usize,
}

impl EvalObserver for CountingObserver {
    fn start(&mut self, total: usize) {
        self.starts += 1;
        self.total = total;
    }
    fn turn_done(&mut self, _record: &RequestRecord, running_tau: f64) {
        assert!(running_tau >= 1.0, "a running τ is at least 1");
        self.done += 1;
    }
}

fn of<'a>(records: &'a [RequestRecord], drafter: &str) -> Vec<&'a RequestRecord> {
    records.iter().filter(|r| r.drafter == drafter).collect()
}

#[test]
fn drafters_reproduce_ar_at_t0_and_no_request_is_flagged() {
    let target = target("qwen3");
    let renderer = ByteRenderer::default();
    let mut drafters = vec![
        EvalDrafter::new("random", Box::new(RandomProposer::uniform(4, 1))),
        EvalDrafter::new("fixed", Box::new(FixedProposer::new(3, 17))),
    ];
    let res = runner::run(&target, &renderer, &mut drafters, &two_benchmarks(), &cfg(&target, 12), &mut Silent).unwrap();
    assert!(res.exactness_checked);
    assert_eq!(res.exact_mismatches, 0);
    let ar = of(&res.records, AR_LABEL);
    assert_eq!(ar.len(), 4, "2 gsm8k requests + 2 MT-Bench turns");
    for label in ["random", "fixed"] {
        let recs = of(&res.records, label);
        assert_eq!(recs.len(), 4);
        for (r, a) in recs.iter().zip(&ar) {
            assert_eq!(
                (r.benchmark.as_str(), r.id.as_str(), r.turn),
                (a.benchmark.as_str(), a.id.as_str(), a.turn)
            );
            assert_eq!(r.tokens, a.tokens, "{label} {} turn {}", r.id, r.turn);
            assert_eq!(r.exact_match_vs_ar, Some(true));
            assert_eq!(r.tokens.len(), 12);
        }
        let run = res.run(label).unwrap();
        assert_eq!(run.benchmarks.len(), 2);
        assert_eq!(
            run.benchmark(BenchmarkName::MtBench).unwrap().requests,
            2,
            "each MT-Bench turn is one request"
        );
        assert_eq!(run.average.requests, 4);
    }
    assert!(ar.iter().all(|r| r.exact_match_vs_ar.is_none() && r.tau == 1.0));
    // A uniform random drafter over 256 ids is almost never right; a fixed drafter drafts 2 per cycle.
    let fixed = res.run("fixed").unwrap();
    assert_eq!(fixed.block_size, 3);
    assert_eq!(fixed.average.accept_per_position.len(), 2);
}

#[test]
fn a_run_whose_tokens_differ_from_ar_is_flagged_and_counted() {
    let target = target("qwen3");
    // Every render after the first (the context check's) gets an extra token that depends on the
    // call, so the drafter's prompt differs from AR's.
    let renderer = ByteRenderer {
        drift_after: Some(1),
        ..Default::default()
    };
    let mut drafters = vec![EvalDrafter::new("fixed", Box::new(FixedProposer::new(3, 17)))];
    let benchmarks = vec![bench(BenchmarkName::HumanEval, &[("h1", &["def f(x):"])])];
    let res = runner::run(&target, &renderer, &mut drafters, &benchmarks, &cfg(&target, 16), &mut Silent).unwrap();
    let ar = &of(&res.records, AR_LABEL)[0];
    let d = &of(&res.records, "fixed")[0];
    let differ = ar.tokens != d.tokens;
    assert!(
        differ,
        "the drifting renderer must change the drafter's output for this test to mean anything"
    );
    assert_eq!(d.exact_match_vs_ar, Some(false));
    assert_eq!(res.exact_mismatches, 1);
    assert_eq!(
        res.run("fixed")
            .unwrap()
            .benchmark(BenchmarkName::HumanEval)
            .unwrap()
            .exact_mismatches,
        1
    );
    assert_eq!(res.mismatched_records().count(), 1);
}

#[test]
fn one_ar_baseline_serves_every_drafter() {
    let target = target("qwen3");
    let renderer = ByteRenderer::default();
    let begins = std::sync::Arc::new(std::sync::Mutex::new(0));
    let mut drafters: Vec<EvalDrafter> = (0..3)
        .map(|i| {
            let p = Counting {
                inner: RandomProposer::uniform(2 + i, i as u64),
                begins: begins.clone(),
                taps: vec![],
            };
            EvalDrafter::new(format!("d{i}"), Box::new(p))
        })
        .collect();
    let mut obs = CountingObserver::default();
    let res = runner::run(&target, &renderer, &mut drafters, &two_benchmarks(), &cfg(&target, 8), &mut obs).unwrap();
    // 4 turns: AR generates each once, whatever the number of drafters; each drafter once too.
    assert_eq!(res.ar_generations, 4);
    assert_eq!(of(&res.records, AR_LABEL).len(), 4);
    // Each drafter: one untimed warm-up generation, then the 4 turns.
    assert_eq!(*begins.lock().unwrap(), 3 * (1 + 4));
    assert_eq!((obs.starts, obs.total, obs.done), (1, 4 * 4, 4 * 4));
    assert_eq!(res.runs.len(), 3);
    // Every run is compared with the same AR figures, and its speedup is the ratio of decode times.
    for name in [BenchmarkName::Gsm8k, BenchmarkName::MtBench] {
        let ar_ms: f64 = res
            .records
            .iter()
            .filter(|r| r.drafter == AR_LABEL && r.benchmark == name.as_str())
            .map(|r| r.decode_ms)
            .sum();
        let first = res.runs[0].benchmark(name).unwrap().ar_tokens_per_s;
        for run in &res.runs {
            let b = run.benchmark(name).unwrap();
            assert_eq!(b.ar_tokens_per_s, first);
            assert!((b.ar_decode_ms - ar_ms).abs() < 1e-9);
            let spec_ms: f64 = res
                .records
                .iter()
                .filter(|r| r.drafter == run.drafter && r.benchmark == name.as_str())
                .map(|r| r.decode_ms)
                .sum();
            assert!((b.speedup - ar_ms / spec_ms).abs() < 1e-9, "{} {name}", run.drafter);
        }
    }
}

#[test]
fn mtbench_second_turn_is_conditioned_on_the_run_s_own_first_answer() {
    let target = target("qwen3");
    let renderer = ByteRenderer::default();
    // Residual rejection with a random drafter's own q samples other tokens than plain AR sampling,
    // so the drafter's first answer differs from AR's and the test can tell whose answer turn 2 saw.
    let mut p = RandomProposer::uniform(4, 9);
    p.report_probs = true;
    let mut drafters = vec![EvalDrafter::new("random", Box::new(p))];
    let cfg = EvalConfig {
        temperature: 1.0,
        accept_rule: AcceptRule::Residual,
        ..cfg(&target, 10)
    };
    let benchmarks = vec![bench(
        BenchmarkName::MtBench,
        &[("81", &["write a poem", "now shorter"]), ("82", &["plan a trip", "add a day"])],
    )];
    let res = runner::run(&target, &renderer, &mut drafters, &benchmarks, &cfg, &mut Silent).unwrap();
    assert!(!res.exactness_checked, "no exactness check at T > 0");
    assert_eq!(res.exact_mismatches, 0);
    let calls = renderer.calls.borrow();
    let mut own_answers_differ = false;
    for id in ["81", "82"] {
        let ar1 = res
            .records
            .iter()
            .find(|r| r.drafter == AR_LABEL && r.id == id && r.turn == 1)
            .unwrap();
        let d1 = res
            .records
            .iter()
            .find(|r| r.drafter == "random" && r.id == id && r.turn == 1)
            .unwrap();
        own_answers_differ |= ar1.tokens != d1.tokens;
        for first in [ar1, d1] {
            let second = res
                .records
                .iter()
                .find(|r| r.drafter == first.drafter && r.id == id && r.turn == 2)
                .unwrap();
            // The turn-2 render of this run received exactly its own turn-1 tokens, and the
            // prompt it generated from has that render's length.
            let render = calls
                .iter()
                .find(|(turn, answers, ids)| *turn == 2 && answers[0] == first.tokens && ids.len() == second.prompt_len)
                .unwrap_or_else(|| panic!("{} {id}: no turn-2 prompt built on its own first answer", first.drafter));
            let ids = &render.2;
            let at = ids.windows(first.tokens.len()).position(|w| w == first.tokens.as_slice());
            assert!(at.is_some(), "turn-2 prompt holds the first answer");
            assert_eq!(render.1.len(), 1);
        }
    }
    assert!(
        own_answers_differ,
        "the drafter's own answers must differ from AR's somewhere for this test to discriminate"
    );
}

#[test]
fn requests_that_do_not_fit_the_context_are_skipped_for_every_run_and_counted() {
    let target = target("qwen3"); // 512 positions
    let renderer = ByteRenderer::default();
    let long = "x".repeat(470);
    let mut drafters = vec![EvalDrafter::new("fixed", Box::new(FixedProposer::new(8, 17)))];
    let benchmarks = vec![
        bench(BenchmarkName::Alpaca, &[("short", &["hello"]), ("long", &[long.as_str()])]),
        // Turn 1 fits; turn 2 (with turn 1's answer at up to 40 tokens) does not.
        bench(BenchmarkName::MtBench, &[("two", &[&"y".repeat(200), &"z".repeat(230)])]),
    ];
    let res = runner::run(&target, &renderer, &mut drafters, &benchmarks, &cfg(&target, 40), &mut Silent).unwrap();
    assert_eq!(res.skipped_requests(BenchmarkName::Alpaca), 1);
    assert_eq!(res.skipped_requests(BenchmarkName::MtBench), 1);
    assert!(res.skipped.iter().all(|s| s.turn.is_none()));
    assert!(res.skipped.iter().any(|s| s.id == "long" && s.reason.contains("context")));
    assert!(res.records.iter().all(|r| r.id == "short"), "nothing of a skipped request runs");
    assert_eq!(res.evaluated, vec![(BenchmarkName::Alpaca, 1), (BenchmarkName::MtBench, 0)]);
    let run = res.run("fixed").unwrap();
    assert_eq!(run.benchmark(BenchmarkName::MtBench).unwrap().requests, 0);
    assert_eq!(run.average.requests, 1, "the average covers benchmarks with requests");
}

#[test]
fn a_drafter_at_a_lower_block_size_drafts_at_most_b_minus_1_tokens_and_stays_exact() {
    use specauf::drafter::{AnyDrafter, DFlashInitConfig, DrafterInit, DrafterKind};
    let target = target("llama");
    let renderer = ByteRenderer::default();
    let init = DrafterInit { kind: DrafterKind::DFlash, backbone: DFlashInitConfig::new(1, 8, 0), gru_hidden_dim: None, emb_dim: None };
    let trained = AnyDrafter::init_random(target.config(), &init, 3).unwrap();
    // The same weights on blocks of 3 (the CLI's --block-size): [last, MASK, MASK], 2 drafts.
    let lowered = trained.clone().at_block_size(3).unwrap();
    assert_eq!(lowered.block_size(), 3);
    let same = trained.named_vars().iter().zip(lowered.named_vars()).all(|((a, x), (b, y))| {
        a == &b && x.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap() == y.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    });
    assert!(same, "lowering the block size must keep every weight");
    let mut drafters = vec![EvalDrafter::new("dflash-b3", lowered.into_proposer())];
    let res = runner::run(&target, &renderer, &mut drafters, &two_benchmarks(), &cfg(&target, 12), &mut Silent).unwrap();
    let recs = of(&res.records, "dflash-b3");
    assert!(recs.iter().all(|r| r.draft_lengths.iter().all(|&k| k <= 2)));
    assert!(recs.iter().all(|r| r.accept_lengths.iter().all(|&a| (1..=3).contains(&a))));
    assert_eq!(res.run("dflash-b3").unwrap().block_size, 3);
    assert_eq!(res.exact_mismatches, 0);
    // Only lowering is possible, and a block holds at least [last, MASK].
    for bad in [9usize, 1] {
        let e = trained.clone().at_block_size(bad).err().expect("refused");
        assert!(e.to_string().contains(&bad.to_string()), "{e}");
    }
}

#[test]
fn bad_inputs_fail_before_any_generation() {
    let target = target("qwen3");
    let begins = std::sync::Arc::new(std::sync::Mutex::new(0));
    let counting = |b: usize, taps: Vec<usize>| -> Box<dyn Proposer> {
        Box::new(Counting {
            inner: FixedProposer::new(b, 3),
            begins: begins.clone(),
            taps,
        })
    };
    let ok = two_benchmarks();
    let check = |mut drafters: Vec<EvalDrafter>, benchmarks: &[Benchmark], cfg: EvalConfig| -> EvalError {
        let renderer = ByteRenderer::default();
        let mut obs = CountingObserver::default();
        let e = runner::run(&target, &renderer, &mut drafters, benchmarks, &cfg, &mut obs).expect_err("must fail");
        assert_eq!(obs.starts, 0, "{e}: the observer started");
        e
    };
    let c = cfg(&target, 8);

    let e = check(vec![], &[], c.clone());
    assert!(matches!(e, EvalError::NoBenchmarks), "{e}");
    let empty = vec![bench(BenchmarkName::Mbpp, &[])];
    let e = check(vec![], &empty, c.clone());
    assert!(
        matches!(e, EvalError::EmptyBenchmark { .. }) && e.to_string().contains("mbpp"),
        "{e}"
    );
    let twice = vec![ok[0].clone(), ok[0].clone()];
    let e = check(vec![], &twice, c.clone());
    assert!(matches!(e, EvalError::DuplicateBenchmark { .. }), "{e}");
    let e = check(
        vec![
            EvalDrafter::new("a", counting(4, vec![])),
            EvalDrafter::new("a", counting(4, vec![])),
        ],
        &ok,
        c.clone(),
    );
    assert!(matches!(e, EvalError::DuplicateLabel { .. }), "{e}");
    let e = check(vec![EvalDrafter::new(AR_LABEL, counting(4, vec![]))], &ok, c.clone());
    assert!(matches!(e, EvalError::ReservedLabel), "{e}");
    // A drafter trained for a deeper target (the fixture has 4 layers).
    let e = check(vec![EvalDrafter::new("deep", counting(4, vec![1, 9]))], &ok, c.clone());
    assert!(matches!(e, EvalError::TapOutOfRange { layer: 9, layers: 4, .. }), "{e}");
    let e = check(vec![EvalDrafter::new("zero", counting(0, vec![]))], &ok, c.clone());
    assert!(matches!(e, EvalError::ZeroBlockSize { .. }), "{e}");
    let e = check(
        vec![],
        &ok,
        EvalConfig {
            max_new_tokens: 0,
            ..c.clone()
        },
    );
    assert!(matches!(e, EvalError::InvalidConfig { .. }), "{e}");
    let e = check(
        vec![],
        &ok,
        EvalConfig {
            temperature: -1.0,
            ..c.clone()
        },
    );
    assert!(matches!(e, EvalError::InvalidConfig { .. }), "{e}");
    let e = check(
        vec![EvalDrafter::new("a", counting(4, vec![]))],
        &ok,
        EvalConfig {
            max_new_tokens: 600,
            ..c.clone()
        },
    );
    assert!(matches!(e, EvalError::NothingFits { .. }), "{e}");
    assert_eq!(*begins.lock().unwrap(), 0, "no drafter began a request");
    assert!("gsm9k".parse::<BenchmarkName>().unwrap_err().to_string().contains("valid names"));
}

#[test]
fn a_dflash_drafter_reproduces_ar_through_the_runner() {
    use specauf::drafter::{DFlashDrafter, DFlashProposer};
    let target = target("qwen3");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dflash/tiny-qwen3-b4");
    let d = DFlashDrafter::load(&dir, target.config()).unwrap();
    let mut drafters = vec![EvalDrafter::new("dflash", Box::new(DFlashProposer::new(d)))];
    let renderer = ByteRenderer::default();
    let res = runner::run(&target, &renderer, &mut drafters, &two_benchmarks(), &cfg(&target, 16), &mut Silent).unwrap();
    assert_eq!(res.exact_mismatches, 0);
    let run = res.run("dflash").unwrap();
    assert_eq!(run.block_size, 4);
    assert_eq!(run.average.accept_per_position.len(), 3);
    for r in of(&res.records, "dflash") {
        assert_eq!(r.exact_match_vs_ar, Some(true), "{} turn {}", r.id, r.turn);
        assert!(r.draft_lengths.iter().all(|&k| k == 3));
    }
}

/// Keeps every finished request, and on a second run hands back those it was told to resume.
#[derive(Default)]
struct Journaling {
    entries: Vec<runner::RequestEntry>,
    resume_from: Vec<runner::RequestEntry>,
    resumed: usize,
}

impl EvalObserver for Journaling {
    fn resumed(&mut self, benchmark: BenchmarkName, id: &str) -> Option<runner::RequestEntry> {
        let i = self.resume_from.iter().position(|e| e.benchmark == benchmark.to_string() && e.id == id)?;
        self.resumed += 1;
        Some(self.resume_from.remove(i))
    }
    fn request_done(&mut self, entry: &runner::RequestEntry) -> Result<(), EvalError> {
        self.entries.push(entry.clone());
        Ok(())
    }
}

#[test]
fn an_interrupted_evaluation_resumes_from_its_finished_requests_without_running_them_again() {
    let target = target("qwen3");
    let renderer = ByteRenderer::default();
    let begins = std::sync::Arc::new(std::sync::Mutex::new(0usize));
    let mut drafters = vec![EvalDrafter::new(
        "fixed",
        Box::new(Counting { inner: FixedProposer::new(3, 17), begins: begins.clone(), taps: vec![] }),
    )];
    let benchmarks = two_benchmarks();
    let mut first = Journaling::default();
    let full = runner::run(&target, &renderer, &mut drafters, &benchmarks, &cfg(&target, 12), &mut first).unwrap();
    assert_eq!(first.entries.len(), 3, "one entry per request");
    let begins_full = *begins.lock().unwrap();

    // "Interrupted" after the first two requests: the second run gets those two back.
    let mut second = Journaling { resume_from: first.entries[..2].to_vec(), ..Default::default() };
    *begins.lock().unwrap() = 0;
    let resumed = runner::run(&target, &renderer, &mut drafters, &benchmarks, &cfg(&target, 12), &mut second).unwrap();
    assert_eq!(second.resumed, 2);
    assert_eq!(second.entries.len(), 1, "only the unfinished request is run and recorded");
    let begins_resumed = *begins.lock().unwrap();
    assert!(begins_resumed < begins_full, "resumed requests must not be generated again ({begins_resumed} vs {begins_full} begins)");
    // Same records, hence the same figures (τ, tokens; timings of the resumed requests are theirs).
    assert_eq!(resumed.records.len(), full.records.len());
    for (a, b) in resumed.records.iter().zip(&full.records) {
        assert_eq!((&a.benchmark, &a.id, a.turn, &a.drafter, &a.tokens, a.tau), (&b.benchmark, &b.id, b.turn, &b.drafter, &b.tokens, b.tau));
    }
    for (a, b) in resumed.records.iter().take(4).zip(&full.records) {
        assert_eq!(a.decode_ms, b.decode_ms, "a resumed record is taken as it was measured");
    }
    assert_eq!(resumed.exact_mismatches, 0);
    assert_eq!(resumed.ar_generations, full.ar_generations);
}
