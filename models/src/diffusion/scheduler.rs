//! Diffusion schedulers, step for step the same as diffusers': DDIM, Euler, Euler ancestral,
//! DPM-Solver++ 2M and LCM, configured by a diffusers `scheduler_config.json` (SD-Turbo's single
//! step is Euler with `trailing` spacing and one step).
//!
//! The per-step scalars are computed on the CPU the way diffusers computes them (f32 tables,
//! numpy's interpolation in f64); the latent updates are elementwise tensor ops on the device.

use std::path::Path;

use burn::tensor::Tensor;
use serde::Deserialize;

use crate::error::ModelError;

/// The fields of a diffusers `scheduler_config.json` these schedulers read, with diffusers'
/// defaults. Keys a scheduler does not use are ignored, as diffusers' `from_config` does.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: String,
    pub prediction_type: String,
    pub timestep_spacing: String,
    pub steps_offset: usize,
    pub set_alpha_to_one: bool,
    pub clip_sample: bool,
    pub final_sigmas_type: String,
    pub interpolation_type: String,
    pub use_karras_sigmas: bool,
    pub solver_order: usize,
    pub algorithm_type: String,
    pub solver_type: String,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    pub original_inference_steps: usize,
    pub timestep_scaling: f64,
    pub rescale_betas_zero_snr: bool,
    pub thresholding: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            class_name: String::new(),
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            prediction_type: "epsilon".into(),
            timestep_spacing: "leading".into(),
            steps_offset: 0,
            set_alpha_to_one: true,
            clip_sample: true,
            final_sigmas_type: "zero".into(),
            interpolation_type: "linear".into(),
            use_karras_sigmas: false,
            solver_order: 2,
            algorithm_type: "dpmsolver++".into(),
            solver_type: "midpoint".into(),
            lower_order_final: true,
            euler_at_final: false,
            original_inference_steps: 50,
            timestep_scaling: 10.0,
            rescale_betas_zero_snr: false,
            thresholding: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedulerKind {
    Ddim,
    Euler,
    EulerAncestral,
    DpmSolverMultistep,
    Lcm,
}

impl SchedulerKind {
    /// By diffusers class name (`_class_name`) or a short name (`ddim`, `euler`, `euler-a`,
    /// `dpm++2m`, `lcm`).
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "DDIMScheduler" | "ddim" => SchedulerKind::Ddim,
            "EulerDiscreteScheduler" | "euler" => SchedulerKind::Euler,
            "EulerAncestralDiscreteScheduler" | "euler-a" | "euler_ancestral" => SchedulerKind::EulerAncestral,
            "DPMSolverMultistepScheduler" | "dpm++2m" | "dpmpp_2m" => SchedulerKind::DpmSolverMultistep,
            "LCMScheduler" | "lcm" => SchedulerKind::Lcm,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Prediction {
    Epsilon,
    V,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Spacing {
    Linspace,
    Leading,
    Trailing,
}

pub struct Scheduler {
    pub kind: SchedulerKind,
    pub config: SchedulerConfig,
    prediction: Prediction,
    spacing: Spacing,
    alphas_cumprod: Vec<f32>,
    timesteps: Vec<f32>,
    /// Euler and DPM-Solver: one per timestep plus the final sigma.
    sigmas: Vec<f32>,
    step_index: usize,
    /// DPM-Solver++: the last data predictions, newest last.
    x0_history: Vec<Tensor<4>>,
    lower_order_nums: usize,
}

/// `torch.linspace(start, end, n)` in f32 (computed in f64 and rounded).
fn linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start as f32];
    }
    let step = (end - start) / (n - 1) as f64;
    (0..n).map(|i| (start + step * i as f64) as f32).collect()
}

/// `np.interp(x, arange(len(table)), table)`.
fn interp(x: f64, table: &[f32]) -> f64 {
    let last = table.len() - 1;
    if x <= 0.0 {
        return table[0] as f64;
    }
    if x >= last as f64 {
        return table[last] as f64;
    }
    let i = x.floor() as usize;
    let frac = x - i as f64;
    table[i] as f64 + (table[i + 1] as f64 - table[i] as f64) * frac
}

