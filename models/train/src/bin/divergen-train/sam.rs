//! `divergen-train sam`: a tiny SAM on point, box and 4-corner background prompts over fresh
//! renders and scenes.

use std::path::PathBuf;

use burn::tensor::Device;
use clap::Args;
use divergen_runtime::Result;
use divergen_runtime::domain::DomainConfig;
use divergen_train::sam::{SamTrainOptions, TinySam, TinySamConfig};
use divergen_train::sam_examples::sam_example;

#[derive(Args, Debug)]
pub struct TrainSamArgs {
    /// Output: a SAM checkpoint (safetensors with segment_anything's keys).
    #[arg(long, default_value = "tiny-sam/model.safetensors")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 2000)]
    pub steps: usize,
    /// Images per step (each with up to three prompts).
    #[arg(long, default_value_t = 12)]
    pub batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// The embedded default's SAM: 128² input, 8-px patches, a 4-block ViT (two windowed, two
/// global), a 64-wide decoder.
pub fn tiny_sam_config() -> TinySamConfig {
    TinySamConfig {
        img_size: 128,
        patch_size: 8,
        encoder_dim: 64,
        encoder_depth: 4,
        encoder_heads: 4,
        window_size: 8,
        global_attn_indexes: vec![1, 3],
        prompt_embed_dim: 64,
        mask_in_chans: 16,
        decoder_depth: 2,
        decoder_heads: 8,
        decoder_mlp_dim: 256,
        iou_head_hidden_dim: 64,
    }
}

pub fn train_sam(args: &TrainSamArgs) -> Result<()> {
    let config = tiny_sam_config();
    let domain = DomainConfig::default();
    let device = Device::flex().autodiff();
    device.seed(args.seed);
    let model = TinySam::new(&config, &device);
    let options = SamTrainOptions {
        steps: args.steps,
        batch: args.batch,
        learning_rate: args.lr,
    };
    log::info!("tiny SAM: {} steps of {} fresh images", args.steps, args.batch);
    let bar = indicatif::ProgressBar::new(args.steps as u64);
    let draw = |step: usize, item: usize| sam_example(&config, &domain, args.seed, (step * args.batch + item) as u64);
    let (model, log) = divergen_train::sam::train(model, &options, &device, draw, |step, loss, iou| {
        bar.set_position(step as u64 + 1);
        bar.set_message(format!("loss {loss:.3} IoU {iou:.3}"));
        if step % 50 == 0 {
            log::info!("step {step}: loss {loss:.4}, IoU {iou:.3}");
        }
    });
    bar.finish_and_clear();
    model.save(&args.out)?;
    let record = serde_json::json!({"config": config, "options": options, "seed": args.seed, "log": log});
    let json = args.out.with_file_name("training.json");
    std::fs::write(&json, serde_json::to_vec_pretty(&record)?).map_err(|e| format!("{}: {e}", json.display()))?;
    println!(
        "tiny SAM → {} in {:.0} s; loss by tenth {:?}; IoU by tenth {:?}",
        args.out.display(),
        log.seconds,
        log.loss_by_tenth
            .iter()
            .map(|l| (l * 1000.0).round() / 1000.0)
            .collect::<Vec<_>>(),
        log.iou_by_tenth
            .iter()
            .map(|l| (l * 1000.0).round() / 1000.0)
            .collect::<Vec<_>>()
    );
    Ok(())
}
