//! Batched decoding (`spec::batch`): generations decoded together, their verify forwards in one
//! batched target forward, give token for token (and cycle for cycle) what each gives alone,
//! at T = 0 and at T > 0 with the same seeds, for plain AR and for speculative decoding with
//! any proposer. The targets run in q8 mode, whose forward is batch-invariant.

mod spec_support;

use spec_support::{prompt, reference_greedy, target_in, FAMILIES};
use specauf::drafter::{DFlashDrafter, DFlashInitConfig, DFlashProposer};
use specauf::model::{Target, WeightsMode};
use specauf::spec::{
    generate, generate_batch, step_all, AcceptRule, BatchRequest, FixedProposer, GenerateConfig, GenerateOutput, Generation, OracleErrors,
    OracleProposer, Proposer, RandomProposer, SpecError,
};

fn cfg(max_new_tokens: usize, temperature: f32, seed: u64, eos: &[u32]) -> GenerateConfig {
    GenerateConfig {
        max_new_tokens,
        temperature,
        top_p: if temperature > 0.0 { 0.9 } else { 1.0 },
        seed,
        eos_token_ids: eos.to_vec(),
        accept_rule: AcceptRule::SampleMatch,
    }
}

/// Request `i`'s proposer (None: plain AR); called twice to give the batched and the lone run
/// identical fresh proposers.
fn proposer(target: &Target, i: usize, continuation: &[u32]) -> Option<Box<dyn Proposer>> {
    let layers = target.config().num_hidden_layers;
    match i % 6 {
        0 => None,
        1 => Some(Box::new(RandomProposer::uniform(4, i as u64))),
        2 => Some(Box::new(FixedProposer::new(3, continuation.get(3).copied().unwrap_or(7)))),
        3 => Some(Box::new(OracleProposer::new(8, continuation.to_vec(), OracleErrors::Rate { rate: 0.3, seed: i as u64 }))),
        4 => {
            let mut init = DFlashInitConfig::new(2, 4, 5);
            init.target_layer_ids = Some(vec![0, layers - 1]);
            Some(Box::new(DFlashProposer::new(DFlashDrafter::init_random(target.config(), &init, i as u64).unwrap())))
        }
        _ => None,
    }
}

/// The boxed proposer as the loop takes it (its trait-object lifetime shortened to the borrow).
fn as_dyn(p: &mut Option<Box<dyn Proposer>>) -> Option<&mut dyn Proposer> {
    match p {
        Some(b) => Some(b.as_mut()),
        None => None,
    }
}

/// The requests of one check: prompts of different lengths, limits and proposers.
fn requests(_target: &Target, temperature: f32, eos: &[u32]) -> Vec<(Vec<u32>, GenerateConfig)> {
    (0..11)
        .map(|i| {
            let p = prompt(1 + (i * 5) % 14, i as u32 + 1);
            (p, cfg(6 + (i * 7) % 19, temperature, 100 + i as u64, eos))
        })
        .collect()
}

fn same_run(what: &str, got: &GenerateOutput, want: &GenerateOutput) {
    assert_eq!(got.token_ids, want.token_ids, "{what}: tokens");
    assert_eq!(got.finish_reason, want.finish_reason, "{what}: finish reason");
    assert_eq!(got.accept_lengths, want.accept_lengths, "{what}: accept lengths");
    assert_eq!(got.draft_lengths, want.draft_lengths, "{what}: draft lengths");
}

