//! `candor bench train-step`: LoRA forward + backward on a real model, tokens/s and peak memory.

use std::time::Instant;

use crate::model::lora::LoraConfig;
use crate::model::{load_model, TokenBatch};
use crate::train::optim::{collect_grads, AdamW, AdamWConfig};
use rand::{Rng, SeedableRng};

use super::ModelArgs;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// What to measure: train-step (LoRA forward + backward), data (template + tokenize + mask) or
    /// generate (batched generation and a whole evaluation; --data PROMPTS).
    pub what: String,
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Measured steps (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// bench data: the data file whose rows are replicated; bench generate: the prompts.
    #[arg(long)]
    pub data: Option<String>,
    /// bench generate: new tokens per prompt.
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
    /// bench generate: prompts of the whole-evaluation measurement (0 skips it).
    #[arg(long, default_value_t = 64)]
    pub eval_prompts: usize,
    /// bench data: how many rows to prepare.
    #[arg(long, default_value_t = 15_000)]
    pub rows: usize,
    /// train-step: `adamw` adds the optimizer update to each step (as a training run does); `none`
    /// measures forward + backward only.
    #[arg(long, default_value = "none")]
    pub optimizer: String,
    /// train-step: also write the summary as JSON to this file.
    #[arg(long)]
    pub json: Option<String>,
    /// train-step on the CPU: run the measured steps alternately with the large products on OpenBLAS
    /// and on the built-in `gemm` (in the order A B B A ...), in one process, so a noisy machine slows
    /// both alike; prints each one's median and their ratio.
    #[arg(long)]
    pub alternate_blas: bool,
    /// train-step on the CPU in bf16: the same alternation with the frozen weights' products, attention
    /// and the LM head on the CPU's AMX unit and without it (operands widened to f32).
    #[arg(long)]
    pub alternate_amx: bool,
    /// train-step: also measure transformers + PEFT on the same work (scripts/bench_peft.py, built in;
    /// needs --optimizer adamw), with the base weights from DIR (a transformers checkpoint of the same
    /// model, e.g. an export's merged/): --rounds times candor's --steps, then PEFT's, in turn.
    #[arg(long, value_name = "DIR")]
    pub peft: Option<String>,
    /// --peft: the Python that has torch, transformers and peft.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// --peft: how many times candor's steps and PEFT's run in turn.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// train-step on the CPU: also print each op's wall time per measured step (forward, backward,
    /// update) and what is left for candle's own work between the ops.
    #[arg(long)]
    pub profile: bool,
}

