//! What a run's evaluations leave behind: `summary.json` (every evaluation, in order), `plot.svg`
//! (benign and harmful refusal rates with their 95% intervals, and the training loss, across epochs) and
//! `report.md` (the first evaluation next to the last, overall and per category).

use std::fmt::Write as _;
use std::path::Path;

use super::evaluate::EvalRecord;
use super::metrics::{Rate, SideMetrics};
use super::sets::Label;
use crate::error::{CandorError, Result};

/// Reads `summary.json` (an empty list when there is none yet).
pub fn read_summary(eval_dir: &Path) -> Result<Vec<EvalRecord>> {
    let path = eval_dir.join("summary.json");
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(&path).map_err(|e| CandorError::file(&path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| CandorError::file(&path, format!("not a list of evaluations: {e}")))
}

/// Adds `record` to `summary.json` (replacing an earlier record with the same tag, as after a resume)
/// and rewrites the plot and the report.
pub fn append(eval_dir: &Path, record: EvalRecord) -> Result<Vec<EvalRecord>> {
    let mut records = read_summary(eval_dir)?;
    records.retain(|r| r.tag != record.tag);
    records.push(record);
    records.sort_by_key(|r| (r.step, r.epoch));
    write_atomic(&eval_dir.join("summary.json"), &serde_json::to_string_pretty(&records).expect("json"))?;
    write_atomic(&eval_dir.join("plot.svg"), &plot_svg(&records))?;
    write_atomic(&eval_dir.join("report.md"), &report_md(&records))?;
    Ok(records)
}

pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp =
        path.with_extension(format!("{}.tmp", path.extension().and_then(|e| e.to_str()).unwrap_or("out")));
    std::fs::write(&tmp, text).map_err(|e| CandorError::file(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| CandorError::file(path, e))
}

fn side(r: &EvalRecord, label: Label) -> Option<&SideMetrics> {
    match label {
        Label::Benign => r.metrics.benign.as_ref(),
        Label::Harmful => r.metrics.harmful.as_ref(),
    }
}

/// x position of a record: fractional epochs for step evaluations.
fn x_of(r: &EvalRecord, steps_per_epoch: Option<f64>) -> f64 {
    if r.tag.starts_with("step-") {
        if let Some(spe) = steps_per_epoch {
            return r.step as f64 / spe;
        }
    }
    r.epoch as f64
}

/// An SVG line chart: refusal rates (left axis, %) with 95% bands, training loss (right axis).
pub fn plot_svg(records: &[EvalRecord]) -> String {
    let (w, h) = (720.0, 420.0);
    let (left, right, top, bottom) = (64.0, 64.0, 40.0, 64.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    // steps per epoch from epoch records, to place step records between them
    let spe = records
        .iter()
        .find(|r| r.tag.starts_with("epoch-") && r.epoch > 0)
        .map(|r| r.step as f64 / r.epoch as f64);
    let xs: Vec<f64> = records.iter().map(|r| x_of(r, spe)).collect();
    let x_max = xs.iter().copied().fold(1.0, f64::max);
    let px = |x: f64| left + pw * x / x_max;
    let py = |rate: f64| top + ph * (1.0 - rate);
    let losses: Vec<(f64, f64)> =
        records.iter().zip(&xs).filter_map(|(r, &x)| r.train_loss.map(|l| (x, l))).collect();
    let loss_max = losses.iter().map(|l| l.1).fold(0.0, f64::max).max(1e-9) * 1.1;
    let py_loss = |l: f64| top + ph * (1.0 - l / loss_max);

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let title = records.last().map_or(String::new(), |r| format!("{} — judge: {}", r.model, r.judge));
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="22" font-size="14">Refusal rates across training · {}</text>"#,
        xml(&title)
    );
    for i in 0..=5 {
        let rate = i as f64 / 5.0;
        let y = py(rate);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}%</text>"##,
            left + pw,
            left - 6.0,
            y + 4.0,
            (rate * 100.0).round()
        );
        if !losses.is_empty() {
            let _ = writeln!(
                s,
                r##"<text x="{}" y="{}" fill="#777">{:.2}</text>"##,
                left + pw + 6.0,
                y + 4.0,
                loss_max * rate
            );
        }
    }
    let ticks = x_max.ceil() as usize;
    for e in 0..=ticks {
        let x = px(e as f64);
        let _ = writeln!(s, r#"<text x="{x}" y="{}" text-anchor="middle">{e}</text>"#, top + ph + 18.0);
    }
    let _ =
        writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">epoch</text>"#, left + pw / 2.0, h - 20.0);
    let _ = writeln!(
        s,
        r#"<text transform="translate(16 {}) rotate(-90)" text-anchor="middle">refusal rate</text>"#,
        top + ph / 2.0
    );
    if !losses.is_empty() {
        let _ = writeln!(
            s,
            r##"<text transform="translate({} {}) rotate(90)" text-anchor="middle" fill="#777">training loss</text>"##,
            w - 14.0,
            top + ph / 2.0
        );
    }
    let _ =
        writeln!(s, r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>"##);
    for (label, colour) in [(Label::Benign, "#d62728"), (Label::Harmful, "#1f77b4")] {
        let pts: Vec<(f64, Rate)> = records
            .iter()
            .zip(&xs)
            .filter_map(|(r, &x)| side(r, label).map(|m| (x, m.refusal_rate)))
            .collect();
        if pts.is_empty() {
            continue;
        }
        // the 95% band: upper bounds left to right, lower bounds back
        let band: Vec<String> = pts
            .iter()
            .map(|(x, r)| format!("{:.1},{:.1}", px(*x), py(r.ci95[1])))
            .chain(pts.iter().rev().map(|(x, r)| format!("{:.1},{:.1}", px(*x), py(r.ci95[0]))))
            .collect();
        let _ = writeln!(s, r#"<polygon points="{}" fill="{colour}" fill-opacity="0.12"/>"#, band.join(" "));
        let line: Vec<String> = pts.iter().map(|(x, r)| format!("{:.1},{:.1}", px(*x), py(r.rate))).collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
            line.join(" ")
        );
        for (x, r) in &pts {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"><title>{:.1}% ({}/{})</title></circle>"#,
                px(*x),
                py(r.rate),
                100.0 * r.rate,
                r.count,
                r.total
            );
        }
    }
    if !losses.is_empty() {
        let line: Vec<String> =
            losses.iter().map(|(x, l)| format!("{:.1},{:.1}", px(*x), py_loss(*l))).collect();
        let _ = writeln!(
            s,
            r##"<polyline points="{}" fill="none" stroke="#777" stroke-width="1.5" stroke-dasharray="5 4"/>"##,
            line.join(" ")
        );
        for (x, l) in &losses {
            let _ = writeln!(
                s,
                r##"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="#777"><title>loss {l:.4}</title></circle>"##,
                px(*x),
                py_loss(*l)
            );
        }
    }
    // legend
    let ly = h - 10.0;
    for (i, (colour, name, dash)) in [
        ("#d62728", "benign refusal rate", ""),
        ("#1f77b4", "harmful refusal rate", ""),
        ("#777", "training loss", r#" stroke-dasharray="5 4""#),
    ]
    .iter()
    .enumerate()
    {
        let x = left + 160.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{x}" y1="{ly}" x2="{}" y2="{ly}" stroke="{colour}" stroke-width="2"{dash}/><text x="{}" y="{}">{name}</text>"#,
            x + 20.0,
            x + 24.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

type RateOf = fn(&SideMetrics) -> Rate;

/// Markdown: the first evaluation next to the last (or one evaluation alone), per side and per category.
pub fn report_md(records: &[EvalRecord]) -> String {
    let mut s = String::new();
    let (Some(first), Some(last)) = (records.first(), records.last()) else {
        return "# Evaluation\n\nNo evaluation has run yet.\n".into();
    };
    let cols: Vec<&EvalRecord> = if records.len() == 1 { vec![first] } else { vec![first, last] };
    let heading: Vec<String> = cols.iter().map(|r| format!("{} ({})", r.tag, r.model)).collect();
    let _ = writeln!(s, "# Evaluation: {}\n", heading.join(" vs "));
    let _ = writeln!(
        s,
        "Judge `{}`, {} prompts. Rates are over judged answers, with 95% Wilson intervals; with a few \
         dozen prompts per side, differences inside overlapping intervals are noise.\n",
        last.judge, last.prompts
    );
    let tags: Vec<&str> = cols.iter().map(|r| r.tag.as_str()).collect();
    let change = cols.len() == 2;
    let _ = writeln!(s, "| metric | {} |{}", tags.join(" | "), if change { " change |" } else { "" });
    let _ = writeln!(s, "|---|{}{}", "---|".repeat(cols.len()), if change { "---|" } else { "" });
    for (label, name) in [(Label::Benign, "benign"), (Label::Harmful, "harmful")] {
        let sides: Vec<&SideMetrics> = cols.iter().filter_map(|r| side(r, label)).collect();
        if sides.len() != cols.len() {
            continue;
        }
        let metrics: [(&str, RateOf); 3] = match label {
            Label::Benign => [
                ("refusal rate", |m| m.refusal_rate),
                ("full compliance", |m| m.compliance_rate),
                ("USR (full + safe partial)", |m| m.usr),
            ],
            Label::Harmful => [
                ("refusal rate", |m| m.refusal_rate),
                ("safe partial", |m| m.partial_rate),
                ("USR (refusal + safe partial)", |m| m.usr),
            ],
        };
        for (metric, get) in metrics {
            let rates: Vec<Rate> = sides.iter().map(|m| get(m)).collect();
            let cells: Vec<String> = rates.iter().map(Rate::display).collect();
            let delta = if change {
                format!(" {:+.1} pts |", 100.0 * (rates[1].rate - rates[0].rate))
            } else {
                String::new()
            };
            let _ = writeln!(s, "| {name}: {metric} | {} |{delta}", cells.join(" | "));
        }
        if sides.iter().any(|m| m.counts.unparsable > 0) {
            let cells: Vec<String> = sides.iter().map(|m| m.counts.unparsable.to_string()).collect();
            let _ = writeln!(
                s,
                "| {name}: unparsable verdicts | {} |{}",
                cells.join(" | "),
                if change { " |" } else { "" }
            );
        }
    }
    if records.len() > 2 {
        let _ = writeln!(s, "\n## Every evaluation\n");
        let _ = writeln!(s, "| tag | step | train loss | benign refusal | harmful refusal | tokens/s |");
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        for r in records {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {:.1} |",
                r.tag,
                r.step,
                r.train_loss.map_or("-".into(), |l| format!("{l:.4}")),
                side(r, Label::Benign).map_or("-".into(), |m| m.refusal_rate.display()),
                side(r, Label::Harmful).map_or("-".into(), |m| m.refusal_rate.display()),
                r.tokens_per_s
            );
        }
    }
    let _ = writeln!(s, "\n## Refusal rate per category\n");
    let _ = writeln!(s, "| side | category | {} |", tags.join(" | "));
    let _ = writeln!(s, "|---|---|{}", "---|".repeat(cols.len()));
    for c in &last.metrics.per_category {
        let cells: Vec<String> = cols
            .iter()
            .map(|r| {
                r.metrics
                    .per_category
                    .iter()
                    .find(|x| x.label == c.label && x.category == c.category)
                    .map_or("-".into(), |x| fraction(&x.metrics.refusal_rate))
            })
            .collect();
        let side = match c.label {
            Label::Benign => "benign",
            Label::Harmful => "harmful",
        };
        let _ = writeln!(s, "| {side} | {} | {} |", c.category, cells.join(" | "));
    }
    let files: Vec<String> = cols.iter().map(|r| format!("`{}`", r.responses.display())).collect();
    let _ = writeln!(s, "\nAnswers: {}.", files.join(" and "));
    s
}

fn fraction(r: &Rate) -> String {
    format!("{}/{} ({:.0}%)", r.count, r.total, 100.0 * r.rate)
}
