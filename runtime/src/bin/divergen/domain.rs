//! `divergen domain`: writes the procedural domain the embedded default was trained on.

use std::path::PathBuf;

use clap::Args;

use divergen_runtime::Result;

#[derive(Args, Debug)]
pub struct DomainArgs {
    /// Output folder.
    #[arg(long, default_value = "divergen-domain")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Training scenes (the LVIS-style "real" dataset).
    #[arg(long, default_value_t = 400)]
    pub train_scenes: usize,
    /// Held-out scenes.
    #[arg(long, default_value_t = 80)]
    pub val_scenes: usize,
    /// White-background renders per category for training.
    #[arg(long, default_value_t = 64)]
    pub train_renders: usize,
    /// Held-out white-background renders per category.
    #[arg(long, default_value_t = 16)]
    pub val_renders: usize,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &DomainArgs) -> Result<()> {
    use divergen_runtime::domain::{DomainConfig, write};
    let config = DomainConfig {
        seed: args.seed,
        train_scenes: args.train_scenes,
        val_scenes: args.val_scenes,
        train_renders_per_category: args.train_renders,
        val_renders_per_category: args.val_renders,
        ..Default::default()
    };
    let summary = write(&args.out, &config)?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "{}: {} categories; scenes {} train / {} val ({} / {} instances); {} white-background renders",
            args.out.display(),
            summary.categories,
            summary.train_images,
            summary.val_images,
            summary.train_instances,
            summary.val_instances,
            summary.renders
        );
        for (f, lo, hi) in &summary.image_counts {
            println!("  frequency {f}: {lo}–{hi} training images per category");
        }
    }
    Ok(())
}
