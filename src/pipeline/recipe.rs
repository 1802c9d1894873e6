//! Named recipes: the budget of the whole pipeline on the embedded default (how many conversations
//! the target answers, how long the drafter trains and from what, how much is evaluated). The
//! quickstart runs one (`specauf quickstart --recipe NAME`); docs/recipe.md holds the
//! measurements each is built from.

use serde::{Deserialize, Serialize};

use crate::data::topic::Topic;
use crate::nn::Precision;

/// The embedded default's (SmolLM2, 30 layers) last two layers: the drafter starts as them, the
/// lever that trained fastest (docs/recipe.md, "target-initialised layers"). Layer 28's input is
/// the layer-27 tap the quickstart's drafter reads, so its context starts exact.
pub const TOP_TWO: [usize; 2] = [28, 29];

/// Target layers every recipe's drafter taps: an early and a late layer of SmolLM2's 30.
pub const TAPS: [usize; 2] = [1, 27];

/// Tokens per block (anchor included) of every recipe's drafter. At the τ these recipes reach,
/// a block's fourth position is almost never accepted, and a block-4 step costs about 0.6 of a
/// block-8 one at the same τ per step (docs/recipe.md, "Lever 18: a smaller block").
pub const RECIPE_BLOCK: usize = 4;

/// The recipes `specauf quickstart --recipe` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecipeName {
    /// The README's first command: the whole pipeline in well under 15 minutes on 2 cores.
    #[serde(rename = "quick")]
    Quick,
    /// The best drafter this project measured for 60 minutes on 2 cores, data regeneration and
    /// feature extraction included.
    #[serde(rename = "cpu-60min")]
    Cpu60Min,
}
crate::named_enum!(RecipeName, "recipe", ["quick", "cpu-60min"]);

/// One recipe's numbers. A quickstart folder records the ones it was made with (`recipe.json`),
/// so that a rerun with other numbers is refused instead of reporting the old run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Recipe {
    pub name: RecipeName,
    /// ShareGPT conversations whose first turn the target answers (greedy, ≤ 96 new tokens).
    pub conversations: usize,
    /// After the first `topics_after` conversations (in file order), only those on these topics
    /// (`prepare --topics`); None: the first `conversations` in file order.
    pub topics: Option<Vec<Topic>>,
    pub topics_after: usize,
    /// Optimizer steps.
    pub steps: u64,
    /// Sequences per step.
    pub batch_sequences: usize,
    /// Anchors (blocks) per sequence.
    pub num_anchors: usize,
    /// Peak learning rate (cosine schedule).
    pub lr: f64,
    /// The precision of the step's products (the head's and the drafter layers'): bf16 runs them
    /// on AVX512-BF16 where the CPU has it (the same drafter over four seeds, 1.4× cheaper a
    /// step; docs/recipe.md), and f32 elsewhere.
    pub products: Precision,
    /// Drafter depth.
    pub layers: usize,
    /// Tokens per block, anchor included: the largest B the drafter can run at.
    pub block_size: usize,
    /// Target layers the drafter's layers start as (one per layer), or None for random.
    pub init_layers_from_target: Option<Vec<usize>>,
    /// Prompts per benchmark in the evaluation.
    pub limit: usize,
    /// New tokens per evaluation request.
    pub max_new_tokens: usize,
    /// The whole run's wall-clock budget in minutes (None: none). Training is timed and stops
    /// early where its steps would leave less than `eval_reserve_s` for the evaluation, its
    /// learning rate decaying over the steps that fit. Not recorded in `recipe.json`: it bounds
    /// how long a run may take, and a rerun applies its own.
    #[serde(skip)]
    pub minutes: Option<f64>,
    /// Seconds the budget keeps for what follows training (the untrained drafter, the
    /// evaluation and its report).
    #[serde(skip)]
    pub eval_reserve_s: f64,
    /// The share of the budget after which regeneration starts no more conversations: on a
    /// machine too slow to answer them all in time the data is cut instead of the training
    /// (at a few hundred steps fewer conversations train as well or better, docs/recipe.md
    /// "Lever 7"), and the feature pass shrinks with it.
    #[serde(skip)]
    pub regenerate_share: f64,
}

