//! The README's main job: `divergen run` with no config runs the four stages on the embedded
//! default, under a small memory budget, and writes a dataset the host's verifier accepts, the
//! instance pool and the report.

use std::process::Command;

#[test]
fn the_default_run_completes_on_a_small_budget_and_verifies() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("run");
    let run = Command::new(env!("CARGO_BIN_EXE_divergen"))
        .args(["run", "--out", dir.to_str().unwrap(), "--budget-mib", "72", "--json"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("divergen runs");
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let manifest: serde_json::Value = serde_json::from_slice(&run.stdout).expect("the manifest as JSON");
    assert_eq!(manifest["generated"].as_u64(), Some(18 * 4));
    let kept = manifest["kept"].as_u64().unwrap_or(0);
    assert!(kept > 0, "no instance of 72 kept");
    if let Some(peak) = manifest["peak_device_mib"].as_f64() {
        assert!(peak <= 72.0, "peak {peak} MiB over the 72 MiB budget");
    }
    let report = divergen_host::verify::verify(&dir.join("dataset"), |_, _| {}).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.images, 120);
    assert!(dir.join("pool/pool.json").exists());
    let pngs = std::fs::read_dir(dir.join("report"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "png"))
        })
        .count();
    assert!(pngs >= 3, "{pngs} report PNGs");
}