fn bench_data(args: &BenchArgs) -> anyhow::Result<()> {
    use crate::data::batch::{tokenize_examples, TokenizeOptions, Truncation};
    use crate::data::falsereject::{read_rows, rows_to_examples, ConversationOptions, OnBadRow, SkipReport};
    let path = args.data.as_deref().ok_or_else(|| anyhow::anyhow!("bench data needs --data FILE"))?;
    let tok = crate::model::load_tokenizer(&args.model.model, &crate::hub::HubOptions::from_env())?;
    let start = std::time::Instant::now();
    let base = rows_to_examples(
        read_rows(std::path::Path::new(path))?,
        &ConversationOptions::default(),
        OnBadRow::Error,
        &mut SkipReport::default(),
    )?;
    let examples: Vec<_> = base.iter().cycle().take(args.rows).cloned().collect();
    let read_s = start.elapsed().as_secs_f64();
    let opts = TokenizeOptions {
        max_seq_len: 1 << 20,
        truncation: Truncation::Drop,
        on_bad_row: OnBadRow::Error,
        template_vars: serde_json::Value::Null,
    };
    let mut times = Vec::new();
    let mut tokens = 0;
    for _ in 0..3 {
        let start = std::time::Instant::now();
        let (out, _) = tokenize_examples(&examples, &tok, &opts)?;
        times.push(start.elapsed().as_secs_f64());
        tokens = out.iter().map(|e| e.len()).sum::<usize>();
    }
    times.sort_by(f64::total_cmp);
    let median = times[1];
    println!(
        "data: {} rows ({} distinct from {path}), {tokens} tokens: template + tokenize + mask median {median:.2} s over 3 runs = {:.0} rows/s ({} threads; reading {read_s:.2} s)",
        args.rows,
        base.len(),
        args.rows as f64 / median,
        rayon::current_num_threads()
    );
    Ok(())
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.what.as_str() {
        "train-step" => {}
        "data" => return bench_data(&args),
        "generate" => {
            return super::bench_generate::run(&super::bench_generate::GenerateBench {
                model: &args.model,
                prompts: args
                    .data
                    .as_deref()
                    .ok_or_else(|| anyhow::anyhow!("bench generate needs --data PROMPTS"))?,
                batch: args.batch,
                new_tokens: args.new_tokens,
                eval_prompts: args.eval_prompts,
            })
        }
        other => {
            anyhow::bail!("bench: unknown benchmark \"{other}\" (available: train-step, data, generate)")
        }
    }
    let adamw = match args.optimizer.as_str() {
        "none" => false,
        "adamw" => true,
        other => anyhow::bail!("bench: unknown --optimizer \"{other}\" (none or adamw)"),
    };
    let mut opts = args.model.load_options()?;
    opts.tokenizer = false;
    let mut loaded = load_model(&args.model.model, &opts)?;
    let lora = LoraConfig { r: args.rank, alpha: 2.0 * args.rank as f64, ..LoraConfig::default() };
    loaded.model.add_lora(&lora, 0)?;
    let model = &loaded.model;
    let vocab = model.config.vocab_size as u32;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let rows: Vec<Vec<u32>> =
        (0..args.batch).map(|_| (0..args.seq_len).map(|_| rng.random_range(0..vocab)).collect()).collect();
    let labels: Vec<Vec<i64>> = rows.iter().map(|r| r.iter().map(|&t| t as i64).collect()).collect();
    let batch = TokenBatch::from_hf(rows, vec![vec![1; args.seq_len]; args.batch], labels)?;
    let tokens = args.batch * args.seq_len;
    println!(
        "train-step: {} ({:.1} M params, {:?} on {}), LoRA r={} on all 7 projections ({:.2} M trainable), batch {} x {}, forward + backward{}",
        loaded.source,
        model.config.num_parameters() as f64 / 1e6,
        model.dtype(),
        args.model.device,
        args.rank,
        model.num_lora_parameters() as f64 / 1e6,
        args.batch,
        args.seq_len,
        if adamw { " + AdamW update" } else { "" }
    );
    // only the CPU multiplies with it: a GPU run does not load it
    let blas = model.device().is_cpu().then(crate::ops::openblas::describe);
    if let Some(blas) = &blas {
        println!("cpu matrix products: {blas}");
        if let Some(note) = super::cpu_half_note(&format!("{:?}", model.dtype())) {
            println!("{note}");
        }
    }
    if args.alternate_amx {
        if args.alternate_blas {
            anyhow::bail!("bench: --alternate-amx and --alternate-blas are separate comparisons; pick one");
        }
        if !model.device().is_cpu() || model.dtype() != candle_core::DType::BF16 {
            anyhow::bail!("bench: --alternate-amx compares bf16 products on the CPU; it needs --device cpu --dtype bf16");
        }
        if crate::ops::amx::get().is_none() {
            anyhow::bail!(
                "bench: --alternate-amx needs AMX, and this run has none ({})",
                crate::ops::amx::describe()
            );
        }
        if args.steps < 2 {
            anyhow::bail!("bench: --alternate-amx needs --steps 2 or more (one step per variant at least)");
        }
    }
    let alternating = args.alternate_blas || args.alternate_amx;
    let (on, off) = if args.alternate_amx { ("AMX", "without AMX") } else { ("OpenBLAS", "gemm") };
    let (tag_on, tag_off) = if args.alternate_amx { ("amx", "no amx") } else { ("openblas", "gemm") };
    if args.alternate_blas {
        if !model.device().is_cpu() {
            anyhow::bail!("bench: --alternate-blas compares CPU matrix products; it needs --device cpu");
        }
        if !matches!(crate::ops::openblas::get(), Ok(Some(_))) {
            anyhow::bail!(
                "bench: --alternate-blas needs OpenBLAS, and this run has none ({})",
                blas.as_deref().unwrap_or("")
            );
        }
        if args.steps < 2 {
            anyhow::bail!("bench: --alternate-blas needs --steps 2 or more (one step per variant at least)");
        }
    }
    if args.profile && !model.device().is_cpu() {
        anyhow::bail!(
            "bench: --profile times ops on the host, and on a GPU they only queue kernels; it needs --device cpu"
        );
    }
    if args.profile && alternating {
        anyhow::bail!("bench: --profile would average over both alternated variants; pick one");
    }
    let peft = match &args.peft {
        None => None,
        Some(_) if alternating => {
            anyhow::bail!(
                "bench: --peft and --alternate-blas/--alternate-amx are separate comparisons; pick one"
            )
        }
        Some(_) if !adamw => anyhow::bail!(
            "bench: --peft compares whole training steps, and PEFT's include AdamW: add --optimizer adamw"
        ),
        Some(_) if args.rounds == 0 => anyhow::bail!("bench: --rounds must be at least 1"),
        Some(dir) => Some(super::bench_peft::PeftBench::new(
            &args.python,
            dir,
            &args.model.device,
            model.dtype(),
            args.batch,
            args.seq_len,
            args.rank,
            args.steps,
        )?),
    };
    let rounds = if peft.is_some() { args.rounds } else { 1 };
    let mut peft_runs = Vec::new();
    // measured step i (from 1) on the second variant (gemm, or without AMX) when alternating:
    // A B B A A B B A ...
    let on_gemm = |step: usize| alternating && step > 0 && matches!((step - 1) % 4, 1 | 2);
    let mut gemm_times = Vec::new();
    let device = model.device().clone();
    let mut optimizer =
        if adamw { Some(AdamW::new(model.lora_vars(), AdamWConfig::default())?) } else { None };
    let mut peak_device_bytes = 0u64;
    let mut times = Vec::new();
    for step in 0..=args.steps * rounds {
        if args.alternate_amx {
            crate::ops::amx::set_suspended(on_gemm(step));
        } else {
            crate::ops::openblas::set_suspended(on_gemm(step));
        }
        if args.profile && step == 1 {
            // the measured steps only, not the warm-up
            crate::ops::profile::take();
            crate::ops::profile::set_enabled(true);
        }
        let start = Instant::now();
        let hidden = model.hidden_states(&batch, None, true)?;
        let (loss_sum, n) = model.loss_sum(&hidden, &batch.targets)?;
        let loss = (loss_sum / n as f64)?;
        // GPU work is queued asynchronously: wait for it before reading the clock
        device.synchronize()?;
        let forward_s = start.elapsed().as_secs_f64();
        peak_device_bytes = peak_device_bytes.max(device_memory_used_bytes(&device));
        let grads = loss.backward()?;
        device.synchronize()?;
        peak_device_bytes = peak_device_bytes.max(device_memory_used_bytes(&device));
        if let Some(opt) = optimizer.as_mut() {
            let g = collect_grads(&grads, opt.params())?;
            opt.apply(&g, opt.config.lr)?;
        }
        drop(grads);
        device.synchronize()?;
        let s = start.elapsed().as_secs_f64();
        println!(
            "  step {step}{}: {:.3} s (forward {:.3} s, backward{} {:.3} s), {:.1} tokens/s, loss {:.4}",
            match step {
                0 => " (warm-up)".to_string(),
                _ if !alternating => String::new(),
                _ if on_gemm(step) => format!(" [{tag_off}]"),
                _ => format!(" [{tag_on}]"),
            },
            s,
            forward_s,
            if adamw { " + update" } else { "" },
            s - forward_s,
            tokens as f64 / s,
            loss.to_scalar::<f32>()?
        );
        if on_gemm(step) {
            gemm_times.push(s);
        } else if step > 0 {
            times.push(s);
        }
        if let Some(peft) = peft.as_ref().filter(|_| step > 0 && step % args.steps == 0) {
            let run = peft.run()?;
            println!(
                "  peft round {}: median step {:.3} s = {:.1} tokens/s",
                peft_runs.len() + 1,
                run.median_step_s,
                run.tokens_per_s
            );
            peft_runs.push(run);
        }
    }
    crate::ops::openblas::set_suspended(false);
    crate::ops::amx::set_suspended(false);
    crate::ops::profile::set_enabled(false);
    let profile = args.profile.then(|| print_profile(crate::ops::profile::take(), &times));
    let median_of = |t: &mut Vec<f64>| {
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    };
    // (the steps in the order they ran, for the per-round comparison with PEFT)
    let in_order = times.clone();
    let median = median_of(&mut times);
    let alternation = (!gemm_times.is_empty()).then(|| {
        let gemm = median_of(&mut gemm_times);
        println!(
            "alternated in one process: {on} median {median:.3} s over {} steps, {off} {gemm:.3} s over {}; \
             {on} runs at {:.3}x the speed {versus}",
            times.len(),
            gemm_times.len(),
            gemm / median,
            versus = if args.alternate_amx { off } else { "of gemm" },
        );
        if args.alternate_amx {
            serde_json::json!({ "amx_step_s": times, "no_amx_step_s": gemm_times, "no_amx_median_s": gemm })
        } else {
            serde_json::json!({ "openblas_step_s": times, "gemm_step_s": gemm_times, "gemm_median_s": gemm })
        }
    });
    let tokens_per_s = tokens as f64 / median;
    let peft_summary =
        (!peft_runs.is_empty()).then(|| compare_with_peft(&in_order, &peft_runs, tokens, &device));
    let device_note = if device.is_cuda() {
        format!(
            "; GPU memory in use (sampled after forward and backward) {:.2} GB",
            peak_device_bytes as f64 / 1e9
        )
    } else {
        String::new()
    };
    println!(
        "median step {:.3} s = {:.1} tokens/s; peak RSS {:.2} GB{device_note}",
        median,
        tokens_per_s,
        peak_rss_bytes() as f64 / 1e9
    );
    if let Some(path) = &args.json {
        let summary = serde_json::json!({
            "model": args.model.model,
            "device": args.model.device,
            "dtype": format!("{:?}", model.dtype()),
            "num_parameters": model.config.num_parameters(),
            "num_lora_parameters": model.num_lora_parameters(),
            "batch": args.batch,
            "seq_len": args.seq_len,
            "rank": args.rank,
            "optimizer": args.optimizer,
            "step_s": times,
            "median_step_s": median,
            "tokens_per_s": tokens_per_s,
            "peak_rss_bytes": peak_rss_bytes(),
            "peak_device_memory_used_bytes": peak_device_bytes,
            "cpu_matrix_products": blas,
            (if args.alternate_amx { "alternate_amx" } else { "alternate_blas" }): alternation,
            "peft": peft_summary,
            "profile": profile,
        });
        std::fs::write(path, serde_json::to_string_pretty(&summary)? + "\n")
            .map_err(|e| anyhow::anyhow!("bench: cannot write {path}: {e}"))?;
    }
    Ok(())
}

