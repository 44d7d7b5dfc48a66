//! `divergen-train clip`: a tiny CLIP, contrastive on fresh renders and their caption variants.

use std::path::PathBuf;

use burn::tensor::Device;
use clap::Args;
use divergen_models::clip::preprocess::pixel_values_sized;
use divergen_models::clip::tokenizer::ClipTokenizer;
use divergen_runtime::Result;
use divergen_runtime::domain::shapes::SHAPES;
use divergen_runtime::pipeline::mix_seed;
use divergen_train::clip::{Pair, TinyClip, TinyClipConfig, TrainOptions, save_hf, train};
use divergen_train::corpus::{caption_variants, domain_words, fresh_render};
use divergen_train::eval;
use rand::SeedableRng;
use rand::rngs::StdRng;

#[derive(Args, Debug)]
pub struct TrainClipArgs {
    /// A folder written by `divergen domain`.
    #[arg(long, default_value = "divergen-domain")]
    pub domain: PathBuf,
    /// Output: a Hugging Face CLIPModel folder.
    #[arg(long, default_value = "tiny-clip")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1500)]
    pub steps: usize,
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn train_clip(args: &TrainClipArgs) -> Result<()> {
    let words = domain_words(&args.domain)?;
    let tokenizer = ClipTokenizer::for_words(words.iter().map(String::as_str))?;
    let config = TinyClipConfig {
        vocab_size: tokenizer.vocab_size(),
        eos_token_id: tokenizer.end_id(),
        text_hidden: 64,
        text_layers: 2,
        text_heads: 4,
        image_size: 64,
        patch_size: 8,
        vision_hidden: 64,
        vision_layers: 3,
        vision_heads: 4,
        mlp_ratio: 4,
        projection_dim: 64,
    };
    let names: Vec<String> = eval::read_categories(&args.domain)?
        .into_iter()
        .map(|c| c.name)
        .collect();
    if names.len() != SHAPES.len() {
        return Err(format!(
            "{}: {} categories, the procedural domain has {}",
            args.domain.display(),
            names.len(),
            SHAPES.len()
        )
        .into());
    }
    // Fresh renders every step, from a seed stream disjoint from the domain's held-out split.
    let side = config.image_size as u32;
    let draw = |step: usize, item: usize| {
        let mut rng = StdRng::seed_from_u64(mix_seed(args.seed ^ 0x7472_6169_6e00, step as u64, item as u64));
        let (k, img, record) = fresh_render(&mut rng, side);
        Pair {
            pixels: pixel_values_sized(&img, side),
            captions: caption_variants(&record, &names[k]),
        }
    };
    log::info!(
        "tiny CLIP: vocabulary {} tokens, {} steps of {} fresh renders",
        config.vocab_size,
        args.steps,
        args.batch
    );
    let device = Device::flex().autodiff();
    device.seed(args.seed);
    let model = TinyClip::new(&config, &device);
    let options = TrainOptions {
        steps: args.steps,
        batch: args.batch,
        learning_rate: args.lr,
        seed: args.seed,
    };
    let bar = indicatif::ProgressBar::new(args.steps as u64);
    let (model, log) = train(
        model,
        &tokenizer,
        config.image_size,
        &options,
        &device,
        draw,
        |step, loss| {
            bar.set_position(step as u64 + 1);
            bar.set_message(format!("loss {loss:.3}"));
            if step % 100 == 0 {
                log::info!("step {step}: loss {loss:.4}");
            }
        },
    );
    bar.finish_and_clear();
    save_hf(&model, &config, &tokenizer, &args.out)?;
    let record = serde_json::json!({"config": config, "options": options, "log": log});
    std::fs::write(args.out.join("training.json"), serde_json::to_vec_pretty(&record)?)
        .map_err(|e| format!("{}: {e}", args.out.display()))?;
    println!(
        "tiny CLIP → {} in {:.0} s; loss by tenth {:?}",
        args.out.display(),
        log.seconds,
        log.loss_by_tenth
            .iter()
            .map(|l| (l * 1000.0).round() / 1000.0)
            .collect::<Vec<_>>()
    );
    Ok(())
}
