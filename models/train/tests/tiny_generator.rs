//! The embedded default's tiny generator: an `AutoencoderKL` and a `UNet2DConditionModel`
//! trained with burn's own modules must come out with diffusers' keys and configs, so our
//! loaders read them and compute the same outputs with our kernels.

use burn::tensor::{Device, Distribution, Tensor, TensorData};
use divergen_kernels::testing::devices;
use divergen_models::diffusion::unet::UNet;
use divergen_models::diffusion::vae::VaeDecoder;
use divergen_models::layers::Quantization;
use divergen_train::diffusion::{TinyUnet, TinyUnetConfig, TinyVae, TinyVaeConfig};

/// burn's seed is global to the backend and a file's tests run on parallel threads: a test that
/// seeds holds this while it seeds and draws, so no other test's draws interleave with its own.
static SEEDED_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

fn max_rel_err(want: &[f32], got: &[f32]) -> f32 {
    assert_eq!(want.len(), got.len());
    let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max).max(1e-3);
    want.iter().zip(got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale
}

/// The small VAE and UNet shapes these tests train, export and reload.
fn small_vae() -> TinyVaeConfig {
    TinyVaeConfig {
        block_out_channels: vec![16, 32],
        layers_per_block: 1,
        latent_channels: 4,
        norm_num_groups: 8,
        sample_size: 16,
    }
}

fn small_unet() -> TinyUnetConfig {
    TinyUnetConfig {
        block_out_channels: vec![16, 32],
        layers_per_block: 1,
        norm_num_groups: 8,
        heads: 4,
        cross_attention_dim: 24,
        in_channels: 4,
        sample_size: 8,
    }
}

#[test]
fn the_exported_tiny_vae_decoder_matches_the_trained_model() {
    let _seeded = SEEDED_RNG.lock().unwrap_or_else(|p| p.into_inner());
    let c = small_vae();
    let train = Device::flex();
    train.seed(7);
    let vae = TinyVae::new(&c, &train);
    let dir = tempfile::tempdir().unwrap();
    vae.save(dir.path(), 0.5).unwrap();
    let image = Tensor::<4>::random([2, 3, 16, 16], Distribution::Uniform(-1.0, 1.0), &train);
    let (mean, logvar) = vae.encode(image);
    assert_eq!(mean.dims(), [2, 4, 8, 8]);
    assert_eq!(logvar.dims(), [2, 4, 8, 8]);
    let z = values(mean.clone());
    let want = values(vae.decode(mean));
    for d in devices() {
        let decoder = VaeDecoder::load(dir.path(), &d.device).unwrap();
        // The pipeline hands the decoder scaled latents.
        let latents = Tensor::<4>::from_data(TensorData::new(z.clone(), [2, 4, 8, 8]), &d.device) * 0.5;
        let got = values(decoder.decode(latents));
        let err = max_rel_err(&want, &got);
        assert!(err < 1e-4, "{}: relative error {err}", d.label);
    }
}

#[test]
fn the_exported_tiny_unet_matches_the_trained_model() {
    let _seeded = SEEDED_RNG.lock().unwrap_or_else(|p| p.into_inner());
    let c = small_unet();
    let train = Device::flex();
    train.seed(8);
    let unet = TinyUnet::new(&c, &train);
    let dir = tempfile::tempdir().unwrap();
    unet.save(dir.path()).unwrap();
    let sample = values(Tensor::<4>::random(
        [2, 4, 8, 8],
        Distribution::Normal(0.0, 1.0),
        &train,
    ));
    let context = values(Tensor::<3>::random([2, 5, 24], Distribution::Normal(0.0, 1.0), &train));
    let steps = [981.0f32, 21.0];
    let want = values(unet.forward(
        Tensor::from_data(TensorData::new(sample.clone(), [2, 4, 8, 8]), &train),
        &steps,
        Tensor::from_data(TensorData::new(context.clone(), [2, 5, 24]), &train),
    ));
    for d in devices() {
        let loaded = UNet::load(dir.path(), Quantization::None, &d.device).unwrap();
        let got = values(
            loaded
                .forward(
                    Tensor::from_data(TensorData::new(sample.clone(), [2, 4, 8, 8]), &d.device),
                    &steps,
                    Tensor::from_data(TensorData::new(context.clone(), [2, 5, 24]), &d.device),
                )
                .unwrap(),
        );
        let err = max_rel_err(&want, &got);
        assert!(err < 1e-4, "{}: relative error {err}", d.label);
    }
}

