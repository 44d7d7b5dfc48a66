//! The embedded default's tiny SAM: trained with burn's own modules and autodiff, it must come
//! out with segment_anything's keys and layouts, so that our SAM loader reads it and computes
//! the same masks with our kernels; and a few training steps must lower the loss.

use burn::tensor::Device;
use divergen_kernels::testing::devices;
use divergen_models::sam::preprocess::prepare;
use divergen_models::sam::{Point, PointLabel, Prompt, Quantization, Sam};
use divergen_runtime::domain::DomainConfig;
use divergen_runtime::domain::render::white_render;
use divergen_train::sam::{
    PromptTarget, SamExample, SamTrainOptions, Supervise, TinySam, TinySamConfig, TrainPoint, train,
};
use divergen_train::sam_examples::sam_example;
use rand::SeedableRng;
use rand::rngs::StdRng;

/// burn's seed is global to the backend and a file's tests run on parallel threads: a test that
/// seeds holds this while it seeds and draws, so no other test's draws interleave with its own.
static SEEDED_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn config() -> TinySamConfig {
    TinySamConfig {
        img_size: 64,
        patch_size: 8,
        encoder_dim: 32,
        encoder_depth: 2,
        encoder_heads: 2,
        window_size: 4,
        global_attn_indexes: vec![1],
        // Our attention kernel takes head widths in multiples of 4: 64 / 2 / 8 heads.
        prompt_embed_dim: 64,
        mask_in_chans: 16,
        decoder_depth: 2,
        decoder_heads: 8,
        decoder_mlp_dim: 96,
        iou_head_hidden_dim: 32,
    }
}

fn rows(t: burn::tensor::Tensor<3>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

#[test]
fn the_exported_tiny_sam_loads_and_matches_the_trained_model() {
    let _seeded = SEEDED_RNG.lock().unwrap_or_else(|p| p.into_inner());
    let c = config();
    let train_device = Device::flex();
    train_device.seed(5);
    let model = TinySam::new(&c, &train_device);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sam.safetensors");
    model.save(&path).unwrap();

    // A 48×40 image, so the resize and the padding both matter.
    let (render, mask, _) = white_render(3, 48, &mut StdRng::seed_from_u64(1));
    let image = image::imageops::crop_imm(&render, 0, 0, 48, 40).to_image();
    let input = prepare(&image, c.img_size).unwrap();
    // `ResizeLongestSide.apply_coords`: each axis by its own rounded ratio.
    let (sx, sy) = (input.input_size.1 as f32 / 48.0, input.input_size.0 as f32 / 40.0);
    let corners = [(0.0, 0.0), (47.0, 0.0), (0.0, 39.0), (47.0, 39.0)];
    let bbox = [6.0, 5.0, 30.0, 33.0];
    let dummy = |points: Vec<TrainPoint>, bbox: Option<[f32; 4]>| PromptTarget {
        points,
        bbox,
        target: vec![0.0; c.low_res() * c.low_res()],
        weight: vec![1.0; c.low_res() * c.low_res()],
        supervise: Supervise::Outputs(vec![0]),
    };
    let example = SamExample {
        pixels: input.pixels.clone(),
        prompts: vec![
            dummy(
                corners
                    .iter()
                    .map(|&(x, y)| TrainPoint {
                        x: x * sx,
                        y: y * sy,
                        label: 1,
                    })
                    .collect(),
                None,
            ),
            dummy(vec![], Some([bbox[0] * sx, bbox[1] * sy, bbox[2] * sx, bbox[3] * sy])),
        ],
    };
    let (logits, iou) = model.forward(&[example], &train_device);
    let want = rows(logits);
    let want_iou = iou.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
    let cells = c.low_res() * c.low_res();
    assert!(mask.iter().any(|&m| m));

    for d in devices() {
        let sam = Sam::load(&path, Quantization::None, &d.device).unwrap();
        assert_eq!(sam.config.prompt_embed_dim, 64);
        assert_eq!(sam.config.decoder.mlp_dim, 96);
        let embedding = sam.embed_image(&image).unwrap();
        let corner_prompt = Prompt {
            points: corners
                .iter()
                .map(|&(x, y)| Point {
                    x,
                    y,
                    label: PointLabel::Foreground,
                })
                .collect(),
            ..Default::default()
        };
        let box_prompt = Prompt {
            bbox: Some(bbox),
            ..Default::default()
        };
        for (p, prompt) in [corner_prompt, box_prompt].iter().enumerate() {
            let (multi, multi_iou) = sam.decode(&embedding, prompt, true).unwrap();
            let (single, single_iou) = sam.decode(&embedding, prompt, false).unwrap();
            let got: Vec<&Vec<f32>> = std::iter::once(&single[0]).chain(multi.iter()).collect();
            let got_iou: Vec<f32> = std::iter::once(single_iou[0]).chain(multi_iou).collect();
            for (m, g) in got.iter().enumerate() {
                let w = &want[(p * 4 + m) * cells..(p * 4 + m + 1) * cells];
                let err = w.iter().zip(g.iter()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                let scale = w.iter().map(|v| v.abs()).fold(0f32, f32::max);
                assert!(
                    err < 1e-4 * scale.max(1.0),
                    "{}: prompt {p} mask {m}: max abs error {err} (scale {scale})",
                    d.label
                );
                let e = (want_iou[p * 4 + m] - got_iou[m]).abs();
                assert!(e < 1e-4, "{}: prompt {p} IoU {m}: {e}", d.label);
            }
        }
    }
}

#[test]
fn a_few_steps_on_domain_examples_lower_the_loss() {
    let _seeded = SEEDED_RNG.lock().unwrap_or_else(|p| p.into_inner());
    let c = config();
    let domain = DomainConfig::default();
    let device = Device::flex().autodiff();
    device.seed(2);
    let model = TinySam::new(&c, &device);
    // The same 4 images each step: the loss must fall as the model fits them.
    let options = SamTrainOptions {
        steps: 40,
        batch: 4,
        learning_rate: 1e-2,
    };
    let (_, log) = train(
        model,
        &options,
        &device,
        |_, i| sam_example(&c, &domain, 9, i as u64),
        |_, _, _| {},
    );
    let first = log.loss_by_tenth[0];
    let last = *log.loss_by_tenth.last().unwrap();
    assert!(last < 0.9 * first, "loss {first} → {last}: {:?}", log.loss_by_tenth);
}
