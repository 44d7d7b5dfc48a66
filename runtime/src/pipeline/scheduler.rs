//! Which models stay on the device under a memory budget. Every batch runs generate → annotate
//! → filter, so each model is used once per batch; a model that is not resident is loaded for
//! its stage and dropped after it. The plan keeps the largest models resident first (reloading
//! them costs the most) as long as the resident set, plus the largest model that still has to
//! be loaded in turn, plus room for activations, fits the budget.

use serde::Serialize;

use crate::Result;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ModelPlan {
    pub name: String,
    pub estimated_mib: f64,
    pub resident: bool,
}

/// Room kept for activations: a quarter of the largest model, at least 64 MiB.
pub fn activation_reserve(largest: u64) -> u64 {
    (largest / 4).max(64 << 20)
}

/// `models`: (name, estimated device bytes). `budget`: bytes, or `None` for "keep everything".
pub fn plan(models: &[(String, u64)], budget: Option<u64>) -> Result<Vec<ModelPlan>> {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let mut resident = vec![budget.is_none(); models.len()];
    if let Some(budget) = budget {
        let largest = models.iter().map(|(_, b)| *b).max().unwrap_or(0);
        let reserve = activation_reserve(largest);
        if let Some((name, bytes)) = models.iter().find(|(_, b)| *b + reserve > budget) {
            return Err(format!(
                "budget {:.0} MiB is too small: {name} needs about {:.0} MiB plus {:.0} MiB for activations",
                mib(budget),
                mib(*bytes),
                mib(reserve)
            )
            .into());
        }
        let mut order: Vec<usize> = (0..models.len()).collect();
        order.sort_by(|&a, &b| models[b].1.cmp(&models[a].1).then(a.cmp(&b)));
        for &candidate in &order {
            resident[candidate] = true;
            let held: u64 = (0..models.len()).filter(|&i| resident[i]).map(|i| models[i].1).sum();
            let transient = (0..models.len())
                .filter(|&i| !resident[i])
                .map(|i| models[i].1)
                .max()
                .unwrap_or(0);
            if held + transient + reserve > budget {
                resident[candidate] = false;
            }
        }
    }
    Ok(models
        .iter()
        .zip(resident)
        .map(|((name, bytes), resident)| ModelPlan {
            name: name.clone(),
            estimated_mib: mib(*bytes),
            resident,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn models() -> Vec<(String, u64)> {
        vec![
            ("text encoder".into(), 130 * MIB),
            ("unet".into(), 900 * MIB),
            ("vae decoder".into(), 200 * MIB),
            ("sam".into(), 90 * MIB),
            ("clip".into(), 160 * MIB),
        ]
    }

    fn resident(p: &[ModelPlan]) -> Vec<&str> {
        p.iter().filter(|m| m.resident).map(|m| m.name.as_str()).collect()
    }

    #[test]
    fn no_budget_keeps_everything() {
        assert_eq!(resident(&plan(&models(), None).unwrap()).len(), 5);
    }

    #[test]
    fn a_large_budget_keeps_everything_a_small_one_only_what_fits() {
        assert_eq!(resident(&plan(&models(), Some(2000 * MIB)).unwrap()).len(), 5);
        // 1,200 MiB: the UNet (900) + reserve (225) leaves room for nothing else beside the
        // largest transient model (200), so everything is loaded per batch.
        assert!(resident(&plan(&models(), Some(1200 * MIB)).unwrap()).is_empty());
        // 1,400 MiB: UNet resident → 900 + 200 (largest transient) + 225 = 1,325 fits.
        let p = plan(&models(), Some(1400 * MIB)).unwrap();
        assert_eq!(resident(&p), ["unet"]);
        // Whatever the plan, resident + largest transient + reserve stays under the budget.
        for budget in (1200..3000).step_by(50) {
            let p = plan(&models(), Some(budget * MIB)).unwrap();
            let held: f64 = p.iter().filter(|m| m.resident).map(|m| m.estimated_mib).sum();
            let transient = p
                .iter()
                .filter(|m| !m.resident)
                .map(|m| m.estimated_mib)
                .fold(0.0, f64::max);
            assert!(held + transient + 225.0 <= budget as f64, "{budget}: {p:?}");
        }
    }

    #[test]
    fn a_budget_below_the_largest_model_is_an_error_naming_it() {
        let e = plan(&models(), Some(1000 * MIB)).unwrap_err().to_string();
        assert!(e.contains("unet needs about 900 MiB"), "{e}");
    }
}
