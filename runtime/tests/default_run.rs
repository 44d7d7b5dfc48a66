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
    // Read as LVIS's API would: a category an image annotates is never also verified absent
    // there, nor both absent and not exhaustively annotated.
    let mut pasted_categories = 0;
    for shard in std::fs::read_dir(dir.join("dataset")).unwrap() {
        let path = shard.unwrap().path().join("annotations.json");
        if !path.exists() {
            continue;
        }
        let file: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let ids = |v: &serde_json::Value| -> Vec<u64> {
            v.as_array()
                .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
                .unwrap_or_default()
        };
        for image in file["images"].as_array().unwrap() {
            let id = image["id"].as_u64().unwrap();
            let negative = ids(&image["neg_category_ids"]);
            let not_exhaustive = ids(&image["not_exhaustive_category_ids"]);
            let annotations: Vec<&serde_json::Value> = file["annotations"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|a| a["image_id"].as_u64() == Some(id))
                .collect();
            for a in &annotations {
                let c = a["category_id"].as_u64().unwrap();
                assert!(
                    !negative.contains(&c),
                    "image {id} annotates category {c} and lists it as negative"
                );
                pasted_categories += usize::from(a["source"] == "generated");
            }
            assert!(
                negative.iter().all(|c| !not_exhaustive.contains(c)),
                "image {id}: {negative:?} ∩ {not_exhaustive:?}"
            );
        }
    }
    assert!(pasted_categories > 0, "no generated annotation was read back");
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
