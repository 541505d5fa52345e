//! One function per subcommand.

mod bench;
mod bench_generate;
mod bench_peft;
mod cuda;
pub mod data;
pub mod eval;
pub mod export;
mod generate;
mod info;
mod judge;
mod selftest;
mod train;

use clap::{Parser, Subcommand};

pub use bench::BenchArgs;
pub use generate::GenerateArgs;
pub use info::InfoArgs;

#[derive(Debug, Parser)]
#[command(
    name = "candor",
    version,
    about = "LoRA fine-tuning of Llama/Qwen chat models on FalseReject: fewer false refusals, same safety"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Fine-tune with LoRA as a recipe describes.
    Train(train::TrainArgs),
    /// Merge a checkpoint's LoRA into its base and write a Hugging Face model directory.
    Export(export::ExportArgs),
    /// Show a model's architecture, size, dtype, tokenizer and chat-template source.
    Info(InfoArgs),
    /// Chat with a model: render the prompt with its chat template and stream the answer.
    Generate(GenerateArgs),
    /// Look at training data as the model will see it.
    Data(data::DataArgs),
    /// Evaluate refusal rates (benign and harmful prompts) of a model, checkpoint or export.
    Eval(eval::EvalArgs),
    /// Classify given answers (full compliance, safe partial, refusal); audit a judge against labels.
    Judge(judge::JudgeArgs),
    /// Measure performance (training step throughput and memory).
    Bench(BenchArgs),
    /// Check the fused ops (forward and gradients) against composed candle ops on a device.
    Selftest(selftest::SelftestArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    // a CANDOR_BLAS that names a library that does not open fails here, before any work
    crate::ops::openblas::check_choice().map_err(anyhow::Error::msg)?;
    match cli.command {
        Command::Train(a) => train::run(a),
        Command::Export(a) => export::run(a),
        Command::Info(a) => info::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Data(a) => data::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Judge(a) => judge::run(a),
        Command::Selftest(a) => selftest::run(a),
    }
}

/// A note for a bf16/f16 model on the CPU, which runs slower than f32 there instead of faster (the
/// fused ops widen each operand to f32 per call; candle's own ops between them run bf16/f16
/// elementwise).
pub(crate) fn cpu_half_note(dtype: &str) -> Option<String> {
    half_note(dtype, crate::ops::amx::get().is_some())
}

fn half_note(dtype: &str, amx: bool) -> Option<String> {
    let d = dtype.to_lowercase();
    match d.as_str() {
        "bf16" if amx => Some(
            "note: bf16 on the CPU multiplies on this CPU's AMX unit (bf16 products, f32 sums): about 1.8x the speed of f32, the CPU default, at about 0.6x its memory (measured on SmolLM2's training step)".into(),
        ),
        "bf16" | "f16" => Some(format!(
            "note: {d} on the CPU stores tensors in {d} but multiplies in f32 through conversions{}: it saves memory and runs {}, the CPU default (measured on SmolLM2's training step)",
            if d == "bf16" { format!(" ({})", crate::ops::amx::describe()) } else { String::new() },
            if d == "bf16" { "about 1.05x slower than f32" } else { "about 1.4x slower than f32" }
        )),
        _ => None,
    }
}

/// Options shared by commands that load a model.
#[derive(Debug, clap::Args)]
pub struct ModelArgs {
    /// A local Hugging Face directory, a .gguf file, or a hub id (Qwen/Qwen2.5-0.5B-Instruct).
    pub model: String,
    /// cpu or cuda (cuda needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype of the frozen base: f32, bf16 or f16 (default: f32 on cpu, bf16 on cuda).
    #[arg(long)]
    pub dtype: Option<String>,
}

impl ModelArgs {
    pub fn load_options(&self) -> anyhow::Result<crate::model::LoadOptions> {
        let mut opts = crate::model::LoadOptions::cpu();
        opts.device = parse_device(&self.device)?;
        opts.dtype = self.dtype.as_deref().map(parse_dtype).transpose()?;
        Ok(opts)
    }
}

pub fn parse_device(s: &str) -> anyhow::Result<candle_core::Device> {
    match s {
        "cpu" => Ok(candle_core::Device::Cpu),
        "cuda" | "gpu" => cuda::open(),
        other => anyhow::bail!("--device: unknown device \"{other}\" (cpu or cuda)"),
    }
}

pub fn parse_dtype(s: &str) -> anyhow::Result<candle_core::DType> {
    match s {
        "f32" | "float32" => Ok(candle_core::DType::F32),
        "bf16" | "bfloat16" => Ok(candle_core::DType::BF16),
        "f16" | "float16" => Ok(candle_core::DType::F16),
        other => anyhow::bail!("--dtype: unknown dtype \"{other}\" (f32, bf16 or f16)"),
    }
}

/// Hands the heap pages freed by a finished phase (training, or the export's LoRA model) back to the
/// system before the next one loads a model. glibc keeps freed chunks below its mmap threshold (which
/// grows to 32 MB, so nearly every activation and weight) for reuse, and the next model's tensors mostly
/// do not fit those holes: without this the process peaks at both phases' heaps together.
pub(crate) fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages to the kernel; no live allocation is touched
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn half_precision_on_the_cpu_gets_a_note_and_f32_none() {
        for amx in [false, true] {
            for d in ["f32", "F32", "auto"] {
                assert_eq!(super::half_note(d, amx), None, "{d}");
            }
            for (d, name) in [("bf16", "bf16"), ("BF16", "bf16"), ("F16", "f16")] {
                let note = super::half_note(d, amx).unwrap();
                assert!(
                    note.starts_with(&format!("note: {name} on the CPU")) && note.contains("f32"),
                    "{note}"
                );
                let faster = name == "bf16" && amx;
                assert_eq!(note.contains("slower"), !faster, "{note}");
            }
        }
    }
}
