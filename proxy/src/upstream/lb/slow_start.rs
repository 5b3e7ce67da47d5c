//! Slow start (`slow_start_config` of ROUND_ROBIN and LEAST_REQUEST): a host that was added or
//! became healthy less than `slow_start_window` ago gets a reduced weight that ramps up
//! (Envoy's `EdfLoadBalancerBase::applySlowStartFactor`):
//!
//! ```text
//! time_factor = max(1 ms, since) / window
//! factor      = time_factor ^ (1 / aggression)
//! weight      = host_weight * max(factor, min_weight_percent / 100)
//! ```
//!
//! Pure: the caller passes the time since the host became healthy (a fake clock in tests).

use std::time::Duration;

use crate::upstream::SlowStartConfig;

/// The effective weight of a host of `weight` that became healthy `since` ago.
pub fn weight(weight: f64, since: Duration, cfg: &SlowStartConfig) -> f64 {
    if cfg.window.is_zero() || since >= cfg.window {
        return weight;
    }
    let since_ms = since.as_secs_f64().max(0.001);
    let time_factor = since_ms / cfg.window.as_secs_f64();
    let factor = if cfg.aggression == 1.0 {
        time_factor
    } else {
        time_factor.powf(1.0 / cfg.aggression)
    };
    weight * factor.max(cfg.min_weight_percent / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(window_s: u64, aggression: f64, min_pct: f64) -> SlowStartConfig {
        SlowStartConfig {
            window: Duration::from_secs(window_s),
            aggression,
            min_weight_percent: min_pct,
        }
    }

    #[test]
    fn linear_ramp_with_floor() {
        let c = cfg(10, 1.0, 10.0);
        // Floor: 10% until the ramp passes it.
        assert_eq!(weight(100.0, Duration::ZERO, &c), 10.0);
        assert_eq!(weight(100.0, Duration::from_millis(500), &c), 10.0);
        assert!((weight(100.0, Duration::from_secs(5), &c) - 50.0).abs() < 1e-9);
        assert!((weight(100.0, Duration::from_secs(9), &c) - 90.0).abs() < 1e-9);
        // Out of the window: full weight.
        assert_eq!(weight(100.0, Duration::from_secs(10), &c), 100.0);
        assert_eq!(weight(100.0, Duration::from_secs(60), &c), 100.0);
    }

    #[test]
    fn aggression_shapes_the_curve() {
        // aggression 2: factor = sqrt(t): faster early.
        let c = cfg(100, 2.0, 0.0);
        assert!((weight(1.0, Duration::from_secs(25), &c) - 0.5).abs() < 1e-9);
        // aggression 0.5: factor = t^2: slower early.
        let c = cfg(100, 0.5, 0.0);
        assert!((weight(1.0, Duration::from_secs(50), &c) - 0.25).abs() < 1e-9);
        // Monotone over the window.
        let c = cfg(10, 1.5, 5.0);
        let mut last = 0.0;
        for ms in (0..10_000).step_by(250) {
            let w = weight(7.0, Duration::from_millis(ms), &c);
            assert!(w >= last, "{ms}");
            last = w;
        }
    }

    #[test]
    fn zero_window_is_off() {
        assert_eq!(weight(3.0, Duration::ZERO, &cfg(0, 1.0, 10.0)), 3.0);
    }
}
