//! The `divergen-train` binary as a user runs it.

use std::process::Command;

fn divergen_train(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_divergen-train"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("divergen-train runs")
}

/// The shipped models, `runtime/default/`.
fn shipped() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../runtime/default")
}

#[test]
fn a_bad_adapter_is_refused_before_anything_is_trained_or_written() {
    // Every command opens the device the flags ask for; `train generator` (then `divergen train
    // generator`) once read only the environment. It must refuse before it trains or writes anything.
    let out_dir = std::env::temp_dir().join(format!("divergen-train-adapter-{}", std::process::id()));
    let out = divergen_train(&[
        "--adapter",
        "no-such-gpu",
        "generator",
        "--out",
        out_dir.to_str().expect("utf-8"),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no adapter matches 'no-such-gpu'"));
    assert!(!out_dir.exists(), "{} was written", out_dir.display());
}

#[test]
fn train_generator_refuses_a_broken_resume_folder_before_writing() {
    let shipped = shipped();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let run = |resume: &std::path::Path| {
        divergen_train(&[
            "generator",
            "--clip",
            shipped.join("tiny-clip").to_str().unwrap(),
            "--domain",
            "/nonexistent/domain",
            "--resume",
            resume.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
    };
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = run(&empty);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("empty/training.json"), "{}", stderr(&o));

    // The shipped generator with its UNet cut short: the error names the UNet's file.
    let resume = dir.path().join("tiny-sd");
    for sub in ["vae", "unet"] {
        std::fs::create_dir_all(resume.join(sub)).unwrap();
        for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
            std::fs::copy(shipped.join("tiny-sd").join(sub).join(f), resume.join(sub).join(f)).unwrap();
        }
    }
    std::fs::copy(shipped.join("tiny-sd/training.json"), resume.join("training.json")).unwrap();
    let unet = resume.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&unet).unwrap();
    std::fs::write(&unet, &bytes[..bytes.len() / 2]).unwrap();
    let o = run(&resume);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("unet/diffusion_pytorch_model.safetensors"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists(), "nothing written on failure");
}

/// `divergen-train generator` end to end on a few steps: with `--ema-decay` the average goes to `unet/`
/// and the last step's weights to `unet-raw/`, and the folder resumes with its step count.
#[test]
fn train_generator_keeps_a_weight_average_and_resumes_from_it() {
    let clip = shipped().join("tiny-clip");
    let dir = tempfile::tempdir().unwrap();
    let domain = dir.path().join("domain");
    divergen_runtime::domain::write(
        &domain,
        &divergen_runtime::domain::DomainConfig {
            train_scenes: 1,
            val_scenes: 1,
            train_renders_per_category: 1,
            val_renders_per_category: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let train = |out: &std::path::Path, extra: &[&str]| {
        let base = [
            "generator",
            "--domain",
            domain.to_str().unwrap(),
            "--clip",
            clip.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--vae-steps",
            "2",
            "--vae-batch",
            "2",
            "--unet-steps",
            "3",
            "--unet-batch",
            "2",
            "--latent-set",
            "4",
        ];
        divergen_train(&[&base[..], extra].concat())
    };
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();
    let first = dir.path().join("first");
    let o = train(&first, &["--ema-decay", "1"]);
    assert!(
        !o.status.success() && stderr(&o).contains("--ema-decay"),
        "{}",
        stderr(&o)
    );
    assert!(!first.exists(), "nothing written for a bad flag");

    let o = train(&first, &["--ema-decay", "0.5"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let weights = |sub: &str| std::fs::read(first.join(sub).join("diffusion_pytorch_model.safetensors")).unwrap();
    let (average, raw) = (weights("unet"), weights("unet-raw"));
    assert_eq!(average.len(), raw.len());
    assert_ne!(average, raw, "the average lags the last step");
    let record = |dir: &std::path::Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("training.json")).unwrap()).unwrap()
    };
    assert_eq!(record(&first)["unet"]["ema_decay"], 0.5);

    let second = dir.path().join("second");
    let o = train(&second, &["--resume", first.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(record(&second)["unet"]["total_steps"], 6);
    assert!(!second.join("unet-raw").exists(), "no average asked for, none written");
}
