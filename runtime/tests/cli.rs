//! The `divergen` binary as a user runs it.

use std::process::Command;

fn divergen(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_divergen"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("divergen runs")
}

#[test]
fn devices_json_reports_adapters_and_the_choice() {
    let out = divergen(&["devices", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    let adapters = report["adapters"].as_array().expect("adapters list");
    match report["chosen"].as_u64() {
        Some(i) => {
            let a = &adapters[i as usize];
            assert!(a["max_storage_binding_bytes"].as_u64().unwrap_or(0) > 0);
            assert!(a["subgroup_max_size"].is_u64() && a["shader_f16"].is_boolean());
        }
        None => assert!(report["backend"].as_str().unwrap_or("").contains("CPU")),
    }
}

#[test]
fn mobile_limits_are_granted_as_webgpu_defaults() {
    let out = divergen(&["--limits", "mobile", "devices", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    if report["chosen"].is_u64() {
        assert_eq!(report["granted"]["max_invocations_per_workgroup"], 256);
        assert_eq!(report["granted"]["max_workgroup_shared_bytes"], 16384);
        assert_eq!(report["granted"]["max_storage_binding_bytes"], 128 << 20);
    }
}

#[test]
fn bad_settings_fail_with_a_clear_message() {
    let out = divergen(&["--limits", "tiny", "devices"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("limits profile 'tiny'"), "{err}");

    let out = divergen(&["--adapter", "no-such-gpu", "devices"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no adapter matches 'no-such-gpu'"));

    let out = divergen(&["--backend", "opengl", "devices"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("backend 'opengl'"));
}

#[test]
fn quick_kernel_bench_emits_json_lines() {
    let out = divergen(&[
        "bench",
        "kernels",
        "--quick",
        "--ours-only",
        "--json",
        "--filter",
        "group_norm",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 2, "group_norm with and without SiLU");
    for case in lines {
        assert!(case["kernel"].as_str().unwrap_or("").starts_with("group_norm"));
        assert!(case["ours_ms"].as_f64().unwrap_or(0.0) > 0.0);
        assert!(case["gbps"].as_f64().unwrap_or(0.0) > 0.0);
        assert!(case["shape"].is_string() && case.get("burn_ms").is_some());
    }
}

#[test]
fn stream_bench_sends_to_a_host_and_reports_json() {
    let dir = tempfile::tempdir().unwrap();
    let config = divergen_host::ServerConfig {
        store: divergen_host::StoreConfig {
            out: dir.path().join("out"),
            shard_size: 8,
            tar: false,
        },
        peer_timeout: std::time::Duration::from_secs(10),
    };
    let server = divergen_host::Server::open(config).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let serving = {
        let server = server.clone();
        std::thread::spawn(move || server.serve_tcp(listener))
    };
    let out = divergen(&[
        "stream",
        "bench",
        "--samples",
        "20",
        "--size",
        "64",
        "--json",
        "--to",
        &address,
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["samples"], 20);
    assert!(report["samples_per_second"].as_f64().unwrap() > 0.0);
    assert!(report["cpu_ms"]["frame_encode"].as_f64().unwrap() > 0.0);
    server.shutdown_flag().store(true, std::sync::atomic::Ordering::SeqCst);
    serving.join().unwrap().unwrap();
    assert_eq!(server.stats().store.committed, 20);
}

#[test]
fn stream_bench_rejects_an_unusable_address() {
    let out = divergen(&["stream", "bench", "--samples", "1", "--to", "nowhere"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"nowhere\" is not host:port"));
}

/// A CLIPModel folder from the parity fixture: its config, recipe weights, OpenAI's vocabulary.
fn clip_folder() -> tempfile::TempDir {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/fixtures/clip");
    let dir = tempfile::tempdir().unwrap();
    let fixture = fixtures.join("vit-b-32-2layer");
    std::fs::copy(fixture.join("config.json"), dir.path().join("config.json")).unwrap();
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture.join("reference.json")).unwrap()).unwrap();
    divergen_models::recipe::write_checkpoint(
        &dir.path().join("model.safetensors"),
        reference["keys"].as_object().unwrap(),
    )
    .unwrap();
    divergen_models::clip::tokenizer::ClipTokenizer::from_openai_bpe(&fixtures.join("bpe_simple_vocab_16e6.txt.gz"))
        .unwrap()
        .save_hf(dir.path())
        .unwrap();
    dir
}

#[test]
fn embed_prints_unit_embeddings_and_text_matches_the_reference() {
    let clip = clip_folder();
    let image = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/fixtures/clip/preprocess/input-0.png");
    let out = divergen(&[
        "embed",
        "--clip",
        clip.path().to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--text",
        "a dog",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let vector = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    let image_embedding = vector(&got["images"][0]);
    let text_embedding = vector(&got["texts"][0]);
    assert_eq!((image_embedding.len(), text_embedding.len()), (512, 512));
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm(&image_embedding) - 1.0).abs() < 1e-4);
    // "a dog" is the fixture's second text: tokenizer + text tower end to end against transformers.
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/fixtures/clip/vit-b-32-2layer");
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture.join("reference.json")).unwrap()).unwrap();
    assert_eq!(reference["texts"][1], "a dog");
    let want = vector(&reference["text_embeds"][1]);
    let want: Vec<f32> = want.iter().map(|x| x / norm(&want)).collect();
    let worst = text_embedding
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst < 1e-4,
        "text embedding differs from transformers by up to {worst}"
    );
}

#[test]
fn embed_names_a_missing_model_folder_and_a_corrupt_image() {
    let out = divergen(&["embed", "--clip", "/nonexistent/clip", "--text", "a cat"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/clip"));
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("broken.png");
    std::fs::write(&bad, b"not a png").unwrap();
    let out = divergen(&["embed", "--clip", "/nonexistent/clip", "--image", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("broken.png"));
}

fn sam_fixture() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/fixtures/sam/vit-b-2layer")
}

/// The SAM parity fixture's checkpoint (recipe weights, official keys) as a safetensors file.
fn sam_checkpoint(dir: &std::path::Path) -> std::path::PathBuf {
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sam_fixture().join("reference.json")).unwrap()).unwrap();
    let path = dir.join("sam.safetensors");
    divergen_models::recipe::write_checkpoint(&path, reference["keys"].as_object().unwrap()).unwrap();
    path
}

#[test]
fn segment_writes_the_three_background_masks_segment_anything_predicts() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = sam_checkpoint(dir.path());
    let image = sam_fixture().join("image.png");
    let out_png = dir.path().join("mask.png");
    // DiverGen's SAM-background prompt on the 480×320 fixture image: the four corners.
    let out = divergen(&[
        "segment",
        "--sam",
        ckpt.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--point",
        "0,0,1",
        "479,0,1",
        "0,319,1",
        "479,319,1",
        "--multimask",
        "--out",
        out_png.to_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sam_fixture().join("reference.json")).unwrap()).unwrap();
    let corners = &reference["cases"][0];
    assert_eq!(corners["name"], "corners");
    let logits: Vec<f32> = std::fs::read(sam_fixture().join("corners.masks.f32"))
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let plane = 480 * 320;
    for i in 0..3 {
        let mask = &got["masks"][i];
        let want_iou = corners["iou"][i].as_f64().unwrap();
        assert!(
            (mask["iou"].as_f64().unwrap() - want_iou).abs() < 1e-5,
            "{mask} vs {want_iou}"
        );
        let png = image::open(dir.path().join(format!("mask-{i}.png")))
            .unwrap()
            .into_luma8();
        assert_eq!(png.dimensions(), (480, 320));
        // Pixels agree with the reference's logits > 0, except where a logit is within rounding
        // of the threshold.
        let want = &logits[i * plane..(i + 1) * plane];
        let differing = png
            .as_raw()
            .iter()
            .zip(want)
            .filter(|(p, l)| (**p == 255) != (**l > 0.0) && l.abs() > 1e-4)
            .count();
        assert_eq!(differing, 0, "mask {i}");
        let area = png.as_raw().iter().filter(|&&p| p == 255).count() as u64;
        assert_eq!(mask["area"].as_u64().unwrap(), area);
    }
    assert!(
        !out_png.exists(),
        "with --multimask only the numbered files are written"
    );
}

#[test]
fn segment_rejects_bad_prompts_and_broken_checkpoints_without_writing() {
    let dir = tempfile::tempdir().unwrap();
    let image = sam_fixture().join("image.png");
    let out_png = dir.path().join("mask.png");
    let run = |sam: &str, extra: &[&str]| {
        let mut args = vec!["segment", "--sam", sam, "--image", image.to_str().unwrap()];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--out", out_png.to_str().unwrap()]);
        divergen(&args)
    };
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();
    // Negative coordinates parse without the `=` form (clap errors exit 2, ours 1).
    let out = run(
        "/nonexistent/sam.pth",
        &["--point", "-5,-5,1", "0,0,1", "--box", "-3,-2,10,10"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let out = run("/nonexistent/sam.pth", &["--point", "1,2,7"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("label must be 1"), "{}", stderr(&out));
    let out = run("/nonexistent/sam.pth", &["--box", "10,10,5,20"]);
    assert!(stderr(&out).contains("X0 < X1"), "{}", stderr(&out));
    let out = run("/nonexistent/sam.pth", &["--point", "1,2,1"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("/nonexistent/sam.pth"), "{}", stderr(&out));
    // A checkpoint cut short: the error names the file.
    let ckpt = sam_checkpoint(dir.path());
    let bytes = std::fs::read(&ckpt).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let out = run(cut.to_str().unwrap(), &["--point", "1,2,1"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cut.safetensors"), "{}", stderr(&out));
    assert!(!out_png.exists(), "nothing written on failure");
}

/// The small SD pipeline fixture as a diffusers folder in a temporary directory: (the directory,
/// the pipeline folder in it, the fixture folder, its reference.json).
fn sd_pipeline() -> (
    tempfile::TempDir,
    std::path::PathBuf,
    std::path::PathBuf,
    serde_json::Value,
) {
    let models = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/fixtures");
    let fixture = models.join("diffusion/pipeline-sd15-small");
    let dir = tempfile::tempdir().unwrap();
    let pipeline = dir.path().join("pipeline");
    std::fs::create_dir_all(&pipeline).unwrap();
    divergen_models::recipe::write_diffusers_folder(
        &fixture,
        &models.join("clip/bpe_simple_vocab_16e6.txt.gz"),
        &pipeline,
    )
    .unwrap();
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture.join("reference.json")).unwrap()).unwrap();
    (dir, pipeline, fixture, reference)
}

/// A device binding 32 MiB per tensor (`--max-binding-bytes`): the 192² image's whole VAE
/// decode would hold 36 MiB, so it decodes in tiles, and matches diffusers with
/// `vae.enable_tiling()` at the same tile size; a size whose UNet would pass the limit is refused
/// up front, and at 12 MiB a weight that does not fit is named, both before anything is written.
#[test]
fn generate_splits_the_decode_on_a_device_with_small_bindings() {
    let (dir, pipeline, fixture, reference) = sd_pipeline();
    let out_png = dir.path().join("mug.png");
    let latents = fixture.join("latents-192.npy");
    let generate = |size: &str, injected: bool, limit: &str| {
        let mut args = vec![
            "generate",
            "--diffusion",
            pipeline.to_str().unwrap(),
            "--prompt",
            reference["prompt"].as_str().unwrap(),
            "--negative",
            reference["negative_prompt"].as_str().unwrap(),
            "--steps",
            "2",
            "--guidance",
            "7.5",
            "--size",
            size,
            "--out",
            out_png.to_str().unwrap(),
            "--max-binding-bytes",
            limit,
            "--backend",
            "gpu",
        ];
        if injected {
            args.extend(["--latents", latents.to_str().unwrap()]);
        }
        Command::new(env!("CARGO_BIN_EXE_divergen"))
            .args(args)
            .env_remove("RUST_LOG")
            .output()
            .expect("divergen runs")
    };
    let out = generate("192x192", true, "33554432");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    if stderr.contains("CPU engine") {
        return; // no adapter: nothing binds, nothing to split for
    }
    assert!(stderr.contains("in tiles of 16 latent cells"), "{stderr}");
    let got = image::open(&out_png).unwrap().into_rgb8();
    let want = image::open(fixture.join("reference-tiled.png")).unwrap().into_rgb8();
    let worst = got
        .as_raw()
        .iter()
        .zip(want.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(
        worst <= 1,
        "tiled pixels differ from diffusers' tiled decode by up to {worst}"
    );

    std::fs::remove_file(&out_png).unwrap();
    let out = generate("1024x1024", false, "33554432");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("more than the 32 MiB this device holds per tensor; at most 528x528 here"),
        "{stderr}"
    );
    assert!(!out_png.exists());
    let out = generate("128x128", false, "12582912");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("unet/diffusion_pytorch_model.safetensors")
            && stderr.contains("MiB as f32, more than the 12 MiB this device holds per tensor"),
        "{stderr}"
    );
    assert!(!out_png.exists());
}

#[test]
fn generate_reproduces_the_diffusers_image_from_injected_latents() {
    let (dir, pipeline, fixture, reference) = sd_pipeline();
    let out_png = dir.path().join("mug.png");
    let latents = fixture.join("latents.npy");
    let out = divergen(&[
        "generate",
        "--diffusion",
        pipeline.to_str().unwrap(),
        "--prompt",
        reference["prompt"].as_str().unwrap(),
        "--negative",
        reference["negative_prompt"].as_str().unwrap(),
        "--steps",
        "2",
        "--guidance",
        "7.5",
        "--size",
        "128x128",
        "--latents",
        latents.to_str().unwrap(),
        "--out",
        out_png.to_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["timesteps"], serde_json::json!([501.0, 1.0]));
    let got = image::open(&out_png).unwrap().into_rgb8();
    let want = image::open(fixture.join("reference.png")).unwrap().into_rgb8();
    let worst = got
        .as_raw()
        .iter()
        .zip(want.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(worst <= 1, "pixels differ from diffusers by up to {worst}");

    // Latents of the wrong size, a bad size and a missing folder fail with the culprit named,
    // and write nothing.
    let bad_out = dir.path().join("none.png");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--diffusion",
            pipeline.to_str().unwrap(),
            "--prompt",
            "a mug",
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--out", bad_out.to_str().unwrap()]);
        divergen(&args)
    };
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();
    let o = run(&["--latents", latents.to_str().unwrap(), "--size", "64x64"]);
    assert!(
        !o.status.success() && stderr(&o).contains("latents.npy"),
        "{}",
        stderr(&o)
    );
    let o = run(&["--size", "100x64"]);
    assert!(
        !o.status.success() && stderr(&o).contains("multiples of 8"),
        "{}",
        stderr(&o)
    );
    // Past what the device holds: refused up front with the limit named, never a panic (exit 101).
    let o = run(&["--size", "8192x8192"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("MiB this device holds per tensor; at most"),
        "{}",
        stderr(&o)
    );
    for guidance in ["--guidance=NaN", "--guidance=-1"] {
        let o = run(&[guidance]);
        assert_eq!(o.status.code(), Some(2), "{guidance}: {}", stderr(&o));
        assert!(stderr(&o).contains("finite number"), "{}", stderr(&o));
    }
    let o = divergen(&[
        "generate",
        "--diffusion",
        "/nonexistent/sd",
        "--prompt",
        "x",
        "--out",
        bad_out.to_str().unwrap(),
    ]);
    assert!(
        !o.status.success() && stderr(&o).contains("/nonexistent/sd"),
        "{}",
        stderr(&o)
    );
    assert!(!bad_out.exists());
}
