//! `divergen-host` on bad input: clear errors naming the file, non-zero exit.

use std::process::Command;

fn host() -> Command {
    Command::new(env!("CARGO_BIN_EXE_divergen-host"))
}

#[test]
fn verify_of_a_missing_folder_fails_naming_it() {
    let output = host().args(["verify", "/nonexistent/divergen-out"]).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/divergen-out"), "{stderr}");
}

#[test]
fn verify_names_a_corrupt_annotation_file() {
    let dir = tempfile::tempdir().unwrap();
    let shard = dir.path().join("shard-000000");
    std::fs::create_dir_all(&shard).unwrap();
    std::fs::write(
        dir.path().join("categories.json"),
        r#"{"categories":[{"id":1,"name":"a","synset":"a.n.01","def":"","frequency":"f"}]}"#,
    )
    .unwrap();
    std::fs::write(shard.join("annotations.json"), b"{\"images\": [").unwrap();
    let output = host().args(["verify", "--json"]).arg(dir.path()).output().unwrap();
    assert!(!output.status.success());
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let problems = report["problems"].as_array().unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p.as_str().unwrap().contains("shard-000000/annotations.json")),
        "{report:#}"
    );
}

#[test]
fn serve_refuses_a_bad_category_file_and_an_unusable_address() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("cats.json");
    std::fs::write(
        &bad,
        r#"{"categories":[{"id":0,"name":"zero","synset":"","def":"","frequency":"f"}]}"#,
    )
    .unwrap();
    let output = host()
        .args(["serve", "--listen", "127.0.0.1:0", "--out"])
        .arg(dir.path().join("out"))
        .arg("--categories")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cats.json") && stderr.contains("id 0"), "{stderr}");

    let output = host()
        .args(["serve", "--listen", "not-an-address", "--out"])
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("not-an-address"));
}

/// A hand-written shard as another tool might write it: a float `area` (valid COCO) is read, and
/// an image that annotates a category it also lists as verified absent is the one problem.
#[test]
fn verify_reads_float_areas_and_reports_contradictory_negative_labels() {
    let dir = tempfile::tempdir().unwrap();
    let shard = dir.path().join("shard-000000");
    std::fs::create_dir_all(shard.join("images")).unwrap();
    std::fs::write(
        dir.path().join("categories.json"),
        r#"{"categories":[{"id":1,"name":"a","synset":"a.n.01","def":"","frequency":"f"}]}"#,
    )
    .unwrap();
    std::fs::write(
        shard.join("images/1.png"),
        divergen_host::store::encode_png(4, 4, &[0u8; 4 * 4 * 3]),
    )
    .unwrap();
    let annotations = serde_json::json!({
        "info": {"description": "written by hand", "version": "1", "shard": 0},
        "licenses": [],
        "categories": [{"id": 1, "name": "a", "synset": "a.n.01", "def": "", "frequency": "f",
                        "image_count": 1, "instance_count": 1}],
        "images": [{"id": 1, "file_name": "1.png", "width": 4, "height": 4,
                    "neg_category_ids": [1], "not_exhaustive_category_ids": [],
                    "device_id": "d", "run_id": "r", "seed": 0, "seq": 0}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1,
                         "segmentation": {"size": [4, 4], "counts": [0, 2, 14]},
                         "area": 2.0, "bbox": [0.0, 0.0, 1.0, 2.0], "iscrowd": 0, "source": "real"}],
    });
    std::fs::write(
        shard.join("annotations.json"),
        serde_json::to_vec(&annotations).unwrap(),
    )
    .unwrap();
    std::fs::write(
        shard.join("index.json"),
        r#"{"shard":0,"samples":1,"first_image_id":1,"first_annotation_id":1,"annotations":1,"sessions":[]}"#,
    )
    .unwrap();
    let output = host().arg("verify").arg(dir.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("neg_category_ids") && stderr.contains("[1]"),
        "{stderr}"
    );
    assert!(stderr.contains(" 1 problem in "), "{stderr}");
    assert!(!stderr.contains("area"), "the float area was refused: {stderr}");
}