impl Scheduler {
    pub fn new(kind: SchedulerKind, config: SchedulerConfig) -> Result<Self, ModelError> {
        let bad = |key: &str, value: &str, allowed: &str| {
            ModelError(format!(
                "scheduler config: {key} = {value:?} is not supported ({allowed})"
            ))
        };
        let prediction = match config.prediction_type.as_str() {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::V,
            other => return Err(bad("prediction_type", other, "epsilon or v_prediction")),
        };
        let spacing = match config.timestep_spacing.as_str() {
            "linspace" => Spacing::Linspace,
            "leading" => Spacing::Leading,
            "trailing" => Spacing::Trailing,
            other => return Err(bad("timestep_spacing", other, "linspace, leading or trailing")),
        };
        let n = config.num_train_timesteps;
        if n < 2 {
            return Err(bad("num_train_timesteps", &n.to_string(), "at least 2"));
        }
        let betas: Vec<f32> = match config.beta_schedule.as_str() {
            "linear" => linspace_f32(config.beta_start, config.beta_end, n),
            "scaled_linear" => linspace_f32(config.beta_start.sqrt(), config.beta_end.sqrt(), n)
                .into_iter()
                .map(|b| b * b)
                .collect(),
            other => return Err(bad("beta_schedule", other, "linear or scaled_linear")),
        };
        for (key, on, why) in [
            ("use_karras_sigmas", config.use_karras_sigmas, "Karras sigmas"),
            (
                "rescale_betas_zero_snr",
                config.rescale_betas_zero_snr,
                "zero-SNR rescaling",
            ),
            ("thresholding", config.thresholding, "dynamic thresholding"),
        ] {
            if on {
                return Err(bad(key, "true", &format!("{why} is not implemented")));
            }
        }
        if config.interpolation_type != "linear" {
            return Err(bad("interpolation_type", &config.interpolation_type, "linear"));
        }
        if !matches!(config.final_sigmas_type.as_str(), "zero" | "sigma_min") {
            return Err(bad("final_sigmas_type", &config.final_sigmas_type, "zero or sigma_min"));
        }
        if kind == SchedulerKind::DpmSolverMultistep
            && (config.algorithm_type != "dpmsolver++" || config.solver_type != "midpoint" || config.solver_order != 2)
        {
            return Err(bad(
                "algorithm_type/solver_type/solver_order",
                &format!(
                    "{}/{}/{}",
                    config.algorithm_type, config.solver_type, config.solver_order
                ),
                "dpmsolver++/midpoint/2",
            ));
        }
        // torch's cumprod accumulates f32 inputs in f64 on the CPU.
        let mut acc = 1f64;
        let alphas_cumprod = betas
            .iter()
            .map(|&b| {
                acc *= (1.0f32 - b) as f64;
                acc as f32
            })
            .collect();
        Ok(Scheduler {
            kind,
            config,
            prediction,
            spacing,
            alphas_cumprod,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            step_index: 0,
            x0_history: Vec::new(),
            lower_order_nums: 0,
        })
    }

