//! The decode loop at T > 0: sample-and-match reproduces plain AR sampling seed for seed, and
//! the first two generated tokens follow the target's exact (temperature, top-p) distribution
//! for plain AR, sample-and-match and residual rejection sampling, whatever the drafter.

mod spec_support;

use spec_support::{chi_square, chi_square_critical, exact_first_two, prompt, target, FAMILIES};
use specauf::model::Target;
use specauf::spec::{
    generate, AcceptRule, FixedProposer, GenerateConfig, Generation, OracleErrors, OracleProposer, Proposer, RandomProposer, SamplingParams,
};

fn sampled_cfg(max_new_tokens: usize, params: SamplingParams, seed: u64, rule: AcceptRule) -> GenerateConfig {
    GenerateConfig {
        max_new_tokens,
        temperature: params.temperature,
        top_p: params.top_p,
        seed,
        eos_token_ids: vec![],
        accept_rule: rule,
    }
}

#[test]
fn sample_and_match_reproduces_plain_ar_sampling_with_the_same_seed() {
    let n = 20;
    let mut accepted = 0;
    for family in FAMILIES {
        let target = target(family);
        for (i, params) in [
            SamplingParams {
                temperature: 0.8,
                top_p: 1.0,
            },
            SamplingParams {
                temperature: 1.0,
                top_p: 0.9,
            },
        ]
        .into_iter()
        .enumerate()
        {
            for seed in 0..3u64 {
                let prompt = prompt(3 + 4 * i, seed as u32);
                let cfg = sampled_cfg(n, params, seed, AcceptRule::SampleMatch);
                let ar = generate(&target, None, &prompt, &cfg).unwrap();
                // A different seed gives a different sample: the comparison below is not vacuous.
                let other = generate(&target, None, &prompt, &sampled_cfg(n, params, seed + 100, AcceptRule::SampleMatch)).unwrap();
                assert_ne!(ar.token_ids, other.token_ids, "{family} seed {seed}");
                for b in [2usize, 4, 8] {
                    let mut proposers: Vec<Box<dyn Proposer>> = vec![
                        Box::new(RandomProposer::uniform(b, seed)),
                        Box::new(FixedProposer::new(b, ar.token_ids[n / 2])),
                        // The sample itself, spoiled at some positions.
                        Box::new(OracleProposer::new(b, ar.token_ids.clone(), OracleErrors::Rate { rate: 0.3, seed })),
                    ];
                    for p in proposers.iter_mut() {
                        let out = generate(&target, Some(p.as_mut()), &prompt, &cfg).unwrap();
                        assert_eq!(out.token_ids, ar.token_ids, "{family} {params:?} seed {seed} B={b}");
                        accepted += out.accept_lengths.iter().filter(|&&a| a > 1).count();
                    }
                }
            }
        }
    }
    assert!(accepted > 50, "only {accepted} cycles accepted a draft token");
}

/// The first two generated tokens of `samples` runs (seeds 0..samples), each with the proposer
/// `make(seed)` builds, and how many of the runs' single cycles accepted a draft token. A new
/// proposer per run: residual rejection is exact only if the drafts are fresh draws from q.
fn first_two_tokens(
    target: &Target,
    prompt: &[u32],
    params: SamplingParams,
    rule: AcceptRule,
    make: &dyn Fn(u64) -> Option<Box<dyn Proposer>>,
    samples: u64,
) -> (Vec<(u32, u32)>, usize) {
    let mut pairs = Vec::with_capacity(samples as usize);
    let mut accepting_cycles = 0;
    for seed in 0..samples {
        let cfg = sampled_cfg(2, params, seed, rule);
        let mut proposer = make(seed);
        let mut generation = Generation::start(target, proposer.as_mut().map(|p| p.as_mut() as &mut dyn Proposer), prompt, &cfg).unwrap();
        let cycle = generation.step().unwrap();
        accepting_cycles += usize::from(cycle.accepted > 0);
        let c = generation.committed();
        pairs.push((c[0], c[1]));
    }
    (pairs, accepting_cycles)
}

const SAMPLES: u64 = 1500;
/// z = 4.75: a false alarm at p ≈ 1e-6 per comparison.
const Z: f64 = 4.75;
const PARAMS: SamplingParams = SamplingParams {
    temperature: 0.7,
    top_p: 0.8,
};

fn assert_matches_exact(what: &str, cells: &[(u32, u32, f64)], pairs: &[(u32, u32)]) {
    let (stat, df) = chi_square(cells, pairs);
    let critical = chi_square_critical(df, Z);
    assert!(df >= 10, "{what}: only {df} degrees of freedom; the test would have little power");
    assert!(
        stat < critical,
        "{what}: chi-square {stat:.1} ≥ {critical:.1} (df {df}): the samples do not follow the target's distribution"
    );
}

