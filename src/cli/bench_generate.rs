//! `candor bench generate`: batched generation on the LoRA model (as the evaluation hook runs it):
//! prefill time, decode tokens/s, whether the cost of a step grows with the generated length (it must
//! not, beyond attention: the KV cache is reused), the speed-up over one prompt at a time, and the wall
//! time of a whole evaluation of 64 prompts.

use std::time::Instant;

use crate::eval::generate::{generate_batch, SamplingOptions};
use crate::eval::sets::{load_sets, EvalSetSpec};
use crate::eval::{EvalConfig, Evaluator};
use crate::model::load_model;
use crate::model::lora::LoraConfig;

use super::ModelArgs;

pub struct GenerateBench<'a> {
    pub model: &'a ModelArgs,
    /// Prompts: FalseReject test rows, XSTest CSV or labelled JSONL.
    pub prompts: &'a str,
    pub batch: usize,
    pub new_tokens: usize,
    /// Prompts of the whole-evaluation measurement (0 skips it).
    pub eval_prompts: usize,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

pub fn run(b: &GenerateBench) -> anyhow::Result<()> {
    let opts = b.model.load_options()?;
    let mut loaded = load_model(&b.model.model, &opts)?;
    loaded.model.add_lora(&LoraConfig::default(), 0)?;
    let tok = loaded.tokenizer()?;
    let mut spec = EvalSetSpec::path(b.prompts);
    spec.limit = b.batch;
    let prompts = load_sets(&[spec], 0, &opts.hub)?;
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let m = [crate::data::template::Message::new("user", &p.prompt)];
            tok.encode_chat(&m, &serde_json::Value::Null).map(|(_, ids)| ids)
        })
        .collect::<crate::error::Result<_>>()?;
    let lens: Vec<usize> = ids.iter().map(Vec::len).collect();
    eprintln!(
        "{} prompts of {}..{} tokens, {} new tokens each (stop tokens ignored, so every row runs to the end)",
        ids.len(),
        lens.iter().min().unwrap_or(&0),
        lens.iter().max().unwrap_or(&0),
        b.new_tokens
    );
    let sampling = SamplingOptions { max_new_tokens: b.new_tokens, ..Default::default() };

    // batched: time every decode step through the callback (row 0 gets a token every step)
    let mut step_times = Vec::with_capacity(b.new_tokens);
    let start = Instant::now();
    let mut last = None;
    let out = generate_batch(&loaded.model, &ids, &[], &sampling, |row, _| {
        if row == 0 {
            let now = Instant::now();
            if let Some(prev) = last {
                step_times.push(now.duration_since(prev).as_secs_f64());
            }
            last = Some(now);
        }
        Ok(())
    })?;
    let wall = start.elapsed().as_secs_f64();
    let generated: usize = out.iter().map(|g| g.tokens.len()).sum();
    let prefill = out.first().map_or(0.0, |g| g.prefill_s);
    let decode = out.first().map_or(0.0, |g| g.decode_s);
    let quarter = (step_times.len() / 4).max(1);
    let early = median(&mut step_times[..quarter].to_vec());
    let late = median(&mut step_times[step_times.len() - quarter..].to_vec());

    // one prompt at a time, on the first prompt, for the batching speed-up
    let single = generate_batch(&loaded.model, &ids[..1], &[], &sampling, |_, _| Ok(()))?;
    let single_tps = single[0].tokens.len() as f64 / single[0].decode_s.max(1e-9);

    println!("batched generation, batch {} × {} new tokens", ids.len(), b.new_tokens);
    println!("  prefill                 {prefill:.2} s");
    println!(
        "  decode                  {decode:.2} s, {:.1} generated tokens/s",
        generated as f64 / decode.max(1e-9)
    );
    println!(
        "  end to end              {wall:.2} s, {:.1} generated tokens/s",
        generated as f64 / wall.max(1e-9)
    );
    println!(
        "  step time               {:.1} ms early (first quarter, median), {:.1} ms late (last quarter), ratio {:.2}",
        early * 1e3,
        late * 1e3,
        late / early.max(1e-12)
    );
    println!(
        "  one prompt at a time    {single_tps:.1} tokens/s (batching: {:.1}×)",
        (generated as f64 / decode.max(1e-9)) / single_tps.max(1e-9)
    );
    println!("  peak RSS                {:.2} GB", super::bench::peak_rss_bytes() as f64 / 1e9);

    if b.eval_prompts > 0 {
        let mut spec = EvalSetSpec::path(b.prompts);
        spec.limit = b.eval_prompts;
        let cfg = EvalConfig {
            sets: vec![spec],
            max_new_tokens: b.new_tokens,
            batch_size: b.batch,
            ..Default::default()
        };
        let evaluator = Evaluator::new(&cfg, &opts)?;
        let dir = std::env::temp_dir().join(format!("candor-bench-eval-{}", std::process::id()));
        let start = Instant::now();
        let rec = evaluator.run(&loaded.model, tok, &b.model.model, &dir, "bench", |_, _| {})?;
        let wall = start.elapsed().as_secs_f64();
        let _ = std::fs::remove_dir_all(&dir);
        println!(
            "evaluation of {} prompts (≤{} new tokens, stops honoured, batches of {}, rules judge)",
            rec.prompts, b.new_tokens, b.batch
        );
        println!(
            "  wall time               {wall:.1} s ({:.1} s generating {} tokens at {:.1} tokens/s, {:.2} s judging)",
            rec.generation_s, rec.generated_tokens, rec.tokens_per_s, rec.judge_s
        );
    }
    Ok(())
}
