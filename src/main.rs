//! The `specauf` command line: one file per command under src/cli/.

mod cli;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "specauf", version, about = "Train masked block drafters (DFlash, Domino) with Accept-Until-Fail, and run exact speculative decoding with them", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download and verify the embedded default model and the data sets (into $SPECAUF_HOME).
    Fetch(cli::fetch::FetchArgs),
    /// Generate text with a target model, optionally with speculative decoding.
    Generate(cli::generate::GenerateArgs),
    /// Tokenize chat data (optionally regenerating answers with the target) into training shards.
    Prepare(cli::prepare::PrepareArgs),
    /// Write an untrained DFlash drafter for a target.
    InitDrafter(cli::init_drafter::InitDrafterArgs),
    /// Write a drafter's draft vocabulary (the target's tokens ranked by their count in a dataset).
    DraftVocab(cli::draft_vocab::DraftVocabArgs),
    /// Train a drafter (DFlash, Domino) with AUF or a baseline objective.
    Train(cli::train::TrainArgs),
    /// Evaluate drafters against plain AR on the six benchmarks: τ, acceptance, speedup.
    Eval(cli::eval::EvalArgs),
    /// The whole pipeline on the embedded default: fetch, prepare, train (AUF), evaluate.
    Quickstart(cli::quickstart::QuickstartArgs),
    /// Reproduce the paper's comparison at small scale (`experiment paper`).
    Experiment(cli::experiment::ExperimentArgs),
    /// Benchmarks (not timed tests): decode speed, training step speed, server load.
    Bench(cli::bench::BenchArgs),
    /// An OpenAI-compatible HTTP server (chat/completions, completions, models, health, metrics).
    Serve(cli::serve::ServeArgs),
}

fn main() {
    // Both before any thread exists. One malloc arena: see its doc (a training step's
    // temporaries otherwise come back as fresh pages every step).
    specauf::util::measure::single_malloc_arena();
    // candle's elementwise thread pool spins 25 000 rounds (about half a millisecond) after each
    // op before it sleeps; on two cores that spinning thread takes a core from the next op's
    // products. 200 rounds: `bench train` forward 55–57 ms instead of 63–71 (decay, bf16
    // products, alternating runs). A user's own setting wins.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "200");
    }
    let cli = Cli::parse();
    // Work reached from anywhere (the asset fetcher on a model's first use) reports here.
    specauf::util::progress::set_global(std::sync::Arc::new(cli::progress::Bars::new()));
    let result = match cli.command {
        Command::Fetch(a) => cli::fetch::run(a),
        Command::Generate(a) => cli::generate::run(a),
        Command::Prepare(a) => cli::prepare::run(a),
        Command::Train(a) => cli::train::run(a),
        Command::InitDrafter(a) => cli::init_drafter::run(a),
        Command::DraftVocab(a) => cli::draft_vocab::run(a),
        Command::Eval(a) => cli::eval::run(a),
        Command::Quickstart(a) => cli::quickstart::run(a),
        Command::Experiment(a) => cli::experiment::run(a),
        Command::Bench(a) => cli::bench::run(a),
        Command::Serve(a) => cli::serve::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {}", cli::error_text(&e));
        std::process::exit(1);
    }
}
