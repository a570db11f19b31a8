//! The benchmark's tables: consistency, barrier cost, writes-per-flush sweep.

use super::{Backend, BarrierReport, Barriers, ThroughputResult};
use crate::report::{Cell, Table, fmt_int};

impl BarrierReport {
    /// Mutants caught, of those run.
    pub fn mutants_caught(&self) -> (usize, usize) {
        let m: Vec<_> = self
            .scenarios
            .iter()
            .filter(|r| matches!(r.scenario.backend, Backend::Mutant(_)))
            .collect();
        (m.iter().filter(|r| r.violating > 0).count(), m.len())
    }

    /// The tables: consistency, throughput, sweep.
    pub fn tables(&self) -> Vec<Table> {
        let mut tables = vec![self.consistency_table()];
        if let Some(t) = &self.throughput {
            tables.push(self.throughput_table(t));
            if !t.sweep.is_empty() {
                tables.push(self.sweep_table(t));
            }
        }
        tables
    }

    fn consistency_table(&self) -> Table {
        let rows = self
            .scenarios
            .iter()
            .map(|r| {
                let verdict = match (r.scenario.expect_violations(), r.violating > 0, r.as_expected()) {
                    (_, _, false) => "UNEXPECTED",
                    (true, true, true) => "caught",
                    _ => "ok",
                };
                vec![
                    Cell::Text(r.scenario.label()),
                    Cell::Int(r.acked),
                    Cell::Int(r.images.crash_points),
                    Cell::Int(r.images.exhaustive),
                    Cell::Int(r.images.torn),
                    Cell::Int(r.images.sampled),
                    Cell::Int(r.images.adversarial),
                    Cell::Int(r.violating),
                    Cell::Text(verdict.into()),
                    Cell::Text(
                        r.examples
                            .first()
                            .map_or_else(|| "-".into(), |(p, v)| format!("@{p}: {v}")),
                    ),
                ]
            })
            .collect();
        let real: Vec<_> = self
            .scenarios
            .iter()
            .filter(|r| !r.scenario.expect_violations())
            .collect();
        let real_images: u64 = real.iter().map(|r| r.images.total()).sum();
        let real_viol: u64 = real.iter().map(|r| r.violating).sum();
        let (caught, mutants) = self.mutants_caught();
        let fid: Vec<String> = self
            .scenarios
            .iter()
            .filter(|r| r.fidelity.unwritten_changed + r.fidelity.written_differ > 0)
            .map(|r| format!("{}: {:?}", r.scenario.label(), r.fidelity))
            .collect();
        let mut notes = vec![
            format!(
                "real backend: {} images checked, {} violations; mutants caught: {caught}/{mutants}",
                fmt_int(real_images),
                fmt_int(real_viol)
            ),
            "crash point = prefix of the event log (writes, fsyncs, guest acks); images = stable writes + subsets of the volatile ones (exhaustive up to 10, sampled above, prefix tears, adversarial: none / newest only / reverse order)".into(),
            if fid.is_empty() {
                "log fidelity: the real file matches the log's final image in every run (never-written sectors unchanged)".into()
            } else {
                format!("log fidelity FAILED: {}", fid.join("; "))
            },
        ];
        for r in &self.scenarios {
            if let Some(e) = &r.workload_error {
                notes.push(format!("{}: journal stopped: {e}", r.scenario.label()));
            }
        }
        Table {
            title: "Barrier consistency: crash images of a commit-record journal (model 2, O_DIRECT)".into(),
            columns: [
                "backend, cache, mode",
                "acked txns",
                "crash points",
                "exhaustive",
                "torn",
                "sampled",
                "adversarial",
                "violating",
                "verdict",
                "first violation",
            ]
            .map(String::from)
            .to_vec(),
            rows,
            notes,
        }
    }

    fn throughput_table(&self, t: &ThroughputResult) -> Table {
        let fio_txn = t.fio.as_ref().map(|f| f.txn_per_s);
        let ratio = |x: f64| fio_txn.map_or_else(|| "-".into(), |f| format!("{:.2}x", x / f));
        let num = |x: f64| {
            if x.is_nan() {
                Cell::Text("-".into())
            } else {
                Cell::Num(x)
            }
        };
        let mut rows: Vec<Vec<Cell>> = t
            .ours
            .iter()
            .map(|(b, r)| {
                let what = match b {
                    Barriers::Writeback => "ours: writeback, barriers honoured",
                    Barriers::Unsafe => "ours: unsafe (flushes not run)",
                    Barriers::Writethrough => "ours: writethrough (RWF_DSYNC, no flushes)",
                };
                vec![
                    Cell::Text(what.into()),
                    Cell::Num(r.txn_per_s),
                    Cell::Num(r.writes_per_s),
                    num(r.flush_p50_us),
                    num(r.flush_p99_us),
                    Cell::Text(ratio(r.txn_per_s)),
                ]
            })
            .collect();
        if let Some(f) = &t.fio {
            rows.push(vec![
                Cell::Text("fio: randwrite 4k QD1 --fdatasync=1".into()),
                Cell::Num(f.txn_per_s),
                Cell::Num(f.writes_per_s),
                num(f.flush_p50_us),
                num(f.flush_p99_us),
                Cell::Text("1.00x".into()),
            ]);
        }
        Table {
            title: format!(
                "Barrier cost: sequential journal, {} data block + commit per transaction, medians of {}",
                t.blocks, self.reps
            ),
            columns: [
                "run",
                "txn/s",
                "writes/s",
                "flush p50 us",
                "flush p99 us",
                "vs fio",
            ]
            .map(String::from)
            .to_vec(),
            rows,
            notes: vec![
                format!(
                    "same file ({}), same run; a transaction is write, flush, write, flush: fio's txn/s is its writes/s / 2",
                    self.image.display()
                ),
                if t.fio.is_none() {
                    "fio is not installed: no peer figures (`vio barrier-bench` installs it)".into()
                } else {
                    "flush latency: ours is the guest's FLUSH request; fio's is its fdatasync".into()
                },
            ],
        }
    }

    fn sweep_table(&self, t: &ThroughputResult) -> Table {
        let rows = t
            .sweep
            .iter()
            .map(|&(k, o, f)| {
                vec![
                    Cell::Int(u64::from(k)),
                    Cell::Num(o),
                    f.map_or(Cell::Text("-".into()), Cell::Num),
                    Cell::Text(f.map_or_else(|| "-".into(), |f| format!("{:.2}x", o / f))),
                ]
            })
            .collect();
        Table {
            title: "Writes per flush sweep: 4 KiB writes/s, QD1".into(),
            columns: ["writes/flush", "ours writes/s", "fio writes/s", "ours/fio"]
                .map(String::from)
                .to_vec(),
            rows,
            notes: vec![
                "ours: journal with 2k-1 data blocks + commit (k writes per flush); fio: randwrite --fdatasync=k".into(),
                self.plot
                    .as_ref()
                    .map_or_else(|| "no plot".into(), |p| format!("plot: {}", p.display())),
            ],
        }
    }
}
