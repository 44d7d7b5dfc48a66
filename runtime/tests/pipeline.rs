//! `divergen run` end to end on small random-weight models on lavapipe: a two-family generator
//! mix (DDIM + VAE with guidance, Euler + TAESD without), a tiny SAM, a 2-layer CLIP ViT-B/32, a
//! synthetic LVIS-style real dataset. Checks the outputs' invariants and determinism by seed.

use std::path::{Path, PathBuf};

use divergen_kernels::testing::devices;
use divergen_models::clip::tokenizer::ClipTokenizer;
use divergen_models::recipe;
use divergen_runtime::pipeline::config::RunConfig;
use divergen_runtime::pipeline::{self, Destination, InstanceRecord};
use image::{Rgb, RgbImage};

fn models_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/fixtures")
}

/// Model folders and a real dataset (about 0.9 GB of recipe weights), written once per test
/// run into cargo's per-target scratch folder and replaced by the next run, so nothing piles up
/// in the system's temp folder (a static is never dropped, so a `TempDir` would leak).
fn world() -> &'static Path {
    static WORLD: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pipeline-world");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        build_world(&dir);
        dir
    })
}

fn keys(path: &Path) -> serde_json::Map<String, serde_json::Value> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    match v.get("keys") {
        Some(k) => k.as_object().unwrap().clone(),
        None => v.as_object().unwrap().clone(),
    }
}

fn build_world(root: &Path) {
    let fx = models_fixtures();
    let bpe = fx.join("clip/bpe_simple_vocab_16e6.txt.gz");
    let sd = root.join("sd15-small");
    std::fs::create_dir_all(&sd).unwrap();
    recipe::write_diffusers_folder(&fx.join("diffusion/pipeline-sd15-small"), &bpe, &sd).unwrap();
    let taesd = root.join("taesd");
    std::fs::create_dir_all(&taesd).unwrap();
    std::fs::copy(fx.join("diffusion/taesd/config.json"), taesd.join("config.json")).unwrap();
    recipe::write_checkpoint(
        &taesd.join("diffusion_pytorch_model.safetensors"),
        &keys(&fx.join("diffusion/taesd/reference.json")),
    )
    .unwrap();
    let tiny_sam = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sam-keys.json");
    recipe::write_checkpoint(&root.join("sam.safetensors"), &keys(&tiny_sam)).unwrap();
    let clip = root.join("clip");
    std::fs::create_dir_all(&clip).unwrap();
    let clip_fx = fx.join("clip/vit-b-32-2layer");
    std::fs::copy(clip_fx.join("config.json"), clip.join("config.json")).unwrap();
    recipe::write_checkpoint(&clip.join("model.safetensors"), &keys(&clip_fx.join("reference.json"))).unwrap();
    ClipTokenizer::from_openai_bpe(&bpe).unwrap().save_hf(&clip).unwrap();

    // Three categories; 1 and 2 have real instances, 3 (an "ImageNet extra") has none.
    std::fs::write(
        root.join("categories.json"),
        r#"[
          {"id": 1, "name": "red_box", "def": "a box painted red", "synset": "box.n.01", "frequency": "f"},
          {"id": 2, "name": "blue_ball", "def": "a round blue toy", "synset": "ball.n.01", "frequency": "c"},
          {"id": 3, "name": "tench", "def": "a freshwater fish", "synset": "tench.n.01", "frequency": "r"}
        ]"#,
    )
    .unwrap();
    std::fs::write(root.join("area.json"), r#"{"1": [0.3, 0.05], "2": [0.2, 0.05]}"#).unwrap();
    std::fs::create_dir_all(root.join("bank")).unwrap();
    std::fs::write(
        root.join("bank/2.txt"),
        "A photo of a blue ball, in a white background\nAn image of a small blue ball, in a white background\n",
    )
    .unwrap();

    // Real images: a textured background with a red rectangle (category 1) and a blue triangle
    // (category 2), LVIS-style (no file_name, only coco_url).
    let images = root.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let mut entries = Vec::new();
    let mut anns = Vec::new();
    for i in 0..3u32 {
        let (w, h) = (96, 72);
        let img = RgbImage::from_fn(w, h, |x, y| {
            let t = ((x * 7 + y * 3 + i * 11) % 40) as u8;
            if (10 + i * 5..50 + i * 5).contains(&x) && (10..40).contains(&y) {
                Rgb([200, 30 + t, 30])
            } else if x > 55 && y > 30 && (x - 55) < (y - 30) {
                Rgb([30, 40, 200 - t])
            } else {
                Rgb([120 + t, 120, 110 + t])
            }
        });
        let name = format!("{:012}.jpg", i + 1);
        img.save(images.join(&name)).unwrap();
        entries.push(serde_json::json!({
            "id": i + 1, "width": w, "height": h,
            "coco_url": format!("http://images.cocodataset.org/train2017/{name}"),
            "neg_category_ids": [3], "not_exhaustive_category_ids": []
        }));
        let (x0, x1) = (10 + i * 5, 50 + i * 5);
        anns.push(serde_json::json!({
            "id": 10 * i + 1, "image_id": i + 1, "category_id": 1,
            "segmentation": [[x0, 10, x1, 10, x1, 40, x0, 40]], "iscrowd": 0
        }));
        anns.push(serde_json::json!({
            "id": 10 * i + 2, "image_id": i + 1, "category_id": 2,
            "segmentation": [[56, 31, 56, 71, 95, 71]], "iscrowd": 0
        }));
    }
    std::fs::write(
        root.join("instances.json"),
        serde_json::to_vec(&serde_json::json!({"images": entries, "annotations": anns, "categories": []})).unwrap(),
    )
    .unwrap();
}

