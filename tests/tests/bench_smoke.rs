//! The benchmarks' code paths, run for a moment so they cannot rot: every row is
//! produced and every rate is positive. (Figures come from `vio`, never from tests.)

use std::time::Duration;
use vio::model_bench::{self, ModelBenchConfig};
use vio::report::Cell;

#[test]
fn model_bench_produces_every_row() {
    let cfg = ModelBenchConfig {
        reps: 1,
        run_time: Duration::from_millis(1),
        sizes: vec![64, 5000],
        batch: 4,
    };
    let table = model_bench::run(&cfg);
    // Per size: memcpy plus five model rows in each direction.
    assert_eq!(table.rows.len(), 2 * (1 + 2 * 5));
    for row in &table.rows {
        match row[3] {
            Cell::Num(rate) => assert!(rate > 0.0, "{row:?}"),
            ref other => panic!("rate cell {other:?}"),
        }
    }
    assert!(table.render().lines().count() > table.rows.len());
}