/// Prints the ops' wall time per measured step (`steps`: their wall times) and returns it as JSON.
fn print_profile(ops: Vec<crate::ops::profile::OpTime>, steps: &[f64]) -> serde_json::Value {
    let n = steps.len().max(1) as f64;
    let step = steps.iter().sum::<f64>() / n;
    let in_ops = ops.iter().map(|t| t.total_s()).sum::<f64>() / n;
    let share = |s: f64| if step > 0.0 { 100.0 * s / step } else { 0.0 };
    println!("per-op wall time, mean of {} measured steps of {step:.3} s:", steps.len());
    println!(
        "  {:<16} {:>9} {:>9} {:>9} {:>9} {:>6}",
        "op", "forward", "backward", "update", "total", "share"
    );
    let mut sorted = ops;
    sorted.sort_by(|a, b| b.total_s().total_cmp(&a.total_s()));
    for t in &sorted {
        let total = t.total_s() / n;
        println!(
            "  {:<16} {:>8.3}s {:>8.3}s {:>8.3}s {:>8.3}s {:>5.1}%",
            t.op,
            t.forward_s / n,
            t.backward_s / n,
            t.update_s / n,
            total,
            share(total)
        );
    }
    let other = (step - in_ops).max(0.0);
    println!(
        "  {:<16} {:>38.3}s {:>5.1}%  (candle's ops between ours: residual adds, reshapes, embedding, gradient sums; the graph)",
        "other",
        other,
        share(other)
    );
    serde_json::json!({
        "mean_step_s": step,
        "ops": sorted.iter().map(|t| serde_json::json!({
            "op": t.op,
            "forward_s": t.forward_s / n,
            "backward_s": t.backward_s / n,
            "update_s": t.update_s / n,
        })).collect::<Vec<_>>(),
        "other_s": other,
    })
}