    /// Reads a diffusers `scheduler_config.json`; `kind` overrides its `_class_name`.
    pub fn from_file(path: &Path, kind: Option<SchedulerKind>) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::at(path, e))?;
        let config: SchedulerConfig = serde_json::from_str(&text).map_err(|e| ModelError::at(path, e))?;
        let kind = match kind {
            Some(k) => k,
            None => SchedulerKind::parse(&config.class_name).ok_or_else(|| {
                ModelError::at(
                    path,
                    format!("_class_name {:?} is not a supported scheduler", config.class_name),
                )
            })?,
        };
        Self::new(kind, config).map_err(|e| ModelError::at(path, e))
    }

    /// `((1 - ᾱ) / ᾱ)^½` in f32, as diffusers tabulates it.
    fn sigma_table(&self) -> Vec<f32> {
        self.alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
    }

    /// Prepares `steps` inference steps (`set_timesteps`).
    pub fn set_timesteps(&mut self, steps: usize) -> Result<(), ModelError> {
        let n = self.config.num_train_timesteps;
        if steps == 0 || steps > n {
            return Err(ModelError(format!("steps must be 1..={n}, got {steps}")));
        }
        let timesteps = self.timesteps_for(steps)?;
        let out_of_range = |ts: &[f64]| ts.iter().copied().find(|&t| t < 0.0 || t as usize >= n);
        if let Some(bad) = out_of_range(&timesteps) {
            // `leading` spacing plus `steps_offset` (SD 1.5's config) pushes the first timestep
            // past the schedule for the largest counts; name the count that still fits.
            let fits = (1..steps)
                .rev()
                .find(|&s| self.timesteps_for(s).is_ok_and(|ts| out_of_range(&ts).is_none()));
            return Err(ModelError(format!(
                "{steps} steps put timestep {bad} outside the schedule's 0..{n} ({:?} spacing, steps_offset {}); {}",
                self.spacing,
                self.config.steps_offset,
                fits.map_or("no step count fits".to_string(), |s| format!("at most {s} steps fit"))
            )));
        }
        self.timesteps = timesteps.iter().map(|&t| t as f32).collect();
        self.sigmas = match self.kind {
            SchedulerKind::Euler | SchedulerKind::EulerAncestral | SchedulerKind::DpmSolverMultistep => {
                let table = self.sigma_table();
                let last = if self.config.final_sigmas_type == "sigma_min" {
                    table[0]
                } else {
                    0.0
                };
                timesteps
                    .iter()
                    .map(|&t| interp(t, &table) as f32)
                    .chain(std::iter::once(last))
                    .collect()
            }
            _ => Vec::new(),
        };
        self.step_index = 0;
        self.x0_history.clear();
        self.lower_order_nums = 0;
        Ok(())
    }

    /// The timesteps of `steps` inference steps, as diffusers' `set_timesteps` computes them.
    fn timesteps_for(&self, steps: usize) -> Result<Vec<f64>, ModelError> {
        let n = self.config.num_train_timesteps;
        let offset = self.config.steps_offset as f64;
        let timesteps: Vec<f64> = match self.kind {
            SchedulerKind::Lcm => {
                let original = self.config.original_inference_steps;
                if original == 0 || original > n || steps > original {
                    return Err(ModelError(format!(
                        "LCM: steps ({steps}) must not exceed original_inference_steps ({original}), itself ≤ {n}"
                    )));
                }
                let k = n / original;
                let origin: Vec<f64> = (1..=original).rev().map(|i| (i * k) as f64 - 1.0).collect();
                (0..steps)
                    .map(|i| origin[(i as f64 * origin.len() as f64 / steps as f64).floor() as usize])
                    .collect()
            }
            SchedulerKind::DpmSolverMultistep => match self.spacing {
                // One more point than steps, the last dropped.
                Spacing::Linspace => {
                    let last = (n - 1) as f64;
                    (0..steps)
                        .map(|i| (last * (steps - i) as f64 / steps as f64).round())
                        .collect()
                }
                Spacing::Leading => {
                    let ratio = (n / (steps + 1)) as f64;
                    (1..=steps).rev().map(|i| i as f64 * ratio + offset).collect()
                }
                Spacing::Trailing => trailing(n, steps),
            },
            SchedulerKind::Ddim | SchedulerKind::Euler | SchedulerKind::EulerAncestral => match self.spacing {
                Spacing::Linspace => {
                    // np.linspace(0, n - 1, steps)[::-1]: rounded for DDIM (integer timesteps),
                    // cast to f32 for Euler (fractional timesteps).
                    let step = if steps > 1 {
                        (n - 1) as f64 / (steps - 1) as f64
                    } else {
                        0.0
                    };
                    (0..steps)
                        .rev()
                        .map(|i| {
                            let t = step * i as f64;
                            if self.kind == SchedulerKind::Ddim {
                                t.round()
                            } else {
                                t as f32 as f64
                            }
                        })
                        .collect()
                }
                Spacing::Leading => {
                    let ratio = (n / steps) as f64;
                    (0..steps).rev().map(|i| i as f64 * ratio + offset).collect()
                }
                Spacing::Trailing => trailing(n, steps),
            },
        };
        Ok(timesteps)
    }

    /// The timesteps to give the model, one per step.
    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// What the initial unit-variance noise is scaled by.
    pub fn init_noise_sigma(&self) -> f32 {
        match self.kind {
            SchedulerKind::Euler | SchedulerKind::EulerAncestral => {
                let max = self.sigmas.iter().cloned().fold(0f32, f32::max);
                if matches!(self.spacing, Spacing::Linspace | Spacing::Trailing) {
                    max
                } else {
                    (max * max + 1.0).sqrt()
                }
            }
            _ => 1.0,
        }
    }

    /// The model input for the current step (Euler's divide by `(σ² + 1)^½`).
    pub fn scale_model_input(&self, sample: Tensor<4>) -> Tensor<4> {
        match self.kind {
            SchedulerKind::Euler | SchedulerKind::EulerAncestral => {
                let sigma = self.sigmas[self.step_index];
                sample / (sigma * sigma + 1.0).sqrt()
            }
            _ => sample,
        }
    }

    fn alpha(&self, t: f32) -> f32 {
        self.alphas_cumprod[t as usize]
    }

    fn final_alpha(&self) -> f32 {
        if self.config.set_alpha_to_one {
            1.0
        } else {
            self.alphas_cumprod[0]
        }
    }

    /// `(x̂₀, ε̂)` from the model output at `ᾱ_t` (DDIM and LCM).
    fn predict_x0(&self, output: Tensor<4>, sample: Tensor<4>, alpha: f32) -> (Tensor<4>, Tensor<4>) {
        let (sa, sb) = (alpha.sqrt(), (1.0 - alpha).sqrt());
        match self.prediction {
            Prediction::Epsilon => ((sample - output.clone() * sb) / sa, output),
            Prediction::V => (sample.clone() * sa - output.clone() * sb, output * sa + sample * sb),
        }
    }

    /// One denoising step from the model's output at the current timestep. `noise` draws a
    /// unit-variance tensor shaped like the sample (Euler ancestral and LCM use it).
    pub fn step(
        &mut self,
        output: Tensor<4>,
        sample: Tensor<4>,
        noise: &mut dyn FnMut() -> Tensor<4>,
    ) -> Result<Tensor<4>, ModelError> {
        let i = self.step_index;
        let steps = self.timesteps.len();
        if i >= steps {
            return Err(ModelError(format!(
                "all {steps} steps are done (call set_timesteps again)"
            )));
        }
        let t = self.timesteps[i];
        let next = match self.kind {
            SchedulerKind::Ddim => {
                let prev_t = t as i64 - (self.config.num_train_timesteps / steps) as i64;
                let alpha = self.alpha(t);
                let alpha_prev = if prev_t >= 0 {
                    self.alphas_cumprod[prev_t as usize]
                } else {
                    self.final_alpha()
                };
                let (x0, eps) = self.predict_x0(output, sample, alpha);
                x0 * alpha_prev.sqrt() + eps * (1.0 - alpha_prev).sqrt()
            }
            SchedulerKind::Euler | SchedulerKind::EulerAncestral => {
                let (sigma, sigma_next) = (self.sigmas[i], self.sigmas[i + 1]);
                let x0 = match self.prediction {
                    Prediction::Epsilon => sample.clone() - output * sigma,
                    Prediction::V => {
                        let s2 = sigma * sigma + 1.0;
                        output * (-sigma / s2.sqrt()) + sample.clone() / s2
                    }
                };
                let derivative = (sample.clone() - x0) / sigma;
                if self.kind == SchedulerKind::Euler {
                    sample + derivative * (sigma_next - sigma)
                } else {
                    let up =
                        (sigma_next * sigma_next * (sigma * sigma - sigma_next * sigma_next) / (sigma * sigma)).sqrt();
                    let down = (sigma_next * sigma_next - up * up).sqrt();
                    sample + derivative * (down - sigma) + noise() * up
                }
            }
            SchedulerKind::DpmSolverMultistep => {
                let alpha_sigma = |s: f32| {
                    let a = 1.0 / (s * s + 1.0).sqrt();
                    (a, s * a)
                };
                let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
                let x0 = match self.prediction {
                    Prediction::Epsilon => (sample.clone() - output * sigma_s0) / alpha_s0,
                    Prediction::V => sample.clone() * alpha_s0 - output * sigma_s0,
                };
                self.x0_history.push(x0.clone());
                if self.x0_history.len() > 2 {
                    self.x0_history.remove(0);
                }
                let last = i == steps - 1;
                let lower_order_final = last
                    && (self.config.euler_at_final
                        || (self.config.lower_order_final && steps < 15)
                        || self.config.final_sigmas_type == "zero");
                let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
                let lambda = |a: f32, s: f32| a.ln() - s.ln();
                let (lambda_t, lambda_s0) = (lambda(alpha_t, sigma_t), lambda(alpha_s0, sigma_s0));
                let h = lambda_t - lambda_s0;
                let first = sample * (sigma_t / sigma_s0) - x0.clone() * (alpha_t * ((-h).exp() - 1.0));
                let next = if self.lower_order_nums < 1 || lower_order_final {
                    first
                } else {
                    let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
                    let h0 = lambda_s0 - lambda(alpha_s1, sigma_s1);
                    let r0 = h0 / h;
                    let d1 = (x0 - self.x0_history[0].clone()) / r0;
                    first - d1 * (0.5 * alpha_t * ((-h).exp() - 1.0))
                };
                if self.lower_order_nums < 2 {
                    self.lower_order_nums += 1;
                }
                next
            }
            SchedulerKind::Lcm => {
                let prev_t = self.timesteps.get(i + 1).copied().unwrap_or(t);
                let alpha = self.alpha(t);
                let alpha_prev = if prev_t >= 0.0 {
                    self.alpha(prev_t)
                } else {
                    self.final_alpha()
                };
                let scaled = t as f64 * self.config.timestep_scaling;
                let sigma_data = 0.5f64;
                let c_skip = (sigma_data * sigma_data / (scaled * scaled + sigma_data * sigma_data)) as f32;
                let c_out = (scaled / (scaled * scaled + sigma_data * sigma_data).sqrt()) as f32;
                let (x0, _) = self.predict_x0(output, sample.clone(), alpha);
                let denoised = x0 * c_out + sample * c_skip;
                if i + 1 < steps {
                    denoised * alpha_prev.sqrt() + noise() * (1.0 - alpha_prev).sqrt()
                } else {
                    denoised
                }
            }
        };
        self.step_index += 1;
        Ok(next)
    }
}

/// `np.arange(n, 0, -n / steps).round() - 1`.
fn trailing(n: usize, steps: usize) -> Vec<f64> {
    let ratio = n as f64 / steps as f64;
    (0..steps)
        .map(|i| (n as f64 - i as f64 * ratio).round() - 1.0)
        .collect()
}
