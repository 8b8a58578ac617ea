//! Learning-rate schedules with linear warmup, as transformers'
//! `get_{cosine,linear,constant}_schedule_with_warmup`, except that warmup
//! starts at lr/warmup instead of 0 (transformers' first step has lr 0 and is
//! wasted).

use super::recipe::Schedule;

#[derive(Debug, Clone, Copy)]
pub struct LrSchedule {
    pub kind: Schedule,
    pub base_lr: f64,
    pub warmup: usize,
    pub total: usize,
}

impl LrSchedule {
    /// Learning rate of optimizer step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.base_lr * (step + 1) as f64 / self.warmup as f64;
        }
        let decay_steps = self.total.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / decay_steps).min(1.0);
        let factor = match self.kind {
            Schedule::Constant => 1.0,
            Schedule::Linear => 1.0 - progress,
            Schedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        };
        self.base_lr * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        let s = |kind| LrSchedule {
            kind,
            base_lr: 1.0,
            warmup: 4,
            total: 14,
        };
        let c = s(Schedule::Cosine);
        assert_eq!(c.lr(0), 0.25);
        assert_eq!(c.lr(3), 1.0);
        assert_eq!(c.lr(4), 1.0);
        assert!((c.lr(9) - 0.5).abs() < 1e-12);
        assert!(c.lr(13) < 0.03);
        let l = s(Schedule::Linear);
        assert!((l.lr(9) - 0.5).abs() < 1e-12);
        assert_eq!(s(Schedule::Constant).lr(13), 1.0);
    }
}