fn config_text(extra: &str) -> String {
    format!(
        r#"
seed = 7
device_id = "test-device"
{extra}

[categories]
table = "categories.json"
area_stats = "area.json"

[generation]
images_per_category = 2
batch = 3
prompt_sources = ["template", "bank", "grammar"]
prompt_bank = "bank"
grammar_prompts = 4
quant = "none"

[[generation.generators]]
id = "sd-ddim-vae"
folder = "sd15-small"
scheduler = "ddim"
steps = 1
guidance = 7.5
width = 64
height = 64
ratio = 1

[[generation.generators]]
id = "sd-euler-taesd"
folder = "sd15-small"
scheduler = "euler"
steps = 1
guidance = 0
width = 64
height = 64
ratio = 1
taesd = "taesd"

[annotation]
sam = "sam.safetensors"
quant = "int8"
min_area = 0.0

[filter]
clip = "clip"
quant = "none"
threshold = -1.0
no_real = "text"
text_threshold = -1.0

[real]
annotations = "instances.json"
images = "images"

[paste]
images = 4
max_instances = 20
"#
    )
}

fn config(extra: &str) -> RunConfig {
    config_from(&config_text(extra))
}

fn config_from(text: &str) -> RunConfig {
    let path = tempfile::Builder::new().suffix(".toml").tempfile_in(world()).unwrap();
    std::fs::write(path.path(), text).unwrap();
    RunConfig::from_file(path.path()).unwrap()
}

/// One run at a time: the device's memory pool is shared by the whole test process, and the
/// budget test reads its high-water mark.
fn run(config: &RunConfig, out: &Path) -> pipeline::RunManifest {
    run_to(config, out, Destination::Local)
}

fn run_to(config: &RunConfig, out: &Path, destination: Destination) -> pipeline::RunManifest {
    static DEVICE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    pipeline::run(config, out, &destination, &devices()[0].device, "test").unwrap()
}

