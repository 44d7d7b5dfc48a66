//! The embedded default's tiny CLIP: trained with burn's own modules and autodiff, it must come
//! out in the `CLIPModel` layout our inference loader reads, computing the same embeddings with
//! our kernels; and a few training steps must lower the contrastive loss.

use burn::tensor::{Device, Tensor, TensorData};
use divergen_kernels::testing::devices;
use divergen_models::clip::tokenizer::ClipTokenizer;
use divergen_models::clip::{Clip, Quantization, unit_rows};
use divergen_runtime::domain::render::{caption, white_render};
use divergen_train::clip::{Pair, TinyClip, TinyClipConfig, TrainOptions, save_hf, tokenize, train};
use rand::SeedableRng;
use rand::rngs::StdRng;

/// burn's seed is global to the backend and a file's tests run on parallel threads: a test that
/// seeds holds this while it seeds and draws, so no other test's draws interleave with its own.
static SEEDED_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn config(tokenizer: &ClipTokenizer) -> TinyClipConfig {
    TinyClipConfig {
        vocab_size: tokenizer.vocab_size(),
        eos_token_id: tokenizer.end_id(),
        text_hidden: 32,
        text_layers: 2,
        text_heads: 4,
        image_size: 32,
        patch_size: 8,
        vision_hidden: 32,
        vision_layers: 2,
        vision_heads: 2,
        mlp_ratio: 4,
        projection_dim: 16,
    }
}

fn pairs(n: usize, side: u32) -> Vec<Pair> {
    let mut rng = StdRng::seed_from_u64(4);
    (0..n)
        .map(|i| {
            let (img, _, a) = white_render(i % 6, side, &mut rng);
            Pair {
                pixels: divergen_models::clip::preprocess::pixel_values_sized(&img, side),
                captions: vec![caption(&a, side as f64, i)],
            }
        })
        .collect()
}

#[test]
fn the_exported_tiny_clip_loads_and_matches_the_trained_model() {
    let _seeded = SEEDED_RNG.lock().unwrap_or_else(|p| p.into_inner());
    let tokenizer = ClipTokenizer::for_words("a photo of large small red star disc".split(' ')).unwrap();
    assert!(tokenizer.vocab_size() < 600, "{}", tokenizer.vocab_size());
    let c = config(&tokenizer);
    let train_device = Device::flex();
    train_device.seed(3);
    let model = TinyClip::new(&c, &train_device);
    let dir = tempfile::tempdir().unwrap();
    save_hf(&model, &c, &tokenizer, dir.path()).unwrap();

    let data = pairs(4, 32);
    let texts: Vec<String> = data.iter().map(|p| p.captions[0].clone()).collect();
    let pixels: Vec<f32> = data.iter().flat_map(|p| p.pixels.iter().copied()).collect();
    let batch = |d: &Device| Tensor::<4>::from_data(TensorData::new(pixels.clone(), [4, 3, 32, 32]), d);
    let (ids, eos) = tokenize(&tokenizer, &texts);
    let want_images = unit_rows(model.encode_image(batch(&train_device))).unwrap();
    let want_texts = unit_rows(model.encode_text(&ids, &eos, &train_device)).unwrap();

    for d in devices() {
        let clip = Clip::load(dir.path(), Quantization::None, &d.device).unwrap();
        let loaded = ClipTokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(loaded.encode(&texts[0]), tokenizer.encode(&texts[0]));
        let got_images = unit_rows(clip.vision.forward(batch(&d.device)).unwrap()).unwrap();
        let got_texts = unit_rows(clip.text.forward(&ids).unwrap()).unwrap();
        for (want, got) in [(&want_images, &got_images), (&want_texts, &got_texts)] {
            for (w, g) in want.iter().zip(got.iter()) {
                let err = w.iter().zip(g).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(err < 1e-4, "{}: max abs error {err}", d.label);
            }
        }
    }
}

#[test]
fn training_lowers_the_contrastive_loss() {
    let _seeded = SEEDED_RNG.lock().unwrap_or_else(|p| p.into_inner());
    let data = pairs(48, 32);
    let words: Vec<String> = data
        .iter()
        .flat_map(|p| p.captions[0].split([' ', ',']).map(String::from).collect::<Vec<_>>())
        .collect();
    let tokenizer = ClipTokenizer::for_words(words.iter().map(String::as_str)).unwrap();
    let c = config(&tokenizer);
    let device = Device::flex().autodiff();
    device.seed(1);
    let model = TinyClip::new(&c, &device);
    let options = TrainOptions {
        steps: 60,
        batch: 16,
        learning_rate: 2e-3,
        seed: 1,
    };
    let mut next = 0;
    let draw = |_, _| {
        next += 1;
        let p = &data[next % data.len()];
        Pair {
            pixels: p.pixels.clone(),
            captions: p.captions.clone(),
        }
    };
    let (_, log) = train(model, &tokenizer, 32, &options, &device, draw, |_, _| {});
    let (first, last) = (log.loss_by_tenth[0], *log.loss_by_tenth.last().unwrap());
    assert!(last < 0.8 * first, "loss {first:.3} → {last:.3}");
}
