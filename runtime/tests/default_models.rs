//! The embedded default's shipped weights (`runtime/default/`) load through the real-model
//! loaders, compute what segment_anything and diffusers compute, and carry the metadata those
//! tools require. Their quality bars are `models/train/tests/default_quality.rs`.

use std::path::Path;

use divergen_kernels::testing::devices;
use divergen_models::layers::Quantization;

fn f32s(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn assert_close(what: &str, want: &[f32], got: &[f32], tol: f32) {
    assert_eq!(want.len(), got.len(), "{what}: lengths");
    let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max).max(1e-3);
    let err = want.iter().zip(got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(err <= tol * scale, "{what}: max abs error {err} (scale {scale})");
}

/// The shipped files load strictly into segment_anything and diffusers
/// (`fixtures/make_default_models_reference.py`), and our loaders compute what they compute.
#[test]
fn the_shipped_models_match_segment_anything_and_diffusers() {
    use burn::tensor::{Tensor, TensorData};
    use divergen_models::diffusion::unet::UNet;
    use divergen_models::diffusion::vae::VaeDecoder;
    use divergen_models::sam::{Point, PointLabel, Prompt, Sam};
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fixtures = root.join("tests/fixtures/default-models");
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures.join("reference.json")).unwrap()).unwrap();
    let device = &devices()[0].device;

    // The VAE round trip in diffusers exercises the encoder our runtime never loads.
    let mse = reference["vae"]["roundtrip_mse"].as_f64().unwrap();
    assert!(mse < 0.05, "diffusers' VAE round trip MSE {mse}");

    let image = image::open(fixtures.join("render.png")).unwrap().into_rgb8();
    let sam = Sam::load(
        &root.join("default/tiny-sam/model.safetensors"),
        Quantization::None,
        device,
    )
    .unwrap();
    let embedding = sam.embed_image(&image).unwrap();
    let corners = Prompt {
        points: [(0.0, 0.0), (63.0, 0.0), (0.0, 63.0), (63.0, 63.0)]
            .into_iter()
            .map(|(x, y)| Point {
                x,
                y,
                label: PointLabel::Foreground,
            })
            .collect(),
        ..Default::default()
    };
    let (low, _) = sam.decode(&embedding, &corners, true).unwrap();
    assert_close(
        "SAM corners",
        &f32s(&fixtures.join("sam-corners.low.f32")),
        &low.concat(),
        1e-4,
    );
    let b: Vec<f32> = reference["sam"]["box"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let boxed = Prompt {
        bbox: Some([b[0], b[1], b[2], b[3]]),
        ..Default::default()
    };
    let (low, _) = sam.decode(&embedding, &boxed, false).unwrap();
    assert_close("SAM box", &f32s(&fixtures.join("sam-box.low.f32")), &low.concat(), 1e-4);

    let side = reference["vae"]["latent_side"].as_u64().unwrap() as usize;
    let vae = VaeDecoder::load(&root.join("default/tiny-sd/vae"), device).unwrap();
    // The reference decoded unscaled latents / scaling_factor; ours divides by it too.
    let latents = Tensor::<4>::from_data(
        TensorData::new(f32s(&fixtures.join("vae-latents.f32")), [1, 4, side, side]),
        device,
    );
    let decoded = vae
        .decode(latents)
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap();
    assert_close("VAE decode", &f32s(&fixtures.join("vae-decoded.f32")), &decoded, 1e-4);

    let unet = UNet::load(&root.join("default/tiny-sd/unet"), Quantization::None, device).unwrap();
    let shape = |key: &str| -> Vec<usize> {
        reference["unet"][key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect()
    };
    let (s, c) = (shape("sample"), shape("context"));
    let sample = Tensor::<4>::from_data(
        TensorData::new(f32s(&fixtures.join("unet-sample.f32")), [s[0], s[1], s[2], s[3]]),
        device,
    );
    let context = Tensor::<3>::from_data(
        TensorData::new(f32s(&fixtures.join("unet-context.f32")), [c[0], c[1], c[2]]),
        device,
    );
    let t: Vec<f32> = reference["unet"]["timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let out = unet
        .forward(sample, &t, context)
        .unwrap()
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap();
    assert_close("UNet", &f32s(&fixtures.join("unet-out.f32")), &out, 1e-4);
}

/// transformers and diffusers refuse a safetensors file without `__metadata__`
/// (`metadata.get("format")` on `None`), so every shipped file must carry `{"format": "pt"}`.
#[test]
fn every_shipped_safetensors_file_carries_the_format_metadata() {
    fn visit(dir: &Path, found: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                visit(&path, found);
            } else if path.extension().is_some_and(|e| e == "safetensors") {
                found.push(path);
            }
        }
    }
    let mut files = Vec::new();
    visit(&Path::new(env!("CARGO_MANIFEST_DIR")).join("default"), &mut files);
    assert!(files.len() >= 5, "{files:?}");
    for path in files {
        let bytes = std::fs::read(&path).unwrap();
        let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let format = metadata.metadata().as_ref().and_then(|m| m.get("format").cloned());
        assert_eq!(format.as_deref(), Some("pt"), "{}", path.display());
    }
}
