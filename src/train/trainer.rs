//! The training loop: setup → steps → checkpoints, top to bottom.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use serde::Serialize;

use super::checkpoint::{self, TrainerState};
use super::eval_hook::EvalHook;
use super::optim::{collect_grads, global_grad_norm, AdamW};
use super::schedule::Schedule;
use crate::data::batch::{tokenize_examples, BatchMode, Batcher, DataCursor, TokenizeOptions, Truncation};
use crate::data::dataset::load_examples;
use crate::data::falsereject::{ConversationOptions, OnBadRow};
use crate::error::{CandorError, Result};
use crate::eval::Evaluator;
use crate::hub::HubOptions;
use crate::model::{load_model, LoadOptions, TokenBatch, Transformer};
use crate::recipe::Recipe;

pub struct TrainOptions {
    pub resume: bool,
    /// No progress bar (CI logs); one line per logged step instead.
    pub quiet: bool,
    /// Set by Ctrl-C: finish the current step, checkpoint, stop.
    pub stop: Arc<AtomicBool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepMetrics {
    pub step: u64,
    pub epoch: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
}

#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// The run's step count at the end (those of earlier, resumed calls included).
    pub steps: u64,
    /// Steps trained by this call (0 when a resumed run had already finished).
    pub steps_this_run: u64,
    pub final_loss: Option<f64>,
    pub wall_s: f64,
    pub tokens_per_s: f64,
    /// The run's newest checkpoint: written by this call, or the one it resumed from.
    pub last_checkpoint: Option<PathBuf>,
    pub interrupted: bool,
}

/// Loss and gradients of one optimizer step over several micro-batches. The loss is the mean over all
/// target tokens of the step, so accumulating k micro-batches equals one batch k times larger.
pub fn accumulate(model: &Transformer, micro_batches: &[TokenBatch]) -> Result<(f64, Vec<Tensor>, usize)> {
    let total_tokens: usize = micro_batches.iter().map(TokenBatch::num_target_tokens).sum();
    if total_tokens == 0 {
        return Err(CandorError::msg("an optimizer step without any target token"));
    }
    let params = model.lora_vars();
    let mut grads: Option<Vec<Tensor>> = None;
    let mut loss_total = 0.0;
    for mb in micro_batches {
        if mb.num_target_tokens() == 0 {
            continue;
        }
        let hidden = model.hidden_states(mb, None, true)?;
        let (loss_sum, _) = model.loss_sum(&hidden, &mb.targets)?;
        let scaled = (loss_sum / total_tokens as f64)?;
        loss_total += scaled.to_scalar::<f32>()? as f64;
        let g = collect_grads(&scaled.backward()?, &params)?;
        grads = Some(match grads {
            None => g,
            Some(acc) => acc.iter().zip(&g).map(|(a, b)| a + b).collect::<candle_core::Result<Vec<_>>>()?,
        });
    }
    Ok((loss_total, grads.expect("at least one micro-batch has targets"), total_tokens))
}

/// The gradients' global norm and the factor that clips it to `max_norm` (0 = off; 1 when within),
/// which the optimizer applies inside its update.
pub fn clip_factor(grads: &[Tensor], max_norm: f64) -> Result<(f64, f64)> {
    let norm = global_grad_norm(grads)?;
    let factor = if max_norm > 0.0 && norm > max_norm { max_norm / (norm + 1e-6) } else { 1.0 };
    Ok((norm, factor))
}

