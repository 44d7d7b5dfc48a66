//! Text to image against diffusers' `StableDiffusionPipeline` on the same weights and injected
//! latents (fixture: `models/fixtures/diffusion/pipeline-sd15-small`, made by
//! `models/fixtures/make_pipeline_fixture.py`): the text encoder's states (last layer and the
//! penultimate "CLIP skip" layer) and the final 8-bit image.

use std::path::{Path, PathBuf};

use divergen_kernels::testing::{devices, relative_error, to_vec};
use divergen_models::clip::ClipTextModel;
use divergen_models::clip::tokenizer::ClipTokenizer;
use divergen_models::diffusion::pipeline::{GenerateOptions, generate, read_latents};
use divergen_models::layers::Quantization;
use divergen_models::recipe;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/diffusion/pipeline-sd15-small")
}

fn reference() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixture().join("reference.json")).unwrap()).unwrap()
}

fn floats(name: &str) -> Vec<f32> {
    std::fs::read(fixture().join(name))
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The pipeline folder as diffusers lays it out: the fixture's configs, recipe weights under each
/// component's official keys, OpenAI's vocabulary as the tokenizer.
fn pipeline_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let bpe = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/clip/bpe_simple_vocab_16e6.txt.gz");
    recipe::write_diffusers_folder(&fixture(), &bpe, dir.path()).unwrap();
    dir
}

fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let mse = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

#[test]
fn text_to_image_reproduces_diffusers() {
    let reference = reference();
    let dir = pipeline_folder();
    let device = &devices()[0].device;

    // The tokenizer and the text encoder, last layer and penultimate layer.
    let tokenizer = ClipTokenizer::from_dir(&dir.path().join("tokenizer")).unwrap();
    let ids: Vec<Vec<u32>> = [
        reference["negative_prompt"].as_str().unwrap(),
        reference["prompt"].as_str().unwrap(),
    ]
    .iter()
    .map(|t| tokenizer.encode_padded(t, tokenizer.end_id()).0)
    .collect();
    let want_ids: Vec<Vec<u32>> = reference["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect();
    assert_eq!(ids, want_ids, "token ids");
    let encoder =
        ClipTextModel::load_text_encoder(&dir.path().join("text_encoder"), Quantization::None, device).unwrap();
    let err = relative_error(
        &to_vec(encoder.hidden_states(&ids, 0).unwrap()),
        &floats("prompt_embeds.f32"),
    );
    assert!(err <= 1e-4, "prompt embeddings differ by {err:.2e}");
    let err = relative_error(
        &to_vec(encoder.hidden_states(&ids[1..], 1).unwrap()),
        &floats("penultimate.f32"),
    );
    assert!(err <= 1e-4, "penultimate-layer embeddings differ by {err:.2e}");
    drop(encoder);

    // The whole run on the injected latents.
    let size = reference["size"].as_array().unwrap();
    let (width, height) = (size[1].as_u64().unwrap() as usize, size[0].as_u64().unwrap() as usize);
    let latents = read_latents(&fixture().join("latents.npy"), [1, 4, height / 8, width / 8]).unwrap();
    let options = GenerateOptions {
        prompt: reference["prompt"].as_str().unwrap().into(),
        negative_prompt: reference["negative_prompt"].as_str().unwrap().into(),
        steps: reference["steps"].as_u64().unwrap() as usize,
        guidance: reference["guidance"].as_f64().unwrap() as f32,
        scheduler: None,
        seed: 0,
        latents: Some(latents),
        width,
        height,
        quant: Quantization::None,
        clip_skip: 0,
        taesd: None,
    };
    let out = generate(dir.path(), &options, device).unwrap();
    let want = image::open(fixture().join("reference.png")).unwrap().into_rgb8();
    assert_eq!(out.image.dimensions(), want.dimensions());
    let db = psnr(out.image.as_raw(), want.as_raw());
    let differing = out
        .image
        .as_raw()
        .iter()
        .zip(want.as_raw())
        .filter(|(a, b)| a != b)
        .count();
    eprintln!(
        "PSNR {db:.1} dB against diffusers, {differing} of {} bytes differ",
        want.as_raw().len()
    );
    assert!(db >= 50.0, "PSNR {db:.1} dB < 50");
}

#[test]
fn latents_of_the_wrong_shape_are_refused_with_the_file_named() {
    let err = read_latents(&fixture().join("latents.npy"), [1, 4, 8, 8])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("latents.npy") && err.contains("[1, 4, 16, 16]") && err.contains("[1, 4, 8, 8]"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.npy");
    std::fs::write(&bad, b"not numpy").unwrap();
    assert!(
        read_latents(&bad, [1, 4, 8, 8])
            .unwrap_err()
            .to_string()
            .contains("bad.npy")
    );
}
