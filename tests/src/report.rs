//! Benchmark results: aligned tables for people, JSON for comparing runs.

use serde::Serialize;
use std::fmt::Write as _;
use virtio_core::features::Features;
use virtio_core::ring::areas::RingFormat;

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
    /// What [`Figure::ratio`] should come to, if there is a target for it.
    pub goal: Option<Goal>,
}

impl Figure {
    /// Our figure relative to the peer's, oriented so that < 1 means "ours is
    /// cheaper" for times and > 1 means "ours is faster" for throughputs.
    pub fn ratio(&self) -> Option<f64> {
        self.peer.filter(|p| *p > 0.0).map(|p| self.ours / p)
    }

    /// Whether the ratio meets the goal: `None` without a goal or without a ratio
    /// (no peer figure to judge against).
    pub fn goal_met(&self) -> Option<bool> {
        Some(self.goal?.met(self.ratio()?))
    }

    /// The goal column: the target and whether this run met it.
    fn goal_cell(&self) -> Cell {
        let Some(goal) = self.goal else {
            return Cell::Text("-".into());
        };
        let verdict = match self.goal_met() {
            Some(true) => "met",
            Some(false) => "NOT met",
            None => "no ratio",
        };
        Cell::Text(format!("{goal}: {verdict}"))
    }
}

/// A target for a figure's ratio to its peer measured in the same run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Goal {
    /// The ratio must be at most this (a time or a cost: lower is better).
    AtMost(f64),
    /// The ratio must be at least this (a rate: higher is better).
    AtLeast(f64),
}

impl Goal {
    /// Whether `ratio` meets the goal.
    pub fn met(self, ratio: f64) -> bool {
        match self {
            Goal::AtMost(g) => ratio <= g,
            Goal::AtLeast(g) => ratio >= g,
        }
    }
}

impl std::fmt::Display for Goal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Goal::AtMost(g) => write!(f, "<= {g:.2}x"),
            Goal::AtLeast(g) => write!(f, ">= {g:.2}x"),
        }
    }
}

/// The ring a run asked for, as notes name it: `split` or `packed`, with
/// ` + IN_ORDER` when IN_ORDER was asked for (and so negotiated only if offered).
pub fn ring_asked(ring: RingFormat, in_order: bool) -> String {
    let format = match ring {
        RingFormat::Split => "split",
        RingFormat::Packed => "packed",
    };
    if in_order {
        format!("{format} + IN_ORDER")
    } else {
        format.into()
    }
}