/// Prints candor against PEFT round by round (each round's median step against PEFT's) and overall,
/// and returns the same as JSON. Memory is compared on the CPU (peak RSS of each process); on a GPU the
/// two programs count differently (see docs/gpu-results.md), so both figures are only printed.
fn compare_with_peft(
    times: &[f64],
    runs: &[super::bench_peft::PeftRun],
    tokens: usize,
    device: &candle_core::Device,
) -> serde_json::Value {
    let sorted = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v
    };
    // each round's step as the rest of the benchmark takes it (the upper median: the slower for an even
    // count), and the ratios' true median
    let per_round = times.len() / runs.len();
    let candor: Vec<f64> = times.chunks(per_round).map(|c| tokens as f64 / sorted(c)[c.len() / 2]).collect();
    let ratios: Vec<f64> = candor.iter().zip(runs).map(|(c, p)| c / p.tokens_per_s).collect();
    for (i, ((c, p), r)) in candor.iter().zip(runs).zip(&ratios).enumerate() {
        println!("round {}: candor {c:.1} tokens/s, PEFT {:.1} tokens/s: {r:.2}x", i + 1, p.tokens_per_s);
    }
    let ratio = {
        let r = sorted(&ratios);
        (r[(r.len() - 1) / 2] + r[r.len() / 2]) / 2.0
    };
    let peft_rss = runs.iter().map(|r| r.peak_rss_bytes).max().unwrap_or(0);
    let memory_ratio = (device.is_cpu() && peft_rss > 0).then(|| peak_rss_bytes() as f64 / peft_rss as f64);
    let memory = match memory_ratio {
        Some(m) => format!(
            "peak RSS {:.2} GB against {:.2} GB = {m:.2}x",
            peak_rss_bytes() as f64 / 1e9,
            peft_rss as f64 / 1e9
        ),
        None => format!(
            "PEFT's torch.cuda.max_memory_reserved {:.2} GB (not comparable with candor's whole-GPU figure)",
            runs.iter().map(|r| r.peak_reserved_bytes).max().unwrap_or(0) as f64 / 1e9
        ),
    };
    println!(
        "candor vs transformers + PEFT, {} alternated rounds: {:.2}x the tokens/s (median of the rounds' ratios); {memory}",
        runs.len(),
        ratio
    );
    serde_json::json!({
        "rounds": runs.len(),
        "candor_tokens_per_s": candor,
        "peft_tokens_per_s": runs.iter().map(|r| r.tokens_per_s).collect::<Vec<_>>(),
        "ratios": ratios,
        "median_ratio": ratio,
        "peft_peak_rss_bytes": peft_rss,
        "memory_ratio": memory_ratio,
    })
}

