//! Learning-rate schedules with warm-up, as transformers' `get_*_schedule_with_warmup` define them.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    #[default]
    Cosine,
    Linear,
    Constant,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub peak_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    /// The learning rate for optimizer step `step` (0-based: the first update uses `lr(0)`).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * step as f64 / self.warmup_steps.max(1) as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / decay_steps).min(1.0);
        match self.kind {
            ScheduleKind::Constant => self.peak_lr,
            ScheduleKind::Linear => self.peak_lr * (1.0 - progress).max(0.0),
            ScheduleKind::Cosine => self.peak_lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay_like_transformers() {
        let s = Schedule { kind: ScheduleKind::Cosine, peak_lr: 1.0, warmup_steps: 4, total_steps: 14 };
        assert_eq!(s.lr(0), 0.0);
        assert_eq!(s.lr(2), 0.5);
        assert_eq!(s.lr(4), 1.0);
        assert!((s.lr(9) - 0.5).abs() < 1e-12);
        assert!(s.lr(14).abs() < 1e-12);
        let l = Schedule { kind: ScheduleKind::Linear, ..s };
        assert!((l.lr(9) - 0.5).abs() < 1e-12);
        let c = Schedule { kind: ScheduleKind::Constant, ..s };
        assert_eq!(c.lr(13), 1.0);
    }
}
