//! Benchmark results: aligned tables for people, JSON for comparing runs.

use serde::Serialize;
use std::fmt::Write as _;

/// One measured figure, optionally beside the same figure for a peer from the same run.
#[derive(Debug, Clone)]
pub struct Figure {
    /// What was measured.
    pub name: String,
    /// Unit of `ours` and `peer`.
    pub unit: String,
    /// Our median.
    pub ours: f64,
    /// The peer's median, measured in the same run.
    pub peer: Option<f64>,
    /// Name of the peer.
    pub peer_name: Option<String>,
    /// How many repetitions the medians come from.
    pub reps: usize,
}

impl Figure {
    /// Our figure relative to the peer's, oriented so that < 1 means "ours is
    /// cheaper" for times and > 1 means "ours is faster" for throughputs.
    pub fn ratio(&self) -> Option<f64> {
        self.peer.filter(|p| *p > 0.0).map(|p| self.ours / p)
    }
}

/// A titled set of figures.
#[derive(Debug, Clone)]
pub struct Report {
    /// Title of the run.
    pub title: String,
    /// The figures, in print order.
    pub figures: Vec<Figure>,
    /// Free-form notes printed under the table (conditions, targets).
    pub notes: Vec<String>,
}

impl Report {
    /// An empty report.
    pub fn new(title: impl Into<String>) -> Report {
        Report {
            title: title.into(),
            figures: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Adds the median of `xs` (and the median of the peer measured in the same run)
    /// as a figure.
    pub fn add_median(&mut self, name: &str, unit: &str, xs: &mut [f64], peer: Option<(f64, &str)>) {
        self.figures.push(Figure {
            name: name.into(),
            unit: unit.into(),
            ours: median(xs),
            peer: peer.map(|p| p.0),
            peer_name: peer.map(|p| p.1.to_string()),
            reps: xs.len(),
        });
    }

    /// The report as a generic table.
    pub fn to_table(&self) -> Table {
        let text = |s: &str| Cell::Text(s.to_string());
        let rows = self
            .figures
            .iter()
            .map(|f| {
                vec![
                    text(&f.name),
                    text(&f.unit),
                    Cell::Num(f.ours),
                    text(f.peer_name.as_deref().unwrap_or("-")),
                    f.peer.map_or(text("-"), Cell::Num),
                    f.ratio().map_or(text("-"), |r| Cell::Text(format!("{r:.2}x"))),
                ]
            })
            .collect();
        Table {
            title: self.title.clone(),
            columns: ["measurement", "unit", "ours", "peer", "peer value", "ours/peer"]
                .map(String::from)
                .to_vec(),
            rows,
            notes: self.notes.clone(),
        }
    }

    /// Renders the report as an aligned text table.
    pub fn table(&self) -> String {
        self.to_table().render()
    }
}

/// A cell of a [`Table`]: text is left-aligned, numbers right-aligned.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Cell {
    /// Text.
    Text(String),
    /// A number, printed with [`fmt_num`] and kept exact in JSON.
    Num(f64),
    /// A whole number (a size, a count), printed exactly with thousands separators.
    Int(u64),
}

impl Cell {
    fn shown(&self) -> String {
        match self {
            Cell::Text(s) => s.clone(),
            Cell::Num(v) => fmt_num(*v),
            Cell::Int(v) => fmt_int(*v),
        }
    }
}

/// A titled table of rows, printed aligned or written as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Table {
    /// Printed above the table.
    pub title: String,
    /// Column headers.
    pub columns: Vec<String>,
    /// Rows, each as long as `columns`.
    pub rows: Vec<Vec<Cell>>,
    /// Printed under the table.
    pub notes: Vec<String>,
}

