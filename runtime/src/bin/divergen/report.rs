//! `divergen report`: PNGs of a finished run.

use std::path::PathBuf;

use clap::Args;
use divergen_runtime::Result;
use divergen_runtime::pipeline;

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// A finished run folder.
    pub dir: PathBuf,
    /// Pasted samples to draw.
    #[arg(long, default_value_t = 4)]
    pub samples: usize,
    /// Print the written files as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &ReportArgs) -> Result<()> {
    let files = pipeline::report::render(&args.dir, args.samples)?;
    if args.json {
        println!("{}", serde_json::to_string(&files)?);
    } else {
        for f in &files.files {
            println!("{}", f.display());
        }
    }
    Ok(())
}
