//! The VAE decoders against diffusers on the same weights: `AutoencoderKL.decode` with SD 1.5's
//! config at full channel width, and `AutoencoderTiny` (TAESD), on an 8×8 latent (fixtures:
//! `models/fixtures/diffusion/{vae-sd15,taesd}`, made by `models/fixtures/make_vae_fixture.py`).

use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData};
use divergen_kernels::testing::{for_each_device, relative_error, to_vec};
use divergen_models::diffusion::taesd::{AutoencoderTinyConfig, TinyDecoder};
use divergen_models::diffusion::tiling::{Tiling, decode_tiled};
use divergen_models::diffusion::vae::{AutoencoderKlConfig, VaeDecoder};
use divergen_models::recipe;

fn fixture() -> PathBuf {
    fixture_of("vae-sd15")
}

fn fixture_of(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/diffusion")
        .join(name)
}

/// A diffusers decoder folder: the fixture's config and recipe weights under the official keys.
fn folder_of(name: &str, reference: &serde_json::Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture_of(name).join("config.json"), dir.path().join("config.json")).unwrap();
    recipe::write_checkpoint(
        &dir.path().join("diffusion_pytorch_model.safetensors"),
        reference["keys"].as_object().unwrap(),
    )
    .unwrap();
    dir
}

/// Decodes the fixture's latents with `decode` (a loader from a folder, on a device) on every
/// device and compares with diffusers.
fn check_decoder(name: &str, decode: impl Fn(&Path, Tensor<4>, &burn::tensor::Device) -> Tensor<4>) {
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture_of(name).join("reference.json")).unwrap()).unwrap();
    let dir = folder_of(name, &reference);
    let want: Vec<f32> = reference["image"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let latents = recipe::values("vae_latents", 4 * 8 * 8, 1.7, 0.0);
    for_each_device(|device, label| {
        let image = decode(
            dir.path(),
            Tensor::from_data(TensorData::new(latents.clone(), [1, 4, 8, 8]), device),
            device,
        );
        assert_eq!(image.dims(), [1, 3, 64, 64]);
        let err = relative_error(&to_vec(image), &want);
        eprintln!("{name} {label}: decode relative error {err:.2e}");
        assert!(
            err <= 1e-4,
            "{name} {label}: decode differs from diffusers by {err:.2e}"
        );
    });
}

#[test]
fn vae_decoder_matches_diffusers() {
    check_decoder("vae-sd15", |dir, z, device| {
        VaeDecoder::load(dir, device).unwrap().decode(z)
    });
}

#[test]
fn taesd_decoder_matches_diffusers() {
    check_decoder("taesd", |dir, z, device| {
        TinyDecoder::load(dir, device).unwrap().decode(z)
    });
}

#[test]
fn a_vae_folder_with_a_wrong_layer_names_file_and_key() {
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture().join("reference.json")).unwrap()).unwrap();
    let mut keys = reference["keys"].as_object().unwrap().clone();
    keys.insert("decoder.conv_in.weight".into(), serde_json::json!([512, 4, 1, 1]));
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture().join("config.json"), dir.path().join("config.json")).unwrap();
    recipe::write_checkpoint(&dir.path().join("diffusion_pytorch_model.safetensors"), &keys).unwrap();
    let device = &divergen_kernels::testing::devices()[0].device;
    let err = VaeDecoder::load(dir.path(), device).err().unwrap().to_string();
    assert!(
        err.contains("diffusion_pytorch_model.safetensors")
            && err.contains("decoder.conv_in.weight has shape [512, 4, 1, 1], expected [512, 4, 3, 3]"),
        "{err}"
    );
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"up_block_types": ["AttnUpDecoderBlock2D"]}"#,
    )
    .unwrap();
    let err = VaeDecoder::load(dir.path(), device).err().unwrap().to_string();
    assert!(
        err.contains("config.json") && err.contains("AttnUpDecoderBlock2D"),
        "{err}"
    );
}

/// Tiled decoding against diffusers' `AutoencoderKL.tiled_decode` (tiles of 8 latent cells):
/// the narrow VAE of `vae-tiled/`, and TAESD inside the same stitching.
fn check_tiled(
    name: &str,
    reference_file: &str,
    factor: usize,
    decode: impl Fn(&Path, &burn::tensor::Device) -> Box<dyn Fn(Tensor<4>) -> Tensor<4>>,
) {
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture_of(name).join(reference_file)).unwrap()).unwrap();
    let keys: serde_json::Value = if reference.get("keys").is_some() {
        reference.clone()
    } else {
        serde_json::from_slice(&std::fs::read(fixture_of(name).join("reference.json")).unwrap()).unwrap()
    };
    let dir = folder_of(name, &keys);
    let want: Vec<f32> = reference["image"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let shape: Vec<usize> = reference["latents"]["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let want_shape: Vec<usize> = reference["image_shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let latents = recipe::values("vae_tiled_latents", shape.iter().product(), 1.7, 0.0);
    let tiling = Tiling {
        latent_tile: reference["latent_tile"].as_u64().unwrap() as usize,
        factor,
    };
    for_each_device(|device, label| {
        let decoder = decode(dir.path(), device);
        let z = Tensor::from_data(
            TensorData::new(latents.clone(), [shape[0], shape[1], shape[2], shape[3]]),
            device,
        );
        let image = decode_tiled(z, tiling, &decoder).unwrap();
        assert_eq!(image.shape.to_vec(), want_shape);
        let err = relative_error(&image.data, &want);
        eprintln!("{name} tiled {label}: relative error {err:.2e}");
        assert!(
            err <= 1e-4,
            "{name} {label}: tiled decode differs from diffusers by {err:.2e}"
        );
    });
}

#[test]
fn tiled_vae_decode_matches_diffusers_tiled_decode() {
    check_tiled("vae-tiled", "reference.json", 4, |dir, device| {
        let vae = VaeDecoder::load(dir, device).unwrap();
        Box::new(move |z| vae.decode(z))
    });
}

#[test]
fn tiled_taesd_decode_matches_diffusers_stitching() {
    check_tiled("taesd", "reference-tiled.json", 8, |dir, device| {
        let taesd = TinyDecoder::load(dir, device).unwrap();
        Box::new(move |z| taesd.decode(z))
    });
}

/// The size estimates that decide between whole and tiled decoding, on the published configs:
/// SD's VAE holds its 256-channel upsample at full resolution (256 MiB at 512²), TAESD its
/// 64 channels there.
#[test]
fn decoders_know_their_largest_tensor() {
    let sd = AutoencoderKlConfig {
        block_out_channels: vec![128, 256, 512, 512],
        layers_per_block: 2,
        up_block_types: vec!["UpDecoderBlock2D".into(); 4],
        ..AutoencoderKlConfig::default()
    };
    assert_eq!(sd.largest_tensor_bytes(1, 64, 64), 256 * 512 * 512 * 4);
    // At a 128-cell latent the mid block's 512-wide single-head scores (16,384²) dominate.
    assert_eq!(sd.largest_tensor_bytes(1, 128, 128), 16384 * 16384 * 4);
    assert_eq!(
        AutoencoderTinyConfig::default().largest_tensor_bytes(1, 64, 64),
        64 * 512 * 512 * 4
    );
}
