//! Mixing generator families by ratio: exact shares, seeded order, checked settings, and two
//! families (DDIM + VAE with guidance, Euler + TAESD without) run end to end on the pipeline
//! fixture, each image carrying its record.

use std::path::{Path, PathBuf};

use divergen_kernels::testing::devices;
use divergen_models::diffusion::mix::{GeneratorMix, GeneratorSpec};
use divergen_models::layers::Quantization;
use divergen_models::recipe;

fn spec(id: &str, ratio: f64) -> GeneratorSpec {
    GeneratorSpec {
        id: id.into(),
        folder: PathBuf::from("unused"),
        scheduler: None,
        steps: 1,
        guidance: 0.0,
        width: 64,
        height: 64,
        ratio,
        clip_skip: 0,
        taesd: None,
    }
}

#[test]
fn shares_follow_the_ratios_exactly_and_the_order_follows_the_seed() {
    let mix = GeneratorMix::new(vec![spec("sd15", 3.0), spec("turbo", 1.0)]).unwrap();
    let counts = |picks: &[usize]| {
        [
            picks.iter().filter(|&&p| p == 0).count(),
            picks.iter().filter(|&&p| p == 1).count(),
        ]
    };
    assert_eq!(counts(&mix.assign(8, 1)), [6, 2]);
    assert_eq!(counts(&mix.assign(10, 1)), [8, 2]); // 7.5 / 2.5: the tie goes to the first
    assert_eq!(counts(&mix.assign(1000, 5)), [750, 250]);
    assert_eq!(mix.assign(100, 42), mix.assign(100, 42));
    assert_ne!(mix.assign(100, 42), mix.assign(100, 43));
}

#[test]
fn bad_generator_settings_name_the_generator() {
    let err = |specs| GeneratorMix::new(specs).err().unwrap().to_string();
    assert!(err(vec![spec("a", 1.0), spec("a", 1.0)]).contains("\"a\": id used twice"));
    assert!(err(vec![spec("a", 0.0)]).contains("\"a\": ratio 0"));
    let mut odd = spec("odd", 1.0);
    odd.width = 100;
    assert!(err(vec![odd]).contains("\"odd\": size 100x64"));
    let mut sched = spec("s", 1.0);
    sched.scheduler = Some("plms".into());
    assert!(err(vec![sched]).contains("scheduler \"plms\""));
    assert!(err(vec![]).contains("empty"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mix.json");
    std::fs::write(
        &file,
        r#"[{"id": "a", "folder": "x", "steps": 1, "guidance": 0, "width": 64, "height": 64, "ratoi": 2}]"#,
    )
    .unwrap();
    let e = GeneratorMix::from_file(&file).err().unwrap().to_string();
    assert!(e.contains("mix.json") && e.contains("ratoi"), "{e}");
}

#[test]
fn two_families_generate_with_their_records() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("sd15-small");
    std::fs::create_dir_all(&folder).unwrap();
    recipe::write_diffusers_folder(
        &fixtures.join("diffusion/pipeline-sd15-small"),
        &fixtures.join("clip/bpe_simple_vocab_16e6.txt.gz"),
        &folder,
    )
    .unwrap();
    let taesd = dir.path().join("taesd");
    std::fs::create_dir_all(&taesd).unwrap();
    let taesd_fixture = fixtures.join("diffusion/taesd");
    std::fs::copy(taesd_fixture.join("config.json"), taesd.join("config.json")).unwrap();
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(taesd_fixture.join("reference.json")).unwrap()).unwrap();
    recipe::write_checkpoint(
        &taesd.join("diffusion_pytorch_model.safetensors"),
        reference["keys"].as_object().unwrap(),
    )
    .unwrap();

    let mut a = spec("ddim-vae", 1.0);
    (a.folder, a.scheduler, a.guidance) = (folder.clone(), Some("ddim".into()), 7.5);
    let mut b = spec("euler-taesd", 1.0);
    (b.folder, b.scheduler, b.steps, b.taesd) = (folder, Some("euler".into()), 2, Some(taesd));
    let mix = GeneratorMix::new(vec![a, b]).unwrap();
    let device = &devices()[0].device;
    let picks = mix.assign(2, 9);
    assert_eq!(
        {
            let mut p = picks.clone();
            p.sort();
            p
        },
        vec![0, 1]
    );
    let mut images = Vec::new();
    for (k, &g) in picks.iter().enumerate() {
        let (out, record) = mix
            .generate(
                g,
                "a photo of a single red mug",
                "blurry",
                100 + k as u64,
                Quantization::None,
                device,
            )
            .unwrap();
        assert_eq!(out.image.dimensions(), (64, 64));
        assert_eq!(record.generator_id, mix.generators[g].id);
        assert_eq!(record.seed, 100 + k as u64);
        assert_eq!(out.timesteps.len(), mix.generators[g].steps);
        images.push((g, record.seed, out.image));
    }
    assert_ne!(images[0].2, images[1].2, "two families, two images");
    // The same generator and seed give the same image.
    let (g, seed, first) = &images[0];
    let (again, _) = mix
        .generate(
            *g,
            "a photo of a single red mug",
            "blurry",
            *seed,
            Quantization::None,
            device,
        )
        .unwrap();
    assert_eq!(&again.image, first);
}
