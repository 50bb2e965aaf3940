//! Medians over runs, percentiles over samples, the pass/fail checks of the targets, and the
//! plain-text tables every section prints.

use serde::Serialize;

use crate::load::Cpu;

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

/// A plain text table with aligned columns.
pub fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            width[i] = width[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = width[i]))
            .collect::<Vec<_>>()
            .join(" | ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(head.iter().map(|s| s.to_string()).collect());
    out.push('\n');
    out.push_str(
        &width
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("-|-"),
    );
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.clone()));
    }
    out
}

/// `a >= factor * b` (or `<=` with `at_most`), with the figures spelled out.
pub fn ratio_check(target: &str, a: f64, b: f64, factor: f64, at_most: bool, unit: &str) -> Check {
    let ratio = if b > 0.0 { a / b } else { f64::INFINITY };
    let pass = if at_most {
        ratio <= factor
    } else {
        ratio >= factor
    };
    Check::new(
        target,
        format!("{a:.2} vs {b:.2} {unit}: {ratio:.2}x"),
        pass,
    )
}

/// The summary of one figure derived from each run's CPU reading.
pub fn cpu_summary(runs: &[Cpu], f: impl Fn(&Cpu) -> f64) -> Option<Summary> {
    Summary::of(&runs.iter().map(f).collect::<Vec<_>>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_percentiles() {
        let s = Summary::of(&[3.0, 1.0, 2.0]).map(|s| (s.median, s.min, s.max));
        assert_eq!(s, Some((2.0, 1.0, 3.0)));
        assert_eq!(Summary::of(&[1.0, 2.0]).map(|s| s.median), Some(1.5));
        assert!(Summary::of(&[]).is_none());
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
    }
}