#[test]
fn the_four_stages_run_and_the_output_verifies() {
    let config = config("");
    let out = tempfile::tempdir().unwrap();
    let m = run(&config, out.path());
    assert_eq!(m.generated, 6);
    // Real bank: categories 1 and 2 from 3 crops each; 3 falls back to the text score.
    assert_eq!(m.real_bank.crops, 6);
    let cats: Vec<(u32, usize)> = m.categories.iter().map(|c| (c.id, c.real_crops)).collect();
    assert_eq!(cats, [(1, 3), (2, 3), (3, 0)]);
    let records = pipeline::read_records(out.path()).unwrap();
    assert_eq!(records.len(), 6);
    for r in &records {
        // Category 2 has a bank file: its prompts come from it.
        if r.category_id == 2 {
            assert!(r.prompt.contains("blue ball"), "{}", r.prompt);
        }
        match (&r.crop, r.drop_reason) {
            (Some(crop), _) => {
                let img = image::open(out.path().join(crop)).unwrap().into_rgba8();
                let [_, _, w, h] = r.bbox.unwrap();
                assert_eq!(img.dimensions(), (w, h));
                let expected = if r.category_id == 3 { "text" } else { "real-bank" };
                assert_eq!(r.score_kind, expected);
                assert!(r.clip_score.unwrap().abs() <= 1.0);
                // Thresholds at -1 keep everything that got a mask.
                assert!(r.kept && r.crop.as_ref().unwrap().starts_with("pool/"));
            }
            (None, Some(reason)) => assert!(!r.kept, "{reason:?}"),
            (None, None) => panic!("{} has neither a crop nor a reason", r.name),
        }
    }
    let kept = records.iter().filter(|r| r.kept).count();
    assert_eq!(m.kept, kept);
    // The pool in X-Paste's format lists exactly the kept crops, by 0-based category.
    let pool: std::collections::BTreeMap<String, Vec<String>> =
        serde_json::from_slice(&std::fs::read(out.path().join("pool/pool.json")).unwrap()).unwrap();
    assert_eq!(pool.values().map(Vec::len).sum::<usize>(), kept);
    for paths in pool.values() {
        for p in paths {
            assert!(p.starts_with('*') && Path::new(&p[1..]).exists(), "{p}");
        }
    }
    // Four pasted samples in a dataset the host's verifier accepts.
    assert_eq!(m.output.samples, 4);
    assert_eq!(m.paste.images, 4);
    let report = divergen_host::verify::verify(&out.path().join("dataset"), |_, _| {}).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.images, 4);
    assert!(m.paste.real_annotations == 8, "{:?}", m.paste);
    // Every stage reports time and items.
    assert_eq!(m.stages.generation.items, 6);
    assert_eq!(m.stages.annotation.items, 6);
    // Report PNGs.
    let files = pipeline::report::render(out.path(), 2).unwrap();
    let names: Vec<String> = files
        .files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(names.contains(&"clip-scores.png".to_string()), "{names:?}");
    assert!(names.contains(&"sample-000.png".to_string()), "{names:?}");
    assert!(names.iter().any(|n| n.starts_with("instances-")), "{names:?}");
    for f in &files.files {
        image::open(f).unwrap();
    }
}

/// The first shard's annotations of a dataset folder, without the shard's `info`.
fn dataset_annotations(dataset: &Path) -> serde_json::Value {
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dataset.join("shard-000000/annotations.json")).unwrap()).unwrap();
    v["info"] = serde_json::Value::Null;
    v
}