impl RecipeName {
    pub const DEFAULT: RecipeName = RecipeName::Quick;

    pub fn recipe(self) -> Recipe {
        match self {
            RecipeName::Quick => Recipe {
                name: self,
                // Which conversations: the first 400, then code and maths ones (over three seeds
                // τ 1.333 → 1.373 at B = 8, higher on the code and maths benchmarks; docs/recipe.md,
                // "Lever 15: the data's domain"), 1500 in all.
                // How much: the minutes a block-4 step saves (RECIPE_BLOCK) buy 2000 steps on 1500
                // conversations instead of 1200 on 980: τ at B = 4 1.35 / 1.38 → 1.44 / 1.45 over
                // two seeds (docs/recipe.md, "Lever 18: a smaller block"). bf16 products; f32
                // where the CPU lacks AVX512-BF16.
                conversations: 1500,
                topics: Some(vec![Topic::Code, Topic::Math]),
                topics_after: 400,
                steps: 2000,
                batch_sequences: 2,
                num_anchors: 32,
                lr: 0.002,
                products: Precision::Bf16,
                layers: TOP_TWO.len(),
                block_size: RECIPE_BLOCK,
                init_layers_from_target: Some(TOP_TWO.to_vec()),
                // 4 × 96 rather than 2 × 64: with a drafter near parity, two short requests per
                // benchmark left the measured speedup ±10% of noise (0.81–1.13× per benchmark)
                limit: 4,
                max_new_tokens: 96,
                // The README's promise. On a quiet machine the run takes 11–12 minutes and the
                // budget never binds; on the slowest hours measured (prepare 278 s, training
                // 525 s) it took 14.9 minutes. The evaluation took 54–110 s.
                minutes: Some(15.0),
                eval_reserve_s: 180.0,
                // 3 of the 15 minutes. The AVX-512 machine answers all 1500 in about 150–200 s
                // and never reaches it; a machine without AVX-512 took 298 s for them and 267 s
                // for their features, which left training 383 of its 2000 steps.
                regenerate_share: 0.2,
            },
            RecipeName::Cpu60Min => Recipe {
                name: self,
                // 5000 conversations × 8000 steps. The held-out curve keeps rising past 5000 steps
                // when the data is large (docs/recipe.md, "The hour spent on steps"), and at block 4
                // (RECIPE_BLOCK) the hour holds 8000 steps on 5000 conversations where at block 8
                // it held 5000 on 3000: τ at B = 4 1.521 → 1.554, 44.2 min end to end
                // (docs/recipe.md, "Block 4 at the hour's scale"). bf16 products.
                conversations: 5000,
                topics: None,
                topics_after: 0,
                steps: 8000,
                batch_sequences: 2,
                num_anchors: 32,
                lr: 0.002,
                products: Precision::Bf16,
                layers: TOP_TWO.len(),
                block_size: RECIPE_BLOCK,
                init_layers_from_target: Some(TOP_TWO.to_vec()),
                limit: 8,
                max_new_tokens: 96,
                // The evaluation took 117–190 s.
                minutes: Some(60.0),
                eval_reserve_s: 300.0,
                // 18 of the 60 minutes: the quiet AVX-512 machine's whole prepare took 14.
                regenerate_share: 0.3,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_recipe_is_named_by_what_parses_to_it_and_targets_one_layer_per_drafter_layer() {
        for name in [RecipeName::Quick, RecipeName::Cpu60Min] {
            let r = name.recipe();
            assert_eq!(r.name, name);
            assert_eq!(name.to_string().parse::<RecipeName>().unwrap(), name);
            if let Some(ids) = &r.init_layers_from_target {
                assert_eq!(ids.len(), r.layers);
            }
            // a block of at least 2 rows: the anchor and one token to propose
            assert!(r.block_size >= 2, "{name}: block size {}", r.block_size);
        }
        // the first copied layer's input is a tap, so the initialisation starts its context exact
        assert!(TAPS.contains(&(TOP_TWO[0] - 1)));
        assert!("cpu-90min".parse::<RecipeName>().unwrap_err().contains("quick, cpu-60min"));
    }
}