/// The ring a run negotiated, as tables name it: `split` or `packed`
/// (VIRTIO_F_RING_PACKED), with ` + IN_ORDER` when VIRTIO_F_IN_ORDER was
/// negotiated too. Read from the negotiated `features`, never from what was asked.
pub fn ring_label(features: u64) -> String {
    let f = Features::from_bits_retain(features);
    ring_asked(RingFormat::of(f), f.contains(Features::IN_ORDER))
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
            goal: None,
        });
    }

    /// Like [`Report::add_median`], with a goal for the ratio to the peer.
    pub fn add_median_with_goal(
        &mut self,
        name: &str,
        unit: &str,
        xs: &mut [f64],
        peer: Option<(f64, &str)>,
        goal: Option<Goal>,
    ) {
        self.add_median(name, unit, xs, peer);
        if let Some(f) = self.figures.last_mut() {
            f.goal = goal;
        }
    }

    /// The report as a generic table; a `goal` column follows the ratio when a
    /// figure has a goal.
    pub fn to_table(&self) -> Table {
        let text = |s: &str| Cell::Text(s.to_string());
        let goals = self.figures.iter().any(|f| f.goal.is_some());
        let rows = self
            .figures
            .iter()
            .map(|f| {
                let mut row = vec![
                    text(&f.name),
                    text(&f.unit),
                    Cell::Num(f.ours),
                    text(f.peer_name.as_deref().unwrap_or("-")),
                    f.peer.map_or(text("-"), Cell::Num),
                    f.ratio().map_or(text("-"), |r| Cell::Text(format!("{r:.2}x"))),
                ];
                if goals {
                    row.push(f.goal_cell());
                }
                row
            })
            .collect();
        let mut columns: Vec<String> = ["measurement", "unit", "ours", "peer", "peer value", "ours/peer"]
            .map(String::from)
            .to_vec();
        if goals {
            columns.push("goal".into());
        }
        Table {
            title: self.title.clone(),
            columns,
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
    /// Appends the rows of `other`, a table of the same columns (the same benchmark
    /// run again with other settings), and those of its notes this one lacks.
    ///
    /// # Errors
    /// `other`, untouched, when its columns differ.
    pub fn append(&mut self, other: Table) -> Result<(), Box<Table>> {
        if other.columns != self.columns {
            return Err(Box::new(other));
        }
        self.rows.extend(other.rows);
        for n in other.notes {
            if !self.notes.contains(&n) {
                self.notes.push(n);
            }
        }
        Ok(())
    }

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
            goal: None,
        });
        r.figures.push(Figure {
            name: "longer name".into(),
            unit: "ops/s".into(),
            ours: 6_000_000.0,
            peer: None,
            peer_name: None,
            reps: 3,
            goal: None,
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

    #[test]
    fn goals_are_judged_on_the_ratio_in_their_own_column() {
        let mut r = Report::new("t");
        r.add_median("base", "ns", &mut [100.0], None);
        let peer = Some((100.0, "base"));
        r.add_median_with_goal("cheaper", "ns", &mut [50.0], peer, Some(Goal::AtMost(0.6)));
        r.add_median_with_goal("dearer", "ns", &mut [70.0], peer, Some(Goal::AtMost(0.6)));
        r.add_median_with_goal("rate", "1/s", &mut [130.0], peer, Some(Goal::AtLeast(1.3)));
        r.add_median_with_goal("slow rate", "1/s", &mut [120.0], peer, Some(Goal::AtLeast(1.3)));
        r.add_median_with_goal("no peer", "1/s", &mut [120.0], None, Some(Goal::AtLeast(1.3)));
        let met: Vec<_> = r.figures.iter().map(Figure::goal_met).collect();
        assert_eq!(
            met,
            [None, Some(true), Some(false), Some(true), Some(false), None]
        );
        let t = r.to_table();
        assert_eq!(t.columns.last().map(String::as_str), Some("goal"));
        let goal: Vec<String> = t.rows.iter().map(|row| row[6].shown()).collect();
        assert_eq!(
            goal,
            [
                "-",
                "<= 0.60x: met",
                "<= 0.60x: NOT met",
                ">= 1.30x: met",
                ">= 1.30x: NOT met",
                ">= 1.30x: no ratio"
            ]
        );
        // No goal anywhere: no goal column.
        r.figures.retain(|f| f.goal.is_none());
        assert_eq!(r.to_table().columns.len(), 6);
    }

    #[test]
    fn ring_labels_name_the_negotiated_format() {
        use virtio_core::features::Features;
        let (packed, in_order) = (Features::RING_PACKED.bits(), Features::IN_ORDER.bits());
        let v1 = Features::VERSION_1.bits();
        assert_eq!(ring_label(v1), "split");
        assert_eq!(ring_label(v1 | packed), "packed");
        assert_eq!(ring_label(v1 | in_order), "split + IN_ORDER");
        assert_eq!(ring_label(v1 | packed | in_order), "packed + IN_ORDER");
    }

    #[test]
    fn append_takes_rows_and_new_notes_of_the_same_columns_only() {
        let table = |row: &str, notes: &[&str]| Table {
            title: "t".into(),
            columns: vec!["a".into()],
            rows: vec![vec![Cell::Text(row.into())]],
            notes: notes.iter().map(|n| n.to_string()).collect(),
        };
        let mut t = table("split", &["same", "split only"]);
        t.append(table("packed", &["same", "packed only"])).unwrap();
        assert_eq!(t.rows.len(), 2);
        assert_eq!(t.notes, ["same", "split only", "packed only"]);
        let other = Table {
            columns: vec!["b".into()],
            ..table("x", &[])
        };
        assert!(t.append(other).is_err());
        assert_eq!(t.rows.len(), 2);
    }
}
