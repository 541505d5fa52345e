//! `candor bench train-step --peft DIR`: transformers + PEFT on the same work, run between candor's
//! measured steps, so both programs see the same machine (these machines' speed drifts by up to 2× within
//! minutes, and separate runs cannot tell that from a difference between the programs).
//!
//! The baseline is `scripts/bench_peft.py`, built into the binary and written to a temporary file for
//! each run: base weights from DIR (a transformers checkpoint of the same model, e.g. an export's
//! `merged/`), LoRA of the same rank on all seven projection types, the same batch shape, AdamW.

use std::path::PathBuf;
use std::process::Command;

/// The baseline script, as the repository has it.
const SCRIPT: &str = include_str!("../../scripts/bench_peft.py");

/// One PEFT measurement (the script's JSON summary).
#[derive(Debug, Clone, Copy)]
pub struct PeftRun {
    pub tokens_per_s: f64,
    pub median_step_s: f64,
    /// Peak RSS of PEFT's process (CPU runs).
    pub peak_rss_bytes: u64,
    /// `torch.cuda.max_memory_reserved` (GPU runs), 0 on the CPU.
    pub peak_reserved_bytes: u64,
}

/// How to run the baseline: the interpreter, the script (a temporary copy), and its arguments.
pub struct PeftBench {
    python: String,
    script: PathBuf,
    args: Vec<String>,
    json: PathBuf,
}

impl PeftBench {
    /// Checks that `python` has torch, transformers and peft, and that `dir` looks like a transformers
    /// checkpoint, before any measuring, so a missing piece costs seconds, not a benchmark.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        python: &str,
        dir: &str,
        device: &str,
        dtype: candle_core::DType,
        batch: usize,
        seq_len: usize,
        rank: usize,
        steps: usize,
    ) -> anyhow::Result<Self> {
        let dtype = match dtype {
            candle_core::DType::F32 => "f32",
            candle_core::DType::BF16 => "bf16",
            other => anyhow::bail!("bench --peft: the baseline runs f32 or bf16, not {other:?} (--dtype)"),
        };
        let config = std::path::Path::new(dir).join("config.json");
        if !config.is_file() {
            anyhow::bail!(
                "bench --peft {dir}: no config.json there; give a transformers checkpoint of the same model (e.g. an export's merged/)"
            );
        }
        let check = Command::new(python).args(["-c", "import torch, transformers, peft"]).output();
        match check {
            Err(e) => anyhow::bail!("bench --peft: cannot run {python} ({e}); --python names the interpreter"),
            Ok(out) if !out.status.success() => anyhow::bail!(
                "bench --peft: {python} cannot import torch, transformers and peft ({}); pip install torch transformers peft, or --python another interpreter",
                last_line(&out.stderr)
            ),
            Ok(_) => {}
        }
        let unique = format!("candor-bench-peft-{}", std::process::id());
        let script = std::env::temp_dir().join(format!("{unique}.py"));
        std::fs::write(&script, SCRIPT)
            .map_err(|e| anyhow::anyhow!("bench --peft: cannot write {}: {e}", script.display()))?;
        let args = [
            dir,
            "--device",
            device,
            "--dtype",
            dtype,
            "--batch",
            &batch.to_string(),
            "--seq-len",
            &seq_len.to_string(),
            "--rank",
            &rank.to_string(),
            "--steps",
            &steps.to_string(),
            "--warmup",
            "1",
        ]
        .map(String::from)
        .to_vec();
        let json = std::env::temp_dir().join(format!("{unique}.json"));
        Ok(PeftBench { python: python.to_string(), script, args, json })
    }

    /// One run of the baseline (warm-up step included), its step lines passed through indented.
    pub fn run(&self) -> anyhow::Result<PeftRun> {
        let _ = std::fs::remove_file(&self.json);
        let out = Command::new(&self.python)
            .arg(&self.script)
            .args(&self.args)
            .arg("--json")
            .arg(&self.json)
            .output()
            .map_err(|e| anyhow::anyhow!("bench --peft: cannot run {}: {e}", self.python))?;
        if !out.status.success() {
            anyhow::bail!("bench --peft: the baseline failed ({}): {}", out.status, last_line(&out.stderr));
        }
        for line in String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains("peft step")) {
            println!("  {}", line.trim_start());
        }
        let text = std::fs::read_to_string(&self.json)
            .map_err(|e| anyhow::anyhow!("bench --peft: the baseline wrote no summary ({e})"))?;
        parse(&text)
    }
}

impl Drop for PeftBench {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.script);
        let _ = std::fs::remove_file(&self.json);
    }
}

/// The fields candor compares, from the script's JSON summary.
fn parse(text: &str) -> anyhow::Result<PeftRun> {
    let v: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| anyhow::anyhow!("bench --peft: the baseline's summary: {e}"))?;
    let number = |key: &str| v[key].as_f64();
    let (Some(tokens_per_s), Some(median_step_s)) = (number("tokens_per_s"), number("median_step_s")) else {
        anyhow::bail!("bench --peft: the baseline's summary has no tokens_per_s and median_step_s");
    };
    let bytes = |key: &str| number(key).map_or(0, |b| b as u64);
    Ok(PeftRun {
        tokens_per_s,
        median_step_s,
        peak_rss_bytes: bytes("peak_rss_bytes"),
        peak_reserved_bytes: bytes("peak_memory_reserved_bytes"),
    })
}

/// The last non-empty line of a process's output (a Python traceback ends with the error).
fn last_line(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output").trim().to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_summary_is_read_and_a_broken_one_named() {
        let run =
            super::parse(r#"{"tokens_per_s": 150.5, "median_step_s": 6.8, "peak_rss_bytes": 5e9}"#).unwrap();
        assert_eq!((run.tokens_per_s, run.median_step_s, run.peak_rss_bytes), (150.5, 6.8, 5_000_000_000));
        assert_eq!(run.peak_reserved_bytes, 0);
        let err = super::parse(r#"{"steps": 3}"#).unwrap_err().to_string();
        assert!(err.contains("no tokens_per_s"), "{err}");
        assert!(super::parse("not json").unwrap_err().to_string().contains("summary"));
        assert_eq!(
            super::last_line(b"Traceback\n  File x\nImportError: no peft\n\n"),
            "ImportError: no peft"
        );
    }
}