impl Table {
    /// Renders the table with aligned columns.
    pub fn render(&self) -> String {
        let shown: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| r.iter().map(Cell::shown).collect())
            .collect();
        let mut width: Vec<usize> = self.columns.iter().map(|c| c.chars().count()).collect();
        for r in &shown {
            for (w, c) in width.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        // A column is numeric (right-aligned) if any of its cells is a number.
        let numeric: Vec<bool> = (0..self.columns.len())
            .map(|i| {
                self.rows
                    .iter()
                    .any(|r| matches!(r.get(i), Some(Cell::Num(_) | Cell::Int(_))))
            })
            .collect();
        let mut out = String::new();
        let _ = writeln!(out, "{}", self.title);
        let line = |out: &mut String, cells: &[String]| {
            let mut l = String::new();
            for (i, (c, w)) in cells.iter().zip(&width).enumerate() {
                let _ = if numeric[i] {
                    write!(l, "{c:>w$}  ")
                } else {
                    write!(l, "{c:<w$}  ")
                };
            }
            let _ = writeln!(out, "{}", l.trim_end());
        };
        line(&mut out, &self.columns);
        let rule: Vec<String> = width.iter().map(|w| "-".repeat(*w)).collect();
        line(&mut out, &rule);
        for r in &shown {
            line(&mut out, r);
        }
        for n in &self.notes {
            let _ = writeln!(out, "  {n}");
        }
        out
    }
}

/// Formats a figure with three significant digits and a thousands separator for
/// large numbers.
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    if v.abs() >= 1000.0 {
        // Rounded to a whole number, with separators: 6,123,456.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // |v| >= 1000, finite
        let whole = fmt_int(v.abs().round() as u64);
        if v < 0.0 { format!("-{whole}") } else { whole }
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A whole number with thousands separators: 65,536.
pub fn fmt_int(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// The median of `xs` (sorted in place); 0 for an empty slice.
pub fn median(xs: &mut [f64]) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(f64::total_cmp);
    let m = xs.len() / 2;
    if xs.len() % 2 == 1 {
        xs[m]
    } else {
        (xs[m - 1] + xs[m]) / 2.0
    }
}

/// The `p`-quantile (0..=1) of `xs` (sorted in place), nearest rank.
pub fn quantile(xs: &mut [f64], p: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(f64::total_cmp);
    let rank = (p.clamp(0.0, 1.0) * (xs.len() - 1) as f64).round();
    // `rank` lies in 0..len by the clamp above.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    xs[rank as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_format_readably() {
        assert_eq!(fmt_num(6_123_456.4), "6,123,456");
        assert_eq!(fmt_num(1000.0), "1,000");
        assert_eq!(fmt_num(612.4), "612");
        assert_eq!(fmt_num(12.34), "12.3");
        assert_eq!(fmt_num(0.456), "0.46");
        assert_eq!(fmt_num(-2500.0), "-2,500");
        assert_eq!(fmt_int(64), "64");
        assert_eq!(fmt_int(65536), "65,536");
        assert_eq!(fmt_int(1_000_000), "1,000,000");
    }

    #[test]
    fn medians_and_quantiles() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&mut []), 0.0);
        let mut v: Vec<f64> = (0..=100).map(f64::from).collect();
        assert_eq!(quantile(&mut v, 0.99), 99.0);
        assert_eq!(quantile(&mut v, 0.0), 0.0);
    }

    #[test]
    fn table_columns_line_up() {
        let mut r = Report::new("t");
        r.figures.push(Figure {
            name: "a".into(),
            unit: "ns".into(),
            ours: 12.0,
            peer: Some(48.0),
            peer_name: Some("peer".into()),
            reps: 3,
        });
        r.figures.push(Figure {
            name: "longer name".into(),
            unit: "ops/s".into(),
            ours: 6_000_000.0,
            peer: None,
            peer_name: None,
            reps: 3,
        });
        let t = r.table();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 5);
        assert!(lines[3].contains("0.25x"), "{t}");
        // The unit column starts at the same place on every row.
        let col = lines[1].find("unit").unwrap();
        assert_eq!(&lines[3][col..col + 2], "ns");
        assert_eq!(&lines[4][col..col + 5], "ops/s");
    }
}
