//! DiverGen's published tables, as shipped in `runtime/data/divergen/`, through the run's loaders.

use std::path::{Path, PathBuf};

use divergen_runtime::pipeline::categories::Categories;
use divergen_runtime::pipeline::config::{CategoriesConfig, PromptSource};
use divergen_runtime::pipeline::prompts;

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/divergen")
}

fn config() -> CategoriesConfig {
    CategoriesConfig {
        table: data().join("ImageNet2012_filtered04_lvis_v1_train_cat_info_250.json"),
        ids: None,
        frequency: None,
        limit: None,
        area_stats: Some(data().join("area_mean_std2.json")),
    }
}

#[test]
fn the_1453_categories_and_their_size_statistics_load() {
    let c = Categories::load(&config()).unwrap();
    assert_eq!(c.table.categories.len(), 1453);
    assert_eq!(c.selected.len(), 1453);
    // Statistics for the 1,203 LVIS categories only, keyed by LVIS id.
    assert_eq!(c.area_stats.len(), 1203);
    assert!(c.area_stats.keys().all(|&id| (1..=1203).contains(&id)));
    let mean: f64 = c.area_stats.values().map(|s| s.0).sum::<f64>() / 1203.0;
    assert!((mean - 0.157).abs() < 0.001, "{mean}");
    assert_eq!(c.get(1204).unwrap().name, "tench");

    let rare = Categories::load(&CategoriesConfig {
        frequency: Some(vec!["r".into()]),
        ..config()
    })
    .unwrap();
    assert_eq!(rare.selected.len(), 337);
    assert_eq!(rare.table.categories.len(), 1453, "the output table stays whole");
    let e = Categories::load(&CategoriesConfig {
        ids: Some(vec![1, 99999]),
        ..config()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("99999"), "{e}");
}

#[test]
fn banks_win_where_they_exist_and_the_template_elsewhere() {
    let c = Categories::load(&config()).unwrap();
    let bank = data().join("gpt_prompts");
    let sources = [PromptSource::Template, PromptSource::Bank];
    let ambulance = prompts::category_prompts(c.get(8).unwrap(), &sources, Some(&bank), 0, 0).unwrap();
    assert_eq!(ambulance.len(), 128);
    assert!(ambulance.iter().all(|p| p.ends_with(prompts::WHITE_BACKGROUND)));
    let aerosol = prompts::category_prompts(c.get(1).unwrap(), &sources, Some(&bank), 0, 0).unwrap();
    assert_eq!(
        aerosol,
        ["a photo of a single aerosol can, a dispenser that holds a substance under pressure, in a white background"]
    );
    let banks = std::fs::read_dir(&bank).unwrap().count();
    assert_eq!(banks, 144);
}