#[test]
fn the_same_seed_gives_the_same_output_whatever_the_budget() {
    let out_a = tempfile::tempdir().unwrap();
    let out_b = tempfile::tempdir().unwrap();
    // One image per category keeps the three runs short. No budget: everything resident. A
    // small budget: models loaded per batch.
    let small =
        |extra: &str| config_from(&config_text(extra).replace("images_per_category = 2", "images_per_category = 1"));
    let a = run(&small(""), out_a.path());
    let b = run(&small("budget_mib = 400"), out_b.path());
    // The measured pool high-water mark stays inside the budget (everything resident takes
    // about 1 GiB here). The CPU engine has no device pool to measure.
    if let (Some(peak_a), Some(peak_b)) = (a.peak_device_mib, b.peak_device_mib) {
        assert!(peak_b <= 400.0 && peak_a > peak_b, "{peak_a} / {peak_b}");
    } else {
        assert!(a.peak_device_mib.is_none() && b.peak_device_mib.is_none());
    }
    assert!(a.plan.iter().all(|p| p.resident));
    assert!(b.plan.iter().any(|p| !p.resident), "{:?}", b.plan);
    let strip = |mut r: Vec<InstanceRecord>| {
        r.iter_mut().for_each(|r| r.sam_iou = (r.sam_iou * 1e4).round() / 1e4);
        serde_json::to_string(&r).unwrap()
    };
    assert_eq!(
        strip(pipeline::read_records(out_a.path()).unwrap()),
        strip(pipeline::read_records(out_b.path()).unwrap())
    );
    assert!(
        dataset_annotations(&out_a.path().join("dataset")) == dataset_annotations(&out_b.path().join("dataset")),
        "the datasets differ"
    );
    // The second run found the real bank in its own cache folder: nothing shared.
    assert_eq!(b.real_bank.cached, 0);
    // Streamed to a host instead, the same samples land in the host's shards.
    let host_out = tempfile::tempdir().unwrap();
    let server = divergen_host::Server::open(divergen_host::ServerConfig {
        store: divergen_host::StoreConfig {
            out: host_out.path().to_path_buf(),
            shard_size: 256,
            tar: false,
        },
        peer_timeout: std::time::Duration::from_secs(30),
    })
    .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let serving = {
        let server = server.clone();
        std::thread::spawn(move || server.serve_tcp(listener))
    };
    let streamed_out = tempfile::tempdir().unwrap();
    let streamed = run_to(&small(""), streamed_out.path(), Destination::Host(address));
    assert_eq!((streamed.output.kind, streamed.output.samples), ("stream", 4));
    server.shutdown_flag().store(true, std::sync::atomic::Ordering::SeqCst);
    serving.join().unwrap().unwrap();
    assert!(
        dataset_annotations(host_out.path()) == dataset_annotations(&out_a.path().join("dataset")),
        "the streamed dataset differs from the local one"
    );

    // Rerunning into the same folder reuses the cached bank and resumes the dataset.
    let again = run(&small("budget_mib = 400"), out_b.path());
    assert_eq!(again.real_bank.cached, 3);
    assert_eq!(again.real_bank.crops, 0);
    assert_eq!(again.output.duplicates, 4);
}

#[test]
fn bad_configs_name_the_key() {
    let dir = world();
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let typo = write("typo.toml", &config_text("").replace("max_instances", "max_instance"));
    let e = RunConfig::from_file(&typo).unwrap_err().to_string();
    assert!(e.contains("typo.toml") && e.contains("max_instance"), "{e}");
    let bad = write(
        "bad.toml",
        &config_text("").replace("threshold = -1.0\n", "threshold = 3.0\n"),
    );
    let e = RunConfig::from_file(&bad).unwrap_err().to_string();
    assert!(e.contains("filter.threshold"), "{e}");
    let bank = write("bank.toml", &config_text("").replace("prompt_bank = \"bank\"\n", ""));
    let e = RunConfig::from_file(&bank).unwrap_err().to_string();
    assert!(e.contains("generation.prompt_bank"), "{e}");
}