pub fn train(recipe: &Recipe, opts: &TrainOptions) -> Result<TrainSummary> {
    let say = |msg: String| eprintln!("{msg}");
    let run_dir = recipe.run_dir();

    // ── setup: model ──
    let device = crate::cli::parse_device(&recipe.model.device)
        .map_err(|e| CandorError::msg(format!("model.device: {e}")))?;
    let dtype = match recipe.model.dtype.as_str() {
        "auto" => None,
        d => Some(crate::cli::parse_dtype(d).map_err(|e| CandorError::msg(format!("model.dtype: {e}")))?),
    };
    let load_opts = LoadOptions { device, dtype, tokenizer: true, hub: HubOptions::from_env() };
    let mut loaded = load_model(&recipe.model.path, &load_opts)?;
    loaded.model.add_lora(&recipe.lora.config(), recipe.seed)?;
    let model = &loaded.model;
    let tok = loaded.tokenizer()?;
    if recipe.data.max_seq_len > model.config.max_position_embeddings {
        return Err(CandorError::msg(format!(
            "data.max_seq_len {} is longer than the model's context ({} positions)",
            recipe.data.max_seq_len, model.config.max_position_embeddings
        )));
    }

    // ── setup: data ──
    let template = tok.template()?;
    let conv = ConversationOptions {
        variant: recipe.data.variant.parse()?,
        system_prompt: Some(recipe.data.system_prompt.clone()).filter(|s| !s.is_empty()),
        reasoning_field: template.supports_reasoning_content,
        think_open: recipe.data.think_open.clone(),
        think_close: recipe.data.think_close.clone(),
    };
    let on_bad_row = match recipe.data.on_bad_row.as_str() {
        "error" => OnBadRow::Error,
        "skip" => OnBadRow::Skip,
        other => {
            return Err(CandorError::msg(format!("data.on_bad_row: unknown \"{other}\" (error or skip)")))
        }
    };
    let truncation = match recipe.data.truncation.as_str() {
        "drop" => Truncation::Drop,
        "right" => Truncation::Right,
        other => {
            return Err(CandorError::msg(format!("data.truncation: unknown \"{other}\" (drop or right)")))
        }
    };
    let (examples, data_report) =
        load_examples(&recipe.data.sources, &conv, on_bad_row, &load_opts.hub, recipe.seed)?;
    let tok_opts = TokenizeOptions {
        max_seq_len: recipe.data.max_seq_len,
        truncation,
        on_bad_row,
        template_vars: serde_json::Value::Null,
    };
    let (tokenized, report) = tokenize_examples(&examples, tok, &tok_opts)?;
    say(format!(
        "data: {} examples ({} truncated, {} dropped as too long, {} skipped), {} bad rows skipped",
        report.kept,
        report.truncated,
        report.dropped_too_long,
        report.skipped.count,
        data_report.skipped.count
    ));
    let mode = if recipe.data.packing { BatchMode::Packed } else { BatchMode::Padded };
    let pad_id = tok.stop_ids.first().copied().unwrap_or(0);
    let batcher = Batcher::new(
        tokenized,
        mode,
        recipe.train.micro_batch_size,
        recipe.data.max_seq_len,
        recipe.seed,
        pad_id,
    )?;
    let accum = recipe.train.grad_accum;
    let steps_per_epoch = batcher.batches_per_epoch().div_ceil(accum) as u64;
    let total_steps = if recipe.train.max_steps > 0 {
        recipe.train.max_steps
    } else {
        steps_per_epoch * recipe.train.epochs as u64
    };
    let warmup = if recipe.schedule.warmup_steps > 0 {
        recipe.schedule.warmup_steps
    } else {
        (recipe.schedule.warmup_ratio * total_steps as f64).round() as u64
    };
    let schedule =
        Schedule { kind: recipe.schedule.kind, peak_lr: recipe.optim.lr, warmup_steps: warmup, total_steps };
    let mut opt = AdamW::new(model.lora_vars(), recipe.optim.adamw())?;

    // ── setup: evaluation (prompts and judge are loaded now, so bad eval input fails before training) ──
    let eval_hook = match &recipe.eval {
        Some(cfg) => Some(EvalHook::new(Evaluator::new(cfg, &load_opts)?, &run_dir, &recipe.model.path)),
        None => None,
    };

    // ── resume ──
    let mut state = TrainerState {
        step: 0,
        total_steps,
        cursor: DataCursor::default(),
        dropout_rng_seed: model.dropout_rng_state().0,
        dropout_rng_word_pos: "0".into(),
        tokens_seen: 0,
        elapsed_s: 0.0,
    };
    // the run's newest checkpoint: the one resumed from, until this call writes one
    let mut last_checkpoint = None;
    if opts.resume {
        match checkpoint::list(&run_dir).first() {
            None => say(format!("resume: no checkpoint in {}, starting fresh", run_dir.display())),
            Some((_, dir)) => {
                checkpoint::verify(dir)?;
                checkpoint::check_compatible(&checkpoint::saved_recipe(dir)?, recipe, dir)?;
                state = checkpoint::load(dir, model, &mut opt)?;
                state.total_steps = total_steps;
                last_checkpoint = Some(dir.clone());
                say(format!(
                    "resumed from {} (step {}, epoch {}, batch {})",
                    dir.display(),
                    state.step,
                    state.cursor.epoch,
                    state.cursor.batch_in_epoch
                ));
            }
        }
    } else if !checkpoint::list(&run_dir).is_empty() {
        return Err(CandorError::file(
            &run_dir,
            "already holds checkpoints: pass --resume to continue, or choose another name",
        ));
    }
    std::fs::create_dir_all(&run_dir)
        .map_err(|e| CandorError::file(&run_dir, format!("cannot create the run directory: {e}")))?;
    say(format!(
        "model: {} ({:.1} M parameters, {:?}), LoRA r={} on {} ({:.2} M trainable)",
        loaded.source,
        model.config.num_parameters() as f64 / 1e6,
        model.dtype(),
        recipe.lora.r,
        recipe.lora.target_modules.join(","),
        model.num_lora_parameters() as f64 / 1e6
    ));
    say(format!("training: {total_steps} steps ({steps_per_epoch} per epoch, {accum} micro-batches of {} rows each), warm-up {warmup}", recipe.train.micro_batch_size));

    // ── the loop ──
    let metrics_path = run_dir.join("metrics.jsonl");
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(|e| CandorError::file(&metrics_path, e))?;
    let bar =
        if opts.quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(total_steps) };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
            .expect("template"),
    );
    bar.set_position(state.step);
    if let Some(hook) = &eval_hook {
        say(format!(
            "eval: {} prompts, judge {}, results in {}",
            hook.evaluator.prompts.len(),
            hook.evaluator.judge.name(),
            hook.eval_dir.display()
        ));
        let epoch = state.cursor.epoch;
        let epoch_done = state.cursor.batch_in_epoch >= batcher.epoch_plan(epoch).len();
        if state.step == 0 {
            if hook.evaluator.cfg.before_training && !hook.has("epoch-0") {
                hook.run(model, tok, "epoch-0", 0, 0, &bar)?;
            }
        } else if let Some((tag, ep)) = hook.due(state.step, total_steps, epoch, epoch_done) {
            // the run stopped between a checkpoint and the evaluation that was due with it
            if !hook.has(&tag) {
                hook.run(model, tok, &tag, ep, state.step, &bar)?;
            }
        }
    }
    let start = Instant::now();
    let elapsed_before = state.elapsed_s;
    let mut last_loss = None;
    let steps_before = state.step;
    let mut tokens_this_run = 0usize;
    let mut interrupted = false;
    while state.step < total_steps {
        let plan = batcher.epoch_plan(state.cursor.epoch);
        if state.cursor.batch_in_epoch >= plan.len() {
            state.cursor = DataCursor { epoch: state.cursor.epoch + 1, batch_in_epoch: 0 };
            continue;
        }
        let end = (state.cursor.batch_in_epoch + accum).min(plan.len());
        let micro: Vec<TokenBatch> =
            plan[state.cursor.batch_in_epoch..end].iter().map(|rows| batcher.batch(rows)).collect();
        let step_start = Instant::now();
        let (loss, grads, tokens) = accumulate(model, &micro)?;
        let (grad_norm, clip) = clip_factor(&grads, recipe.optim.max_grad_norm)?;
        if !loss.is_finite() || !grad_norm.is_finite() {
            return Err(CandorError::msg(format!(
                "step {}: loss {loss}, gradient norm {grad_norm} — stopping; the last good checkpoint is kept{}",
                state.step + 1,
                last_checkpoint.as_ref().map(|p: &PathBuf| format!(" ({})", p.display())).unwrap_or_default()
            )));
        }
        let lr = schedule.lr(state.step);
        opt.apply_scaled(&grads, lr, clip)?;
        state.step += 1;
        state.cursor.batch_in_epoch = end;
        let row_tokens: usize =
            micro.iter().map(|b| b.attention_mask.iter().filter(|&&m| m == 1).count()).sum();
        state.tokens_seen += row_tokens as u64;
        tokens_this_run += row_tokens;
        let step_s = step_start.elapsed().as_secs_f64();
        let m = StepMetrics {
            step: state.step,
            epoch: state.cursor.epoch,
            loss,
            lr,
            grad_norm,
            tokens,
            tokens_per_s: row_tokens as f64 / step_s,
            elapsed_s: elapsed_before + start.elapsed().as_secs_f64(),
        };
        writeln!(metrics, "{}", serde_json::to_string(&m).expect("json"))
            .map_err(|e| CandorError::file(&metrics_path, e))?;
        let msg = format!("loss {loss:.4}  lr {lr:.2e}  {:.0} tok/s", m.tokens_per_s);
        if opts.quiet {
            say(format!("step {}/{total_steps}  {msg}  grad_norm {grad_norm:.3}", state.step));
        }
        bar.set_message(msg);
        bar.set_position(state.step);
        last_loss = Some(loss);

        let epoch_done = state.cursor.batch_in_epoch >= plan.len();
        let every = recipe.checkpoint.every_steps;
        let stop = opts.stop.load(Ordering::SeqCst);
        if epoch_done || state.step == total_steps || (every > 0 && state.step.is_multiple_of(every)) || stop
        {
            let (seed, pos) = model.dropout_rng_state();
            state.dropout_rng_seed = seed;
            state.dropout_rng_word_pos = pos.to_string();
            state.elapsed_s = elapsed_before + start.elapsed().as_secs_f64();
            let dir = checkpoint::save(&run_dir, model, &opt, &state, recipe, recipe.checkpoint.keep_last)?;
            let line = format!("checkpoint {}", dir.display());
            if opts.quiet {
                say(line);
            } else {
                bar.println(line);
            }
            last_checkpoint = Some(dir);
        }
        if stop {
            interrupted = true;
            break;
        }
        if let Some(hook) = &eval_hook {
            if let Some((tag, ep)) = hook.due(state.step, total_steps, state.cursor.epoch, epoch_done) {
                hook.run(model, tok, &tag, ep, state.step, &bar)?;
            }
        }
    }
    bar.finish_and_clear();
    if let Some(hook) = &eval_hook {
        if hook.eval_dir.join("summary.json").exists() {
            say(format!(
                "eval: {} (plot {}, report {})",
                hook.eval_dir.join("summary.json").display(),
                hook.eval_dir.join("plot.svg").display(),
                hook.eval_dir.join("report.md").display()
            ));
        }
    }
    let wall_s = start.elapsed().as_secs_f64();
    Ok(TrainSummary {
        steps: state.step,
        steps_this_run: state.step - steps_before,
        final_loss: last_loss,
        wall_s,
        tokens_per_s: tokens_this_run as f64 / wall_s.max(1e-9),
        last_checkpoint,
        interrupted,
    })
}
