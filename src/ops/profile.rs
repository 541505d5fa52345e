//! Wall time per op, for `candor bench train-step --profile`: where a CPU training step goes.
//!
//! Each op's entry point (its forward) and its `bwd` open a [`span`]; while profiling is on, the span
//! adds its wall time to the op's total for that phase. Only the outermost span on a thread counts, so
//! an op whose backward runs other ops (RMSNorm's and SwiGLU's backward kernels, the LoRA layer's)
//! is counted once, as itself. The ops run one at a time on the thread that drives the step (their
//! loops fan out to rayon's threads inside), so the totals add up to part of the step's wall time;
//! the rest is candle's own work between them (residual adds, reshapes, the embedding lookup, the
//! sums of gradients where activations are shared) and the graph walk.
//!
//! On a GPU the ops only queue kernels, so host time says nothing: the bench refuses `--profile`
//! there. When profiling is off (always, outside that bench) a span costs one atomic load.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Which part of a training step a span belongs to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Phase {
    Forward,
    Backward,
    /// The optimizer's update.
    Update,
}

/// One op's accumulated wall time, in seconds, per phase.
#[derive(Clone, Debug, PartialEq)]
pub struct OpTime {
    pub op: &'static str,
    pub forward_s: f64,
    pub backward_s: f64,
    pub update_s: f64,
}

impl OpTime {
    pub fn total_s(&self) -> f64 {
        self.forward_s + self.backward_s + self.update_s
    }
}

static ON: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<Vec<OpTime>> = Mutex::new(Vec::new());

thread_local! {
    /// Spans open on this thread.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Turns recording on or off (the totals are kept; [`take`] empties them).
pub fn set_enabled(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// The totals recorded since the last call, in the order the ops first ran.
pub fn take() -> Vec<OpTime> {
    std::mem::take(&mut *TOTALS.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Times `op` in `phase` until the returned guard drops (nothing when profiling is off or another
/// span is open on this thread).
pub fn span(op: &'static str, phase: Phase) -> Span {
    if !ON.load(Ordering::Relaxed) {
        return Span(None);
    }
    let outer = DEPTH.with(|d| {
        d.set(d.get() + 1);
        d.get() == 1
    });
    Span(Some((outer.then(Instant::now), op, phase)))
}

/// An open [`span`].
pub struct Span(Option<(Option<Instant>, &'static str, Phase)>);

impl Drop for Span {
    fn drop(&mut self) {
        let Some((start, op, phase)) = self.0 else { return };
        DEPTH.with(|d| d.set(d.get() - 1));
        let Some(start) = start else { return };
        let s = start.elapsed().as_secs_f64();
        let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
        let at = match totals.iter().position(|t| t.op == op) {
            Some(i) => i,
            None => {
                totals.push(OpTime { op, forward_s: 0.0, backward_s: 0.0, update_s: 0.0 });
                totals.len() - 1
            }
        };
        let t = &mut totals[at];
        *match phase {
            Phase::Forward => &mut t.forward_s,
            Phase::Backward => &mut t.backward_s,
            Phase::Update => &mut t.update_s,
        } += s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busy(ms: u64) {
        let start = Instant::now();
        while start.elapsed().as_millis() < ms as u128 {
            std::hint::spin_loop();
        }
    }

    #[test]
    fn only_outermost_spans_count_and_nothing_is_recorded_when_off() {
        // the only test in this binary that turns profiling on (the switch is process-wide)
        take();
        {
            let _off = span("rms_norm", Phase::Forward);
            busy(2);
        }
        assert!(take().is_empty(), "recorded while off");
        set_enabled(true);
        {
            let _outer = span("swiglu", Phase::Backward);
            // an op run by another op's backward is part of that op's time, not an entry of its own
            let _inner = span("rms_norm", Phase::Forward);
            busy(5);
        }
        {
            let _f = span("swiglu", Phase::Forward);
            busy(3);
        }
        let _u = span("adamw", Phase::Update);
        drop(_u);
        set_enabled(false);
        let t = take();
        assert_eq!(t.iter().map(|t| t.op).collect::<Vec<_>>(), ["swiglu", "adamw"], "{t:?}");
        assert!(t[0].backward_s >= 0.005 && t[0].forward_s >= 0.003, "{t:?}");
        assert!(t[0].update_s == 0.0 && t[1].forward_s == 0.0 && t[1].backward_s == 0.0);
        assert!((t[0].total_s() - t[0].forward_s - t[0].backward_s).abs() < 1e-12);
        assert!(take().is_empty(), "take empties the totals");
    }
}
