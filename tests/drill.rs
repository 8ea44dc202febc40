//! The DR drill's short form (`examples/drill`): replicator, health checker,
//! failover records and a device on two local regions; the primary stops
//! mid-stream and comes back. Its figures are printed, not timed here: what
//! is asserted is the outcome.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_short_drill_loses_nothing_and_the_device_goes_over_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let options = iotdr_drill::Options {
        iotdr: env!("CARGO_BIN_EXE_iotdr").into(),
        dir: dir.path().to_path_buf(),
        things: 10,
        rate: 10.0,
        before_outage: std::time::Duration::from_secs(3),
        outage: std::time::Duration::from_secs(2),
        health_interval: std::time::Duration::from_millis(500),
    };
    let report = iotdr_drill::run(&options, Box::new(|line| eprintln!("{line}"))).await;
    let logs: String = ["replicator.log", "watch.log"]
        .iter()
        .map(|log| format!("--- {log}\n{}\n", std::fs::read_to_string(dir.path().join(log)).unwrap_or_default()))
        .collect();
    let report = report.unwrap_or_else(|e| panic!("the drill failed: {e:#}\n{logs}"));
    eprintln!("{}", serde_json::to_string_pretty(&report).unwrap());
    assert!(report.changes_reached_stream > 0, "{report:?}");
    assert_eq!(report.rpo_missing, 0, "changes lost: {report:?}\n{logs}");
    assert!(report.device_changes_on_secondary > 0, "the device worked on the secondary: {report:?}");
    for secret in [iotdr_drill::backends::moto::SECRET_ACCESS_KEY, "BEGIN CERTIFICATE", "PRIVATE KEY"] {
        assert!(!logs.contains(secret), "a log shows {secret}");
    }
}
