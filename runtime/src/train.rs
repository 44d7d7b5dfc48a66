//! `divergen train …` and `divergen eval …`: the embedded default's tiny models, trained on the
//! procedural domain (`divergen domain`) with burn's autodiff on the CPU, and measured.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use clap::{Args, Subcommand};
use divergen_kernels::device::{DeviceRequest, open};
use divergen_models::clip_preprocess::pixel_values_sized;
use divergen_models::clip_tokenizer::ClipTokenizer;
use divergen_models::train::clip::{Pair, TinyClip, TinyClipConfig, TrainOptions, save_hf, train};
use divergen_runtime::eval;

#[derive(Subcommand)]
pub enum TrainCommand {
    /// A tiny CLIP (ViT image tower + text transformer), contrastive on the renders' captions.
    Clip(TrainClipArgs),
}

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

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Zero-shot accuracy of a CLIP folder on the domain's held-out renders.
    Clip(EvalClipArgs),
}

#[derive(Args, Debug)]
pub struct EvalClipArgs {
    #[arg(long, default_value = "divergen-domain")]
    pub domain: PathBuf,
    #[arg(long, default_value = "tiny-clip")]
    pub clip: PathBuf,
    #[arg(long)]
    pub json: bool,
}

/// The words a domain's captions and prompts use: the tokenizer gets one token for each.
fn domain_words(domain: &Path) -> Result<Vec<String>, String> {
    let mut words: Vec<String> = Vec::new();
    let mut add = |text: &str| {
        for w in text
            .split(|c: char| !c.is_ascii_alphanumeric())
            .filter(|w| !w.is_empty())
        {
            let w = w.to_lowercase();
            if !words.contains(&w) {
                words.push(w);
            }
        }
    };
    for split in ["train", "val"] {
        for r in eval::read_renders(domain, split)? {
            add(&r.caption);
        }
    }
    for c in eval::read_categories(domain)? {
        add(&c.name);
        add(&c.def);
    }
    add("a photo of a single in a white background");
    Ok(words)
}

/// The full caption and shorter ones that keep only some attributes. With full captions alone,
/// colour, texture and size already tell a batch's pairs apart and the shape goes unlearnt
/// (measured: 27 % zero-shot); captions that keep the name and drop attributes make the shape
/// the thing to match.
fn caption_variants(r: &eval::Render, name: &str) -> Vec<String> {
    let name = name.replace('_', " ");
    let suffix = ", in a white background";
    let texture = if r.texture == "plain" {
        String::new()
    } else {
        format!("{} ", r.texture)
    };
    vec![
        r.caption.clone(),
        format!("A photo of a {name}{suffix}"),
        format!("A photo of a {} {name}{suffix}", r.colour),
        format!("A photo of a {texture}{name}{suffix}"),
        format!("An image of a {name}{suffix}"),
    ]
}

pub fn run_train(command: &TrainCommand) -> Result<(), String> {
    match command {
        TrainCommand::Clip(args) => train_clip(args),
    }
}

fn train_clip(args: &TrainClipArgs) -> Result<(), String> {
    let words = domain_words(&args.domain)?;
    let tokenizer = ClipTokenizer::for_words(words.iter().map(String::as_str)).map_err(|e| e.to_string())?;
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
    let renders = eval::read_renders(&args.domain, "train")?;
    let names: std::collections::HashMap<u32, String> = eval::read_categories(&args.domain)?
        .into_iter()
        .map(|c| (c.id, c.name))
        .collect();
    let dir = args.domain.join("renders/train");
    let mut pairs = Vec::with_capacity(renders.len());
    for r in &renders {
        let path = dir.join(&r.file);
        let img = image::open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .into_rgb8();
        pairs.push(Pair {
            pixels: pixel_values_sized(&img, config.image_size as u32),
            captions: caption_variants(r, names.get(&r.category_id).ok_or("render of an unknown category")?),
        });
    }
    log::info!(
        "tiny CLIP: {} pairs, vocabulary {} tokens, {} steps of {}",
        pairs.len(),
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
        &pairs,
        config.image_size,
        &options,
        &device,
        |step, loss| {
            bar.set_position(step as u64 + 1);
            bar.set_message(format!("loss {loss:.3}"));
            if step % 100 == 0 {
                log::info!("step {step}: loss {loss:.4}");
            }
        },
    );
    bar.finish_and_clear();
    save_hf(&model, &config, &tokenizer, &args.out).map_err(|e| e.to_string())?;
    let record = serde_json::json!({"config": config, "options": options, "log": log});
    std::fs::write(
        args.out.join("training.json"),
        serde_json::to_vec_pretty(&record).map_err(|e| e.to_string())?,
    )
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

pub fn run_eval(request: &DeviceRequest, command: &EvalCommand) -> Result<(), String> {
    match command {
        EvalCommand::Clip(args) => {
            let device = open(request).map_err(|e| e.to_string())?;
            let report = eval::clip_zero_shot(&args.clip, &args.domain, &device.device)?;
            if args.json {
                println!("{}", serde_json::to_string(&report).map_err(|e| e.to_string())?);
            } else {
                println!(
                    "zero-shot accuracy {:.1} % on {} held-out renders ({} categories)",
                    100.0 * report.accuracy,
                    report.images,
                    report.per_category.len()
                );
                for c in &report.per_category {
                    println!("  {:<16} {:>5.1} %", c.name, 100.0 * c.accuracy);
                }
            }
            Ok(())
        }
    }
}
