//! Medians over runs, percentiles over samples, and the pass/fail checks of the targets.

use serde::Serialize;

/// The median, min and max of one figure over the runs.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Median (mean of the middle two for an even count).
    pub median: f64,
    /// Smallest run.
    pub min: f64,
    /// Largest run.
    pub max: f64,
    /// Every run, in order.
    pub runs: Vec<f64>,
}

impl Summary {
    /// `None` for no runs.
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: sorted[0],
            max: sorted[n - 1],
            runs: values.to_vec(),
        })
    }

    /// `median [min..max]` with `decimals` digits (just the value for one run).
    pub fn show(&self, decimals: usize) -> String {
        if self.runs.len() == 1 {
            format!("{:.*}", decimals, self.median)
        } else {
            format!(
                "{:.*} [{:.*}..{:.*}]",
                decimals, self.median, decimals, self.min, decimals, self.max
            )
        }
    }
}

/// `show` for an optional summary ("-" when absent).
pub fn show(s: Option<&Summary>, decimals: usize) -> String {
    s.map_or_else(|| "-".to_owned(), |s| s.show(decimals))
}

/// The sample at percentile `p` (0..=100) of sorted samples, nearest rank.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One target of the issue, judged.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// What the target says.
    pub target: String,
    /// The figures it was judged on.
    pub observed: String,
    /// Met or not.
    pub pass: bool,
}

impl Check {
    /// A judged target.
    pub fn new(target: impl Into<String>, observed: impl Into<String>, pass: bool) -> Self {
        Self {
            target: target.into(),
            observed: observed.into(),
            pass,
        }
    }

    /// `[PASS] target: observed`.
    pub fn line(&self) -> String {
        format!(
            "[{}] {}: {}",
            if self.pass { "PASS" } else { "FAIL" },
            self.target,
            self.observed
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_percentiles() {
        let s = Summary::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Summary::of(&[1.0, 2.0]).unwrap().median, 1.5);
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
    }
}
