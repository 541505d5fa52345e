//! `candor train RECIPE`: LoRA fine-tuning as the recipe describes it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::recipe::Recipe;
use crate::train::trainer::{train, TrainOptions};

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// The recipe file (see recipes/).
    pub recipe: std::path::PathBuf,
    /// Override a recipe field: --set optim.lr=1e-4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Continue from the newest complete checkpoint of this run.
    #[arg(long)]
    pub resume: bool,
    /// No progress bar: one log line per step (for CI logs).
    #[arg(long, short)]
    pub quiet: bool,
}

/// Exit code after Ctrl-C (128 + SIGINT), once the checkpoint is written.
pub const INTERRUPTED_EXIT: i32 = 130;

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let recipe = Recipe::load(&args.recipe, &args.set)?;
    eprintln!("── resolved recipe ──\n{}────", recipe.to_toml());
    if recipe.model.device == "cpu" {
        eprintln!("cpu matrix products: {}", crate::ops::openblas::describe());
        if let Some(note) = super::cpu_half_note(&recipe.model.dtype) {
            eprintln!("{note}");
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(INTERRUPTED_EXIT);
        }
        eprintln!("\ninterrupt: finishing this step and writing a checkpoint (Ctrl-C again to quit now)");
    });
    let summary = train(&recipe, &TrainOptions { resume: args.resume, quiet: args.quiet, stop })?;
    eprintln!(
        "done: {} steps, final loss {}, {:.1} s, {:.1} tokens/s, peak RSS {:.2} GB",
        summary.steps,
        summary.final_loss.map_or("-".into(), |l| format!("{l:.4}")),
        summary.wall_s,
        summary.tokens_per_s,
        super::bench::peak_rss_bytes() as f64 / 1e9
    );
    eprintln!("run directory: {}", recipe.run_dir().display());
    eprintln!("  metrics: {}", recipe.run_dir().join("metrics.jsonl").display());
    if let Some(c) = &summary.last_checkpoint {
        eprintln!("  last checkpoint: {}", c.display());
    }
    if summary.interrupted {
        std::process::exit(INTERRUPTED_EXIT);
    }
    let out = recipe.run_dir().join("merged");
    let Some(ckpt) = summary.last_checkpoint.as_ref().filter(|_| recipe.export.at_end) else {
        return Ok(());
    };
    if summary.steps_this_run == 0 && out.exists() {
        // a resumed run that had finished: merged/ only ever appears complete (staged, then renamed)
        eprintln!("  merged model: {} (from an earlier call; nothing trained since)", out.display());
        return Ok(());
    }
    // exported when this call trained, or when a finished run's export never completed; a merged
    // model from an earlier run is replaced only once this one is written and verified
    super::release_freed_memory();
    super::export::run(super::export::ExportArgs {
        checkpoint: ckpt.clone(),
        out: out.clone(),
        overwrite: true,
        dtype: recipe.export.dtype.clone(),
        adapter_only: false,
        verify: recipe.export.verify,
    })?;
    eprintln!("  merged model: {}", out.display());
    Ok(())
}