/// The most likely second token overall: a fixed draft that is right now and then.
fn likeliest_second(cells: &[(u32, u32, f64)]) -> u32 {
    let mut marginal = [0f64; 256];
    cells.iter().for_each(|&(_, t2, p)| marginal[t2 as usize] += p);
    (0..256u32)
        .max_by(|&a, &b| marginal[a as usize].total_cmp(&marginal[b as usize]))
        .unwrap_or(0)
}

#[test]
fn plain_ar_sampling_follows_the_exact_target_distribution() {
    let target = target("qwen2");
    let prompt = prompt(3, 0);
    let cells = exact_first_two(&target, &prompt, PARAMS);
    let (pairs, _) = first_two_tokens(&target, &prompt, PARAMS, AcceptRule::SampleMatch, &|_| None, SAMPLES);
    assert_matches_exact("plain AR", &cells, &pairs);
    // Power: the same samples are far from the distribution of other sampling parameters.
    let wrong = exact_first_two(
        &target,
        &prompt,
        SamplingParams {
            temperature: 0.9,
            top_p: 1.0,
        },
    );
    let (stat, df) = chi_square(&wrong, &pairs);
    assert!(
        stat > chi_square_critical(df, Z),
        "chi-square {stat:.1} (df {df}) cannot tell T=0.7/top-p 0.8 from T=0.9"
    );
}

#[test]
fn sample_and_match_with_a_bad_drafter_follows_the_exact_target_distribution() {
    let target = target("qwen2");
    let prompt = prompt(3, 0);
    let cells = exact_first_two(&target, &prompt, PARAMS);
    let likely = likeliest_second(&cells);
    let make = |_| Some(Box::new(FixedProposer::new(4, likely)) as Box<dyn Proposer>);
    let (pairs, accepting) = first_two_tokens(&target, &prompt, PARAMS, AcceptRule::SampleMatch, &make, SAMPLES);
    assert!(
        accepting > SAMPLES as usize / 20,
        "only {accepting} cycles accepted a draft: the accept path is barely exercised"
    );
    assert!(
        accepting < SAMPLES as usize,
        "every cycle accepted: the reject path is not exercised"
    );
    assert_matches_exact("sample-and-match, fixed drafter", &cells, &pairs);
}

#[test]
fn residual_rejection_with_drafter_probabilities_follows_the_exact_target_distribution() {
    let target = target("qwen2");
    let prompt = prompt(3, 0);
    let cells = exact_first_two(&target, &prompt, PARAMS);

    // A skewed q: heavy on a few plausible second tokens, light on everything else, so drafts
    // are sometimes accepted (p/q ≥ u) and often resampled from the residual.
    let likely = likeliest_second(&cells);
    let mut q = vec![0.02f32; 256];
    for &(_, t2, _) in cells.iter().take(6) {
        q[t2 as usize] = 1.0;
    }
    q[likely as usize] = 4.0;
    let make = |seed: u64| {
        let mut drafter = RandomProposer::from_distribution(4, 1000 + seed, q.clone());
        drafter.report_probs = true;
        Some(Box::new(drafter) as Box<dyn Proposer>)
    };
    let (pairs, accepting) = first_two_tokens(&target, &prompt, PARAMS, AcceptRule::Residual, &make, SAMPLES);
    assert!(accepting > SAMPLES as usize / 20, "only {accepting} cycles accepted a draft");
    assert_matches_exact("residual rejection, random drafter with q", &cells, &pairs);

    // A greedy drafter reports one-hot rows: accepted with probability p(draft).
    let make = |_| {
        let mut greedy = FixedProposer::new(4, likely);
        greedy.report_probs = true;
        Some(Box::new(greedy) as Box<dyn Proposer>)
    };
    let (pairs, accepting) = first_two_tokens(&target, &prompt, PARAMS, AcceptRule::Residual, &make, SAMPLES);
    assert!(accepting > SAMPLES as usize / 20, "only {accepting} cycles accepted a draft");
    assert_matches_exact("residual rejection, one-hot drafter", &cells, &pairs);
}

#[test]
fn residual_rule_without_drafter_probabilities_falls_back_to_sample_and_match() {
    let target = target("qwen3");
    let prompt = prompt(5, 1);
    let params = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
    };
    for seed in 0..4 {
        let ar = generate(&target, None, &prompt, &sampled_cfg(16, params, seed, AcceptRule::SampleMatch)).unwrap();
        let mut p = RandomProposer::uniform(4, seed);
        let out = generate(&target, Some(&mut p), &prompt, &sampled_cfg(16, params, seed, AcceptRule::Residual)).unwrap();
        assert_eq!(out.token_ids, ar.token_ids, "seed {seed}");
    }
}
