/// Linear warm-up to the peak learning rate, then cosine decay to a floor at the last step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub peak: f64,
    pub floor: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl LrSchedule {
    /// The learning rate of the optimizer step with 0-based index `step`.
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.peak * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let decay_steps = self
            .total_steps
            .saturating_sub(self.warmup_steps + 1)
            .max(1);
        let progress = ((step - self.warmup_steps) as f64 / decay_steps as f64).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.floor + (self.peak - self.floor) * cosine
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEDULE: LrSchedule = LrSchedule {
        peak: 1e-3,
        floor: 1e-4,
        warmup_steps: 10,
        total_steps: 110,
    };

    #[test]
    fn warmup_rises_linearly_to_the_peak() {
        assert!((SCHEDULE.lr(0) - 1e-4).abs() < 1e-12);
        assert!((SCHEDULE.lr(4) - 5e-4).abs() < 1e-12);
        assert!((SCHEDULE.lr(9) - 1e-3).abs() < 1e-12);
    }

    #[test]
    fn cosine_decays_from_peak_to_floor_through_the_midpoint() {
        assert!((SCHEDULE.lr(10) - 1e-3).abs() < 1e-12);
        // 99 decay steps: the midpoint of the cosine is at 49.5; step 10 + 49.5 sits between.
        let middle = (SCHEDULE.lr(59) + SCHEDULE.lr(60)) / 2.0;
        assert!((middle - 5.5e-4).abs() < 1e-6, "{middle}");
        assert!((SCHEDULE.lr(109) - 1e-4).abs() < 1e-12);
        for step in 10..109 {
            assert!(SCHEDULE.lr(step + 1) < SCHEDULE.lr(step));
        }
    }

    #[test]
    fn without_warmup_the_first_step_uses_the_peak() {
        let schedule = LrSchedule {
            warmup_steps: 0,
            ..SCHEDULE
        };
        assert_eq!(schedule.lr(0), 1e-3);
        let single = LrSchedule {
            warmup_steps: 0,
            total_steps: 1,
            ..SCHEDULE
        };
        assert_eq!(single.lr(0), 1e-3);
    }
}
