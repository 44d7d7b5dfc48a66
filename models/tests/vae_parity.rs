//! The VAE decoders against diffusers on the same weights: `AutoencoderKL.decode` with SD 1.5's
//! config at full channel width, and `AutoencoderTiny` (TAESD), on an 8×8 latent (fixtures:
//! `models/fixtures/diffusion/{vae-sd15,taesd}`, made by `models/fixtures/make_vae_fixture.py`).

use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData};
use divergen_kernels::testing::{for_each_device, relative_error, to_vec};
use divergen_models::diffusion::taesd::TinyDecoder;
use divergen_models::diffusion::vae::VaeDecoder;
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