/// Runs every request alone and in batches of `batches`, and checks they agree.
fn check(family: &str, temperature: f32, eos: &[u32], batches: &[usize]) -> Vec<GenerateOutput> {
    let target = target_in(family, WeightsMode::Q8);
    let reqs = requests(&target, temperature, eos);
    // The continuations the oracle proposers draft from: plain AR output of each request.
    let plain: Vec<Vec<u32>> = reqs.iter().map(|(p, c)| generate(&target, None, p, c).unwrap().token_ids).collect();
    let mut alone_props: Vec<Option<Box<dyn Proposer>>> = (0..reqs.len()).map(|i| proposer(&target, i, &plain[i])).collect();
    let alone: Vec<GenerateOutput> = reqs
        .iter()
        .zip(alone_props.iter_mut())
        .map(|((p, c), prop)| generate(&target, as_dyn(prop), p, c).unwrap())
        .collect();
    for &batch in batches {
        let mut props: Vec<Option<Box<dyn Proposer>>> = (0..reqs.len()).map(|i| proposer(&target, i, &plain[i])).collect();
        let batch_reqs = reqs
            .iter()
            .zip(props.iter_mut())
            .map(|((p, c), prop)| BatchRequest { proposer: as_dyn(prop), prompt_ids: p, cfg: c.clone() })
            .collect();
        let outs = generate_batch(&target, batch_reqs, batch).unwrap();
        for (i, (got, want)) in outs.into_iter().zip(&alone).enumerate() {
            same_run(&format!("{family} T={temperature} batch {batch} request {i}"), &got.unwrap(), want);
        }
    }
    alone
}

#[test]
fn greedy_batched_decoding_equals_each_request_alone() {
    for family in FAMILIES {
        let alone = check(family, 0.0, &[], &[1, 3, 16]);
        // ...which is the target's greedy output (the loop's own contract), and the batch held
        // speculative requests that accepted drafts.
        let target = target_in(family, WeightsMode::Q8);
        let (p, c) = &requests(&target, 0.0, &[])[4];
        assert_eq!(alone[4].token_ids, reference_greedy(&target, p, c.max_new_tokens), "{family}");
        assert!(alone.iter().any(|o| o.accept_lengths.iter().any(|&a| a > 1)), "{family}: no draft was ever accepted");
    }
}

#[test]
fn sampled_batched_decoding_equals_each_request_alone_with_the_same_seeds() {
    for family in FAMILIES {
        check(family, 0.8, &[], &[4, 16]);
    }
}

#[test]
fn generations_that_stop_at_an_eos_leave_the_batch_and_the_others_go_on() {
    // Frequent tokens of the fixtures' greedy outputs as EOS: requests end at different cycles.
    let target = target_in("llama", WeightsMode::Q8);
    let reqs = requests(&target, 0.0, &[]);
    let mut counts = std::collections::HashMap::<u32, usize>::new();
    for (p, c) in &reqs {
        for t in generate(&target, None, p, c).unwrap().token_ids {
            *counts.entry(t).or_default() += 1;
        }
    }
    let mut by_count: Vec<(u32, usize)> = counts.into_iter().collect();
    by_count.sort_by_key(|&(t, n)| (std::cmp::Reverse(n), t));
    let eos = [by_count[0].0];
    let alone = check("llama", 0.0, &eos, &[5]);
    let reasons: Vec<_> = alone.iter().map(|o| o.finish_reason).collect();
    println!("finish reasons with eos {eos:?}: {reasons:?}");
    assert!(reasons.contains(&specauf::spec::FinishReason::Eos));
}

#[test]
fn step_all_reports_each_generations_own_errors_and_refuses_mixed_targets() {
    let target = target_in("qwen2", WeightsMode::Q8);
    let other = target_in("qwen2", WeightsMode::Q8);
    let (p1, p2) = (prompt(4, 1), prompt(7, 2));
    let mut a = Generation::start(&target, None, &p1, &cfg(1, 0.0, 0, &[])).unwrap();
    let mut b = Generation::start(&target, None, &p2, &cfg(5, 0.0, 0, &[])).unwrap();
    a.step().unwrap();
    assert!(a.is_finished());
    let results = step_all(&mut [&mut a, &mut b]).unwrap();
    assert!(matches!(results[0], Err(SpecError::Finished)));
    assert_eq!(results[1].as_ref().unwrap().committed.len(), 1);
    let mut c = Generation::start(&other, None, &p1, &cfg(5, 0.0, 0, &[])).unwrap();
    let err = step_all(&mut [&mut b, &mut c]).unwrap_err();
    assert!(matches!(err, SpecError::MixedTargets), "{err}");
    assert!(step_all(&mut []).unwrap().is_empty());
}