#[test]
fn the_cli_refuses_bad_input_and_writes_no_manifest() {
    let dir = world();
    let out = tempfile::tempdir().unwrap();
    let divergen = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_divergen"))
            .args(args)
            .output()
            .unwrap();
        (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let typo = dir.join("cli-typo.toml");
    std::fs::write(&typo, config_text("").replace("[paste]", "[pasted]")).unwrap();
    let (ok, err) = divergen(&[
        "run",
        "--config",
        typo.to_str().unwrap(),
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("cli-typo.toml") && err.contains("pasted"), "{err}");

    let missing = dir.join("cli-missing.toml");
    std::fs::write(&missing, config_text("").replace("sam.safetensors", "no-such-sam.pth")).unwrap();
    let (ok, err) = divergen(&[
        "run",
        "--config",
        missing.to_str().unwrap(),
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("no-such-sam.pth"), "{err}");
    assert!(!out.path().join(pipeline::MANIFEST).exists());

    let (ok, err) = divergen(&["report", out.path().to_str().unwrap()]);
    assert!(!ok && err.contains("run.json"), "{err}");
}

#[test]
fn annotations_of_unknown_categories_are_named_and_can_stop_the_run() {
    let dir = world();
    let mut real: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("instances.json")).unwrap()).unwrap();
    let anns = real["annotations"].as_array_mut().unwrap();
    let template = anns[0].clone();
    for (id, category) in [(9001, 999), (9002, 999), (9003, 998)] {
        let mut a = template.clone();
        a["id"] = id.into();
        a["category_id"] = category.into();
        anns.push(a);
    }
    std::fs::write(dir.join("instances-unknown.json"), serde_json::to_vec(&real).unwrap()).unwrap();
    let text = config_text("").replace(
        "annotations = \"instances.json\"",
        "annotations = \"instances-unknown.json\"",
    );
    assert!(text.contains("instances-unknown.json"));
    let warn = config_from(&text);
    let loaded = pipeline::real_data::RealDataset::load(&warn.real.annotations, &warn.real.images).unwrap();
    let categories = pipeline::categories::Categories::load(&warn.categories).unwrap();
    let unknown = pipeline::unknown_categories(&loaded, &categories);
    assert_eq!(unknown.into_iter().collect::<Vec<_>>(), vec![(998, 1), (999, 2)]);
    let strict = config_from(&text.replace(
        "annotations = \"instances-unknown.json\"",
        "annotations = \"instances-unknown.json\"\nunknown_categories = \"error\"",
    ));
    let out = tempfile::tempdir().unwrap();
    let err = pipeline::run(&strict, out.path(), &Destination::Local, &devices()[0].device, "test")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("999 (2×)") && err.contains("998 (1×)") && err.contains("instances-unknown.json"),
        "{err}"
    );
    assert!(!out.path().join("run.json").exists());
}

/// SIGKILL in the middle of stages 1–3, then the same command again: the rerun takes the
/// finished instances from the killed run's pool and its output matches an uninterrupted run.
#[test]
fn a_run_killed_mid_generation_resumes_and_matches_an_uninterrupted_one() {
    let dir = world();
    let config = dir.join("resume.toml");
    // One instance per batch: each is saved as soon as it is filtered.
    let text = config_text("");
    assert!(text.contains("batch = 3"));
    std::fs::write(&config, text.replace("batch = 3", "batch = 1")).unwrap();
    let command = |out: &Path, log: &str| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_divergen"));
        c.args([
            "run",
            "--config",
            config.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .env("RUST_LOG", log)
        .stdout(std::process::Stdio::null());
        c
    };
    let whole = tempfile::tempdir().unwrap();
    let o = command(whole.path(), "warn").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let killed = tempfile::tempdir().unwrap();
    let saved = |out: &Path| {
        std::fs::read_dir(out.join(pipeline::RESUME)).map_or(0, |d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "json"))
            })
            .count()
        })
    };
    let mut child = command(killed.path(), "warn")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while saved(killed.path()) < 2 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        assert!(started.elapsed().as_secs() < 300, "no instance saved in 5 minutes");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let done = saved(killed.path());
    assert!(!killed.path().join(pipeline::MANIFEST).exists());
    assert!((2..6).contains(&done), "{done} of 6 saved when killed");

    let o = command(killed.path(), "info").output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("resuming: {done} of 6 instances")), "{stderr}");
    let records = |out: &Path| serde_json::to_string(&pipeline::read_records(out).unwrap()).unwrap();
    assert_eq!(records(killed.path()), records(whole.path()));
    assert!(
        dataset_annotations(&killed.path().join("dataset")) == dataset_annotations(&whole.path().join("dataset")),
        "the resumed run's dataset differs from the uninterrupted one"
    );
}
