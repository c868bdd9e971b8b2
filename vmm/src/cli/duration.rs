//! Every duration flag goes through here: a positive, finite number of a
//! unit, at most [`MAX`]. Anything else is one clear error line from clap,
//! never a panic later (`Duration::from_secs_f64` panics past u64 seconds,
//! `Instant + Duration` past the clock's range). Proved by
//! `bad_command_lines_fail_with_one_clear_line` in `vmm/tests/kvm.rs`.

use std::time::Duration;

/// The longest duration any flag takes: one year.
pub const MAX: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DurationError {
    #[error("{0:?} is not a number")]
    NotANumber(String),
    #[error("{0} must be a positive, finite number of {1}")]
    NotPositive(String, &'static str),
    #[error("{0} {1} is too long (at most {2} {1}, one year)")]
    TooLong(String, &'static str, f64),
}

fn parse(s: &str, unit_secs: f64, unit: &'static str) -> Result<Duration, DurationError> {
    let t = s.trim();
    let v: f64 = t
        .parse()
        .map_err(|_| DurationError::NotANumber(t.to_string()))?;
    if !(v > 0.0 && v.is_finite()) {
        return Err(DurationError::NotPositive(t.to_string(), unit));
    }
    let max = MAX.as_secs_f64() / unit_secs;
    if v > max {
        return Err(DurationError::TooLong(t.to_string(), unit, max));
    }
    // In range now: the product is at most a year and at least 1e-300 s,
    // which Duration rounds to zero; a zero duration is refused too.
    let d = Duration::from_secs_f64(v * unit_secs);
    if d.is_zero() {
        return Err(DurationError::NotPositive(t.to_string(), unit));
    }
    Ok(d)
}

/// A number of seconds (fractions allowed).
pub fn seconds(s: &str) -> Result<Duration, DurationError> {
    parse(s, 1.0, "seconds")
}

/// A number of milliseconds (fractions allowed).
pub fn millis(s: &str) -> Result<Duration, DurationError> {
    parse(s, 1e-3, "milliseconds")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_bounded_and_never_panic() {
        assert_eq!(seconds("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(millis("2"), Ok(Duration::from_millis(2)));
        for bad in [
            "1e19", "1e20", "1e300", "inf", "NaN", "0", "-1", "1e-300", "x", "",
        ] {
            assert!(seconds(bad).is_err(), "{bad}");
            assert!(millis(bad).is_err(), "{bad}");
        }
        assert!(matches!(millis("1e22"), Err(DurationError::TooLong(..))));
        assert!(millis("1e9").is_ok(), "11.6 days is a legal gap");
        assert_eq!(seconds(&format!("{}", MAX.as_secs())), Ok(MAX));
    }
}
