//! The schedulers against diffusers over short runs (fixture: `models/fixtures/diffusion/
//! schedulers.json`, made by `models/fixtures/make_scheduler_fixture.py`): the same timesteps and
//! sigmas, and the same final latents when a fixed stand-in model drives every step and every
//! noise draw is injected.

use burn::tensor::{Tensor, TensorData};
use divergen_kernels::testing::{devices, relative_error, to_vec};
use divergen_models::diffusion::scheduler::{Scheduler, SchedulerConfig, SchedulerKind};
use divergen_models::recipe;

fn fixture() -> serde_json::Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/diffusion/schedulers.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn every_scheduler_matches_diffusers() {
    let fixture = fixture();
    let device = &devices()[0].device;
    let shape = [1, 4, 8, 8];
    let n: usize = shape.iter().product();
    let tensor = |v: Vec<f32>| Tensor::<4>::from_data(TensorData::new(v, shape), device);
    for case in fixture["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let kind = SchedulerKind::parse(case["scheduler"].as_str().unwrap()).unwrap();
        let config: SchedulerConfig = serde_json::from_value(case["config"].clone()).unwrap();
        let mut scheduler = Scheduler::new(kind, config).unwrap();
        scheduler
            .set_timesteps(case["steps"].as_u64().unwrap() as usize)
            .unwrap();
        assert_eq!(
            scheduler.timesteps(),
            floats(&case["timesteps"]).as_slice(),
            "{name}: timesteps"
        );
        if !case["sigmas"].is_null() {
            let err = relative_error(scheduler.sigmas(), &floats(&case["sigmas"]));
            assert!(err <= 1e-6, "{name}: sigmas differ by {err:.2e}");
        }
        let init = case["init_noise_sigma"].as_f64().unwrap() as f32;
        assert!(
            (scheduler.init_noise_sigma() - init).abs() <= 1e-6 * init,
            "{name}: init_noise_sigma"
        );

        let mut latents = tensor(recipe::values("latents", n, 1.7, 0.0)) * scheduler.init_noise_sigma();
        let mut draws = 0;
        let timesteps = scheduler.timesteps().to_vec();
        for &t in &timesteps {
            let x = scheduler.scale_model_input(latents.clone());
            let output = x.clone() * (0.8 * t / 1000.0) + x.tanh() * 0.1;
            let mut noise = || {
                let v = recipe::values(&format!("noise_{name}_{draws}"), n, 1.7, 0.0);
                draws += 1;
                tensor(v)
            };
            latents = scheduler.step(output, latents, &mut noise).unwrap();
        }
        assert_eq!(
            draws,
            case["noise_draws"].as_u64().unwrap() as usize,
            "{name}: noise draws"
        );
        let got = to_vec(latents);
        let err = relative_error(&got, &floats(&case["final_latents"]));
        eprintln!("{name}: final latents relative error {err:.2e}");
        assert!(err <= 1e-4, "{name}: final latents differ from diffusers by {err:.2e}");
    }
}

#[test]
fn bad_scheduler_settings_name_the_key() {
    let config = |json: &str| -> SchedulerConfig { serde_json::from_str(json).unwrap() };
    let err = |kind, json: &str| Scheduler::new(kind, config(json)).err().unwrap().to_string();
    assert!(err(SchedulerKind::Euler, r#"{"prediction_type": "sample"}"#).contains("prediction_type"));
    assert!(err(SchedulerKind::Ddim, r#"{"timestep_spacing": "karras"}"#).contains("timestep_spacing"));
    assert!(err(SchedulerKind::Ddim, r#"{"beta_schedule": "squaredcos_cap_v2"}"#).contains("beta_schedule"));
    assert!(err(SchedulerKind::DpmSolverMultistep, r#"{"solver_order": 3}"#).contains("solver_order"));
    let mut lcm = Scheduler::new(SchedulerKind::Lcm, config(r#"{"original_inference_steps": 4}"#)).unwrap();
    assert!(
        lcm.set_timesteps(8)
            .unwrap_err()
            .to_string()
            .contains("original_inference_steps")
    );
    let mut ddim = Scheduler::new(SchedulerKind::Ddim, SchedulerConfig::default()).unwrap();
    assert!(ddim.set_timesteps(0).is_err());
    ddim.set_timesteps(1).unwrap();
    let device = &devices()[0].device;
    let x = Tensor::<4>::zeros([1, 1, 2, 2], device);
    let mut noise = || Tensor::<4>::zeros([1, 1, 2, 2], device);
    ddim.step(x.clone(), x.clone(), &mut noise).unwrap();
    assert!(
        ddim.step(x.clone(), x, &mut noise)
            .unwrap_err()
            .to_string()
            .contains("steps are done")
    );
}

/// SD 1.5's scheduler config (leading spacing, steps_offset 1) cannot take 1000 steps: the first
/// timestep would be 1000. The error says how many steps do fit, and that count works.
#[test]
fn too_many_steps_for_the_spacing_name_the_count_that_fits() {
    let config: SchedulerConfig =
        serde_json::from_str(r#"{"timestep_spacing": "leading", "steps_offset": 1}"#).unwrap();
    let mut ddim = Scheduler::new(SchedulerKind::Ddim, config).unwrap();
    let err = ddim.set_timesteps(1000).unwrap_err().to_string();
    assert!(err.contains("at most 999 steps fit"), "{err}");
    ddim.set_timesteps(999).unwrap();
    ddim.set_timesteps(1000 / 2).unwrap();
}
