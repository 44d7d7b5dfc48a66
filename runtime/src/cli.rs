//! Flags every divergen binary takes (`divergen`, `divergen-train`): one definition, so each
//! command of each binary opens the device its flags ask for.

use crate::Result;
use clap::{Args, ValueEnum};
use divergen_kernels::device::{DeviceRequest, LimitsProfile};
use divergen_kernels::variants::KernelFamily;
use divergen_models::layers::Quantization;

/// What every command of both binaries takes: `-v` and the device flags.
#[derive(Args, Clone)]
pub struct GlobalArgs {
    /// More log output: -v shows our debug lines and dependencies' info, -vv everything.
    /// `RUST_LOG` overrides it.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(flatten)]
    pub device: DeviceArgs,
}

impl GlobalArgs {
    /// Starts the logger at the level `-v` asks for, unless `RUST_LOG` says otherwise.
    pub fn init_logging(&self) {
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(log_filter(self.verbose))).init();
    }
}

/// Mesa's device-selection layer opens a Wayland/X11 connection to rank GPUs and prints
/// "XDG_RUNTIME_DIR is invalid" on headless machines; divergen ranks adapters itself, so the layer
/// is turned off unless the user set `NODEVICE_SELECT`.
///
/// # Safety
/// It sets an environment variable: call it first in `main`, while no other thread exists.
pub unsafe fn skip_mesa_device_select() {
    if std::env::var_os("NODEVICE_SELECT").is_none() {
        // SAFETY: the caller guarantees that no other thread reads the environment.
        unsafe { std::env::set_var("NODEVICE_SELECT", "1") };
    }
}

/// Device selection; each flag falls back to its environment variable.
#[derive(Args, Clone)]
pub struct DeviceArgs {
    /// Adapter to use: its index in `divergen devices`, or part of its name.
    #[arg(long, global = true, env = "DIVERGEN_ADAPTER")]
    pub adapter: Option<String>,
    /// `auto` (default): the best GPU adapter, or the native CPU engine when the only adapters
    /// are CPU rasterizers (lavapipe) or there are none. `cpu`: the CPU engine. `vulkan`, `metal`,
    /// `dx12`: that API's best adapter, a rasterizer included. `gpu`: any API's best adapter.
    #[arg(long, global = true, env = "DIVERGEN_BACKEND")]
    pub backend: Option<String>,
    /// Threads of the native CPU engine (default: `RAYON_NUM_THREADS`, else one per core).
    #[arg(long, global = true, value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,
    /// `adapter` (all the adapter offers) or `mobile` (WebGPU's defaults, what phones guarantee).
    #[arg(long, global = true, env = "DIVERGEN_LIMITS", default_value = "adapter")]
    pub limits: String,
    /// Fail instead of running the CPU engine when no adapter exists (a rasterizer counts).
    #[arg(long, global = true, env = "DIVERGEN_REQUIRE_GPU", value_parser = clap::builder::BoolishValueParser::new(), default_value = "false")]
    pub require_gpu: bool,
    /// Kernel variants: `auto` (what suits the adapter), `cpu` (register tiles, what lavapipe
    /// rewards) or `gpu` (workgroup-memory tiles, subgroups, f16 math, packed int8 dots, each
    /// where the device offers it). `DIVERGEN_VARIANT_<KERNEL>` overrides one kernel.
    #[arg(long, global = true, env = "DIVERGEN_KERNELS", default_value = "auto")]
    pub kernels: String,
    /// Create the device with a storage-binding limit below the adapter's (bytes): to see what a
    /// device with smaller bindings would split or refuse.
    #[arg(long, global = true, env = "DIVERGEN_MAX_BINDING_BYTES")]
    pub max_binding_bytes: Option<String>,
}

impl DeviceArgs {
    pub fn request(&self) -> Result<DeviceRequest> {
        Ok(DeviceRequest {
            adapter: self.adapter.clone().filter(|s| !s.trim().is_empty()),
            backend: self.backend.clone().filter(|s| !s.trim().is_empty()),
            limits: self.limits.parse::<LimitsProfile>().map_err(|e| e.to_string())?,
            require_gpu: self.require_gpu,
            kernels: self.kernels.parse::<KernelFamily>().map_err(|e| e.to_string())?,
            max_binding_bytes: self
                .max_binding_bytes
                .as_deref()
                .filter(|s| !s.trim().is_empty())
                .map(divergen_kernels::device::parse_binding_bytes)
                .transpose()
                .map_err(|e| e.to_string())?,
            threads: self.threads.map(usize::from),
        })
    }
}

/// `--quant`: the format a command loads a model's linear-layer weights in.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum QuantArg {
    None,
    Int8,
    Int4,
}

impl From<QuantArg> for Quantization {
    fn from(q: QuantArg) -> Self {
        match q {
            QuantArg::None => Quantization::None,
            QuantArg::Int8 => Quantization::Int8,
            QuantArg::Int4 => Quantization::Int4,
        }
    }
}

/// Our crates log at info and dependencies (wgpu, cubecl's autotune, naga) only warnings, unless
/// `-v` asks for more.
fn log_filter(verbose: u8) -> String {
    let ours = [
        "divergen",
        "divergen_runtime",
        "divergen_models",
        "divergen_kernels",
        "divergen_host",
        "divergen_dataset",
        "divergen_train",
    ];
    let (own, deps) = match verbose {
        0 => ("info", "warn"),
        1 => ("debug", "info"),
        _ => ("trace", "debug"),
    };
    std::iter::once(deps.to_string())
        .chain(ours.iter().map(|c| format!("{c}={own}")))
        .collect::<Vec<_>>()
        .join(",")
}
