//! The UNet against diffusers' `UNet2DConditionModel` on the same weights: SD 1.5 and SD 2.x
//! styles at real channel widths and head sizes, two resolution levels (fixtures:
//! `models/fixtures/diffusion/unet-*`, made by `models/fixtures/make_unet_fixture.py`).

use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData};
use divergen_kernels::testing::{devices, for_each_device, relative_error, to_vec};
use divergen_models::diffusion::unet::UNet;
use divergen_models::layers::Quantization;
use divergen_models::recipe;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/diffusion")
        .join(name)
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    (dot / (na * nb)) as f32
}

fn check(name: &str) {
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture(name).join("reference.json")).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture(name).join("config.json"), dir.path().join("config.json")).unwrap();
    recipe::write_checkpoint(
        &dir.path().join("diffusion_pytorch_model.safetensors"),
        reference["keys"].as_object().unwrap(),
    )
    .unwrap();
    let dims = |key: &str| -> Vec<usize> {
        reference[key]["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect()
    };
    let (sd, cd) = (dims("sample"), dims("context"));
    let sample = recipe::values("unet_sample", sd.iter().product(), 1.7, 0.0);
    let context = recipe::values("unet_context", cd.iter().product(), 1.7, 0.0);
    let timesteps: Vec<f32> = reference["timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_f64().unwrap() as f32)
        .collect();
    let want: Vec<f32> = reference["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let first = devices()[0].label.clone();
    for_each_device(|device, label| {
        let formats: &[(Quantization, Option<f32>)] = if label == first {
            &[
                (Quantization::None, None),
                (Quantization::Int8, Some(0.999)),
                (Quantization::Int4, Some(0.999)),
            ]
        } else {
            &[(Quantization::None, None)]
        };
        for &(quant, min_cosine) in formats {
            let unet = UNet::load(dir.path(), quant, device).unwrap();
            let out = unet
                .forward(
                    Tensor::from_data(TensorData::new(sample.clone(), [sd[0], sd[1], sd[2], sd[3]]), device),
                    &timesteps,
                    Tensor::from_data(TensorData::new(context.clone(), [cd[0], cd[1], cd[2]]), device),
                )
                .unwrap();
            let got = to_vec(out);
            let (err, cos) = (relative_error(&got, &want), cosine(&got, &want));
            eprintln!("{name} {label} {quant:?}: relative error {err:.2e}, cosine {cos:.6}");
            match min_cosine {
                None => assert!(
                    err <= 1e-4,
                    "{name} {label}: UNet output differs from diffusers by {err:.2e}"
                ),
                Some(min) => assert!(cos >= min, "{name} {label} {quant:?}: cosine {cos} < {min}"),
            }
        }
    });
}

#[test]
fn unet_sd15_style_matches_diffusers() {
    check("unet-sd15-2level");
}

#[test]
fn unet_sd21_style_without_mid_block_matches_diffusers() {
    check("unet-sd21-2level");
}
