//! `divergen embed`: L2-normalised CLIP embeddings of images and texts.

use std::path::PathBuf;

use clap::Args;
use divergen_kernels::device::{DeviceRequest, open};
use divergen_models::clip::tokenizer::ClipTokenizer;
use divergen_models::clip::{Clip, Quantization};
use divergen_runtime::Result;
use divergen_runtime::cli::QuantArg;
use divergen_runtime::pipeline::filtering::{dot, embed_images, embed_texts};

/// "12.3 MiB → 3.4 MiB (int8)": the linear layers' size before and after quantization.
pub fn size_line((now, f32): (usize, usize), quant: Quantization) -> String {
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    format!(
        "linear layers {:.1} MiB in f32 → {:.1} MiB ({quant:?})",
        mib(f32),
        mib(now)
    )
}

#[derive(Args, Debug)]
pub struct EmbedArgs {
    /// A Hugging Face CLIPModel folder: config.json, model.safetensors, vocab.json + merges.txt
    /// (there or in tokenizer/).
    #[arg(long)]
    pub clip: PathBuf,
    /// Images to embed.
    #[arg(long, num_args = 1..)]
    pub image: Vec<PathBuf>,
    /// Texts to embed.
    #[arg(long, num_args = 1..)]
    pub text: Vec<String>,
    /// Weight-only quantization of the linear layers, applied at load.
    #[arg(long, value_enum, default_value = "none")]
    pub quant: QuantArg,
    /// Print `{"images": [[..]], "texts": [[..]]}`.
    #[arg(long)]
    pub json: bool,
}

pub fn run(request: &DeviceRequest, args: &EmbedArgs) -> Result<()> {
    if args.image.is_empty() && args.text.is_empty() {
        return Err("nothing to embed: give --image and/or --text".into());
    }
    let quant = Quantization::from(args.quant);
    // Decode every input before the (slow) model load, so a bad file fails fast.
    let images = args
        .image
        .iter()
        .map(|path| divergen_runtime::images::open(path).map(|i| i.into_rgb8()))
        .collect::<Result<Vec<_>, _>>()?;
    let tokenizer = ClipTokenizer::from_dir(&args.clip)?;
    let device = open(request)?;
    let clip = Clip::load(&args.clip, quant, &device.device)?;
    log::info!(
        "CLIP from {} on {}: {}",
        args.clip.display(),
        device.describe(),
        size_line(clip.linear_bytes(), quant)
    );
    // The pipeline's own calls, so these are the numbers its filter compares.
    let images = embed_images(&clip, &images, &device.device)?;
    let texts = if args.text.is_empty() {
        Vec::new()
    } else {
        embed_texts(&clip, &tokenizer, &args.text)?
    };
    if args.json {
        let out = serde_json::json!({ "images": images, "texts": texts });
        println!("{}", serde_json::to_string(&out)?);
    } else {
        for (path, e) in args.image.iter().zip(&images) {
            println!("image {}: {} dims", path.display(), e.len());
        }
        for (text, e) in args.text.iter().zip(&texts) {
            println!("text {text:?}: {} dims", e.len());
        }
        if !images.is_empty() && !texts.is_empty() {
            println!("cosine similarity (rows: images, columns: texts):");
            for (path, i) in args.image.iter().zip(&images) {
                let sims: Vec<String> = texts.iter().map(|t| format!("{:.4}", dot(i, t))).collect();
                println!("  {}: {}", path.display(), sims.join("  "));
            }
        }
    }
    Ok(())
}