/// `train generator --resume` reads a saved folder back into burn's modules: the reloaded
/// models must compute what the saved ones did, and still train.
#[test]
fn saved_tiny_generator_weights_load_back_for_training() {
    let _seeded = SEEDED_RNG.lock().unwrap_or_else(|p| p.into_inner());
    use burn::optim::GradientsParams;
    let vc = small_vae();
    let uc = small_unet();
    let train = Device::flex().autodiff();
    train.seed(11);
    let dir = tempfile::tempdir().unwrap();
    let vae = TinyVae::new(&vc, &train);
    let unet = TinyUnet::new(&uc, &train);
    vae.save(&dir.path().join("vae"), 0.5).unwrap();
    unet.save(&dir.path().join("unet")).unwrap();

    // Fresh models draw other weights; loading must replace every one of them.
    let vae_back = TinyVae::new(&vc, &train).load(&dir.path().join("vae")).unwrap();
    let unet_back = TinyUnet::new(&uc, &train).load(&dir.path().join("unet")).unwrap();
    let image = Tensor::<4>::random([2, 3, 16, 16], Distribution::Uniform(-1.0, 1.0), &train);
    assert_eq!(values(vae.encode(image.clone()).0), values(vae_back.encode(image).0));
    let sample = Tensor::<4>::random([2, 4, 8, 8], Distribution::Normal(0.0, 1.0), &train);
    let context = Tensor::<3>::random([2, 5, 24], Distribution::Normal(0.0, 1.0), &train);
    let steps = [500.0f32, 3.0];
    let want = values(unet.forward(sample.clone(), &steps, context.clone()));
    let out = unet_back.forward(sample, &steps, context);
    assert_eq!(want, values(out.clone()));

    let grads = GradientsParams::from_grads(out.powf_scalar(2.0).mean().backward(), &unet_back);
    let exported = unet_back.state_dict().unwrap().0.len();
    assert_eq!(grads.len(), exported, "every loaded parameter trains");
}

#[test]
fn a_tiny_unet_checkpoint_of_another_shape_is_refused_by_key() {
    let wide = TinyUnetConfig {
        cross_attention_dim: 32,
        ..small_unet()
    };
    let device = Device::flex();
    let dir = tempfile::tempdir().unwrap();
    TinyUnet::new(&small_unet(), &device).save(dir.path()).unwrap();
    let err = TinyUnet::new(&wide, &device).load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
    assert!(err.contains("attn2.to_k.weight"), "{err}");
}

/// `--ema-decay`: the shipped UNet may be a moving average of exports. The average must be
/// exact per element, save in the UNet's own layout and refuse another model's export.
#[test]
fn an_averaged_tiny_unet_saves_and_loads_like_a_trained_one() {
    let _seeded = SEEDED_RNG.lock().unwrap_or_else(|p| p.into_inner());
    let device = Device::flex();
    device.seed(3);
    let first = TinyUnet::new(&small_unet(), &device);
    let second = TinyUnet::new(&small_unet(), &device);
    let (a, b) = (first.state_dict().unwrap(), second.state_dict().unwrap());
    let mut average = first.state_dict().unwrap();
    average.blend_toward(&b, 0.75).unwrap();
    for ((key, _, avg), ((_, _, x), (_, _, y))) in average.0.iter().zip(a.0.iter().zip(&b.0)) {
        for ((m, x), y) in avg.iter().zip(x).zip(y) {
            assert!((m - (0.75 * x + 0.25 * y)).abs() < 1e-6, "{key}");
        }
    }

    let dir = tempfile::tempdir().unwrap();
    first.save_weights(dir.path(), &average).unwrap();
    let back = TinyUnet::new(&small_unet(), &device).load(dir.path()).unwrap();
    let reloaded = back.state_dict().unwrap();
    assert_eq!(reloaded.0.len(), average.0.len());
    for ((key, _, want), (_, _, got)) in average.0.iter().zip(&reloaded.0) {
        assert_eq!(want, got, "{key}");
    }

    let wide = TinyUnetConfig {
        cross_attention_dim: 32,
        ..small_unet()
    };
    let other = TinyUnet::new(&wide, &device).state_dict().unwrap();
    let err = average.blend_toward(&other, 0.5).unwrap_err().to_string();
    assert!(err.contains("attn2.to_k.weight"), "{err}");
}
