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