/// Device memory in use on the whole GPU (total − free, so it includes the CUDA context and
/// candle's caching), 0 on the CPU.
fn device_memory_used_bytes(device: &candle_core::Device) -> u64 {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(dev) = device {
        return dev.cuda_stream().context().mem_get_info().map_or(0, |(free, total)| (total - free) as u64);
    }
    let _ = device;
    0
}

/// The process's peak resident set size (VmHWM), 0 where /proc is unavailable.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| l.to_string()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()))
        .map_or(0, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::super::bench_peft::PeftRun;

    #[test]
    fn each_round_is_compared_with_the_peft_run_after_it() {
        let run = |tokens_per_s| PeftRun {
            tokens_per_s,
            median_step_s: 1.0,
            peak_rss_bytes: 0,
            peak_reserved_bytes: 0,
        };
        // steps in the order they ran: round 1 took 6, 4, 5 s, round 2 3, 1, 2 s (so sorting all the
        // steps before splitting them into rounds would swap the rounds); 6 tokens a step
        let times = [6.0, 4.0, 5.0, 3.0, 1.0, 2.0];
        let summary = super::compare_with_peft(&times, &[run(1.2), run(1.5)], 6, &candle_core::Device::Cpu);
        let numbers = |key: &str| -> Vec<f64> {
            summary[key].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect()
        };
        // each round's median step: 5 s and 2 s
        assert_eq!(numbers("candor_tokens_per_s"), [1.2, 3.0]);
        assert_eq!(numbers("ratios"), [1.0, 2.0]);
        assert_eq!(summary["median_ratio"].as_f64(), Some(1.5));
        assert!(summary["memory_ratio"].is_null(), "no PEFT memory figure, no ratio");
    }
}
