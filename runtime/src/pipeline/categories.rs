//! The category set of a run: an LVIS `*_cat_info.json` table (DiverGen's 1,203 LVIS categories,
//! or the 1,453 with its 250 ImageNet extras), subset by ids or frequency, and the per-category
//! size statistics instance paste draws from.

use std::collections::HashMap;
use std::path::Path;

use divergen_dataset::coco::CatInfo;
use divergen_protocol::{Category, CategoryTable};

use super::config::CategoriesConfig;
use crate::Result;

/// The run's categories: the whole table (the output dataset's, so every real annotation keeps
/// its category), the ids this run generates for, and the size statistics.
#[derive(Clone, Debug)]
pub struct Categories {
    pub table: CategoryTable,
    /// Generated for, in id order.
    pub selected: Vec<u32>,
    /// Category id → (mean, std) of `sqrt(box area / image area)` over real instances.
    pub area_stats: HashMap<u32, (f64, f64)>,
}

impl Categories {
    pub fn load(config: &CategoriesConfig) -> Result<Self> {
        let path = &config.table;
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let infos: Vec<CatInfo> = serde_json::from_str(&text).map_err(|e| {
            format!(
                "{}: not an LVIS category table (a list of {{id, name, def, frequency}}): {e}",
                path.display()
            )
        })?;
        let mut categories = Vec::with_capacity(infos.len());
        for info in infos {
            let frequency = info.frequency().ok_or_else(|| {
                format!(
                    "{}: category {} has frequency {:?}",
                    path.display(),
                    info.id,
                    info.frequency
                )
            })?;
            categories.push(Category {
                id: info.id,
                name: info.name,
                synset: info.synset,
                def: info.def,
                frequency,
            });
        }
        categories.sort_by_key(|c| c.id);
        let table = CategoryTable {
            categories: categories.clone(),
        };
        table.validate().map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some(ids) = &config.ids {
            if let Some(missing) = ids.iter().find(|id| !categories.iter().any(|c| c.id == **id)) {
                return Err(format!("categories.ids: {missing} is not in {}", path.display()).into());
            }
            categories.retain(|c| ids.contains(&c.id));
        }
        if let Some(freqs) = &config.frequency {
            categories.retain(|c| freqs.iter().any(|f| f == c.frequency.code()));
        }
        if let Some(limit) = config.limit {
            categories.truncate(limit);
        }
        if categories.is_empty() {
            return Err(format!(
                "categories: no category of {} is left after ids/frequency/limit",
                path.display()
            )
            .into());
        }
        let selected = categories.iter().map(|c| c.id).collect();
        let area_stats = match &config.area_stats {
            Some(p) => read_area_stats(p)?,
            None => HashMap::new(),
        };
        Ok(Categories {
            table,
            selected,
            area_stats,
        })
    }

    pub fn get(&self, id: u32) -> Option<&Category> {
        self.table.get(id)
    }
}

/// `area_mean_std2.json` keys categories by their LVIS id ("1" … "1203"; unlike the pool
/// files, which are 0-based).
pub fn read_area_stats(path: &Path) -> Result<HashMap<u32, (f64, f64)>> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let raw: HashMap<String, [f64; 2]> = serde_json::from_str(&text)
        .map_err(|e| format!("{}: expected {{\"<category id>\": [mean, std]}}: {e}", path.display()))?;
    let mut stats = HashMap::with_capacity(raw.len());
    for (key, [mean, std]) in raw {
        let id: u32 = key
            .parse()
            .ok()
            .filter(|&id| id > 0)
            .ok_or_else(|| format!("{}: key {key:?} is not a category id", path.display()))?;
        if !(mean.is_finite() && std.is_finite() && mean > 0.0 && std >= 0.0) {
            return Err(format!("{}: category {id} has mean {mean}, std {std}", path.display()).into());
        }
        stats.insert(id, (mean, std));
    }
    Ok(stats)
}
