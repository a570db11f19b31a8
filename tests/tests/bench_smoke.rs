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

#[test]
fn net_bench_produces_every_row() {
    use vio::net_bench::{self, MTU_FRAME, Model, NetBenchConfig, NetBenchError, SMALL_FRAME};
    let cfg = NetBenchConfig {
        reps: 1,
        run_time: Duration::from_millis(30),
        models: vec!["2".parse::<Model>().unwrap()],
        frames: vec![SMALL_FRAME, MTU_FRAME],
        veth: false,
        ..NetBenchConfig::full()
    };
    let table = net_bench::run(&cfg).unwrap();
    assert_eq!(table.rows.len(), 3);
    for (row, len) in table.rows.iter().zip(["60", "1,514", "TCP over smoltcp"]) {
        assert!(matches!(&row[0], Cell::Text(m) if m == "2 direct"), "{row:?}");
        assert!(matches!(&row[1], Cell::Text(l) if l == len), "{row:?}");
        // Frames per second and Gbit/s of the stream that arrived.
        for cell in &row[2..4] {
            assert!(matches!(cell, Cell::Num(v) if *v > 0.0), "{row:?}");
        }
        // The peer was not measured: its cells say so.
        assert!(matches!(&row[6], Cell::Text(t) if t == "-"), "{row:?}");
    }
    assert!(
        table
            .notes
            .iter()
            .any(|n| n.starts_with("veth peer: not measured"))
    );
    assert!(table.render().lines().count() > table.rows.len() + 2);

    let bad = NetBenchConfig {
        frames: vec![SMALL_FRAME - 1],
        ..cfg
    };
    assert!(matches!(
        net_bench::run(&bad),
        Err(NetBenchError::FrameLength(59))
    ));
}

#[test]
fn vhost_bench_runs_both_daemons_on_every_row() {
    use vio::vhost_bench::{self, QSD, ROWS, VhostBenchConfig};
    if !std::path::Path::new(QSD).exists() {
        eprintln!("SKIPPED vhost_bench_runs_both_daemons_on_every_row: {QSD} is not installed");
        return;
    }
    let image = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("vhost-bench-smoke.img");
    let cfg = VhostBenchConfig {
        image: image.clone(),
        size: 16 << 20,
        run_time: Duration::from_millis(50),
        reps: 1,
        poll: Duration::from_micros(20),
        program: env!("CARGO_BIN_EXE_vio").into(),
    };
    let table = vhost_bench::run(&cfg).expect("vhost-user benchmark");
    assert_eq!(table.rows.len(), ROWS.len());
    for row in &table.rows {
        // Both daemons completed requests on every row.
        for cell in &row[2..4] {
            assert!(matches!(cell, Cell::Num(v) if *v > 0.0), "{row:?}");
        }
    }
    let _ = std::fs::remove_file(image);
}
