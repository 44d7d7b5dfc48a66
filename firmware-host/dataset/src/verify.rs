//! `divergen-host verify DIR`: reads back everything the host wrote and checks it.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io;
use std::path::Path;

use divergen_protocol::CategoryTable;
use serde::Serialize;

use crate::coco::CocoFile;
use crate::store::{CATEGORIES_FILE, ShardIndex, list_journals, list_shards};

#[derive(Debug, Default, Serialize)]
pub struct CategoryCount {
    pub id: u32,
    pub name: String,
    pub frequency: String,
    pub images: u64,
    pub instances: u64,
    pub generated: u64,
    pub real: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub shards: u64,
    pub tar_shards: u64,
    pub images: u64,
    pub annotations: u64,
    /// Per category with at least one instance.
    pub categories: Vec<CategoryCount>,
    /// Things that are not wrong but worth knowing (samples waiting in the journal…).
    pub notes: Vec<String>,
    /// Everything wrong, each naming the file.
    pub problems: Vec<String>,
}

/// Pixel tolerance between a stored box and its mask's extent.
const BBOX_TOLERANCE: f32 = 1.0;

pub fn verify(out: &Path, mut progress: impl FnMut(u64, u64)) -> io::Result<Report> {
    let mut report = Report::default();
    if !out.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{}: no such folder", out.display()),
        ));
    }
    let categories_path = out.join(CATEGORIES_FILE);
    let table: Option<CategoryTable> = match fs::read(&categories_path) {
        Ok(bytes) => match serde_json::from_slice::<CategoryTable>(&bytes) {
            Ok(t) => Some(t),
            Err(e) => {
                report.problems.push(format!("{}: {e}", categories_path.display()));
                None
            }
        },
        Err(e) => {
            report.problems.push(format!("{}: {e}", categories_path.display()));
            None
        }
    };
    let mut counts: BTreeMap<u32, CategoryCount> = BTreeMap::new();
    if let Some(table) = &table {
        for c in &table.categories {
            let count = CategoryCount {
                id: c.id,
                name: c.name.clone(),
                frequency: c.frequency.code().into(),
                ..Default::default()
            };
            counts.insert(c.id, count);
        }
    }
    let shards = list_shards(out)?;
    let mut files = Vec::new();
    for (_, dir) in &shards {
        if dir.extension().is_some_and(|e| e == "tmp") {
            report.notes.push(format!(
                "{}: half-built shard; the host removes and rebuilds it at its next start",
                dir.display()
            ));
            continue;
        }
        let path = dir.join("annotations.json");
        match fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<CocoFile>(&b).map_err(|e| e.to_string()))
        {
            Ok(file) => files.push((dir.clone(), file)),
            Err(e) => report.problems.push(format!("{}: {e}", path.display())),
        }
    }
    let total_images: u64 = files.iter().map(|(_, f)| f.images.len() as u64).sum();
    let mut done = 0u64;
    let mut image_ids = HashSet::new();
    let mut annotation_ids = HashSet::new();
    let mut samples = HashSet::new();
    for (dir, file) in &files {
        report.shards += 1;
        let json = dir.join("annotations.json");
        let mut problem = |p: String| report.problems.push(format!("{}: {p}", json.display()));
        let index_path = dir.join("index.json");
        match fs::read(&index_path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<ShardIndex>(&b).map_err(|e| e.to_string()))
        {
            Ok(index)
                if index.samples != file.images.len() as u64 || index.annotations != file.annotations.len() as u64 =>
            {
                problem(format!(
                    "index.json counts {} images / {} annotations, the file has {} / {}",
                    index.samples,
                    index.annotations,
                    file.images.len(),
                    file.annotations.len()
                ));
            }
            Ok(_) => {}
            Err(e) => problem(format!("index.json: {e}")),
        }
        if let Some(table) = &table {
            for c in &file.categories {
                match table.get(c.id) {
                    Some(t) if t.name == c.name && Some(t.frequency) == c.frequency() => {}
                    _ => problem(format!("category {} ({}) differs from {CATEGORIES_FILE}", c.id, c.name)),
                }
            }
        }
        let mut sizes = BTreeMap::new();
        for image in &file.images {
            done += 1;
            progress(done, total_images);
            if !image_ids.insert(image.id) {
                problem(format!("image id {} is used twice", image.id));
            }
            if !samples.insert((image.device_id.clone(), image.run_id.clone(), image.seq)) {
                problem(format!(
                    "sample {}/{}/{} is stored twice",
                    image.device_id, image.run_id, image.seq
                ));
            }
            let path = dir.join("images").join(&image.file_name);
            match image::open(&path) {
                Ok(decoded) if (decoded.width(), decoded.height()) != (image.width, image.height) => problem(format!(
                    "{} is {}x{}, annotations say {}x{}",
                    path.display(),
                    decoded.width(),
                    decoded.height(),
                    image.width,
                    image.height
                )),
                Ok(_) => {}
                Err(e) => problem(format!("{}: {e}", path.display())),
            }
            sizes.insert(image.id, (image.width, image.height));
        }
        let mut per_image_categories = HashSet::new();
        for ann in &file.annotations {
            let at = format!("annotation {}", ann.id);
            if !annotation_ids.insert(ann.id) {
                problem(format!("{at}: id used twice"));
            }
            let Some(&(w, h)) = sizes.get(&ann.image_id) else {
                problem(format!("{at}: image {} is not in this shard", ann.image_id));
                continue;
            };
            let rle = ann.rle();
            if rle.height != h || rle.width != w {
                problem(format!(
                    "{at}: mask size {}x{} on a {w}x{h} image",
                    rle.width, rle.height
                ));
                continue;
            }
            if let Err(e) = rle.check() {
                problem(format!("{at}: {e}"));
                continue;
            }
            if rle.area() != ann.area {
                problem(format!("{at}: area {} but the mask covers {}", ann.area, rle.area()));
            }
            let mask_box = rle.bbox();
            if ann
                .bbox
                .iter()
                .zip(mask_box)
                .any(|(a, b)| (a - b).abs() > BBOX_TOLERANCE)
            {
                problem(format!(
                    "{at}: bbox {:?} differs from its mask's extent {mask_box:?}",
                    ann.bbox
                ));
            }
            if ann.iscrowd != 0 {
                problem(format!("{at}: iscrowd {}", ann.iscrowd));
            }
            let instance = match ann.instance() {
                Ok(instance) => instance,
                Err(e) => {
                    problem(format!("{at}: {e}"));
                    continue;
                }
            };
            match counts.get_mut(&ann.category_id) {
                Some(count) => {
                    count.instances += 1;
                    match instance.origin {
                        divergen_protocol::Origin::Real => count.real += 1,
                        divergen_protocol::Origin::Generated { .. } => count.generated += 1,
                    }
                    if per_image_categories.insert((ann.image_id, ann.category_id)) {
                        count.images += 1;
                    }
                }
                None => problem(format!(
                    "{at}: category {} is not in {CATEGORIES_FILE}",
                    ann.category_id
                )),
            }
        }
        // LVIS's federated loss treats neg_category_ids as verified absent: an image that also
        // annotates one of them trains its own instances as background.
        let annotated: HashSet<(u64, u32)> = file.annotations.iter().map(|a| (a.image_id, a.category_id)).collect();
        for image in &file.images {
            let contradicted: Vec<u32> = image
                .neg_category_ids
                .iter()
                .copied()
                .filter(|c| annotated.contains(&(image.id, *c)))
                .collect();
            if !contradicted.is_empty() {
                problem(format!(
                    "image {} lists categories {contradicted:?} in neg_category_ids but annotates them",
                    image.id
                ));
            }
            let both: Vec<&u32> = image
                .neg_category_ids
                .iter()
                .filter(|c| image.not_exhaustive_category_ids.contains(c))
                .collect();
            if !both.is_empty() {
                problem(format!(
                    "image {} lists categories {both:?} as both negative and not exhaustively annotated",
                    image.id
                ));
            }
        }
        report.images += file.images.len() as u64;
        report.annotations += file.annotations.len() as u64;
        let tar_path = dir.with_extension("tar");
        if tar_path.exists() {
            report.tar_shards += 1;
            match count_tar_members(&tar_path) {
                Ok(n) if n == 2 * file.images.len() as u64 => {}
                Ok(n) => report.problems.push(format!(
                    "{}: {n} members, expected 2 per image ({} images)",
                    tar_path.display(),
                    file.images.len()
                )),
                Err(e) => report.problems.push(format!("{}: {e}", tar_path.display())),
            }
        }
    }
    for (_, journal) in list_journals(out)? {
        if let Ok(meta) = fs::metadata(&journal)
            && meta.len() > 0
        {
            report.notes.push(format!(
                "{}: {} bytes of acknowledged samples not yet sealed into a shard (the host seals them when the shard fills, at shutdown, or after its next start)",
                journal.display(),
                meta.len()
            ));
        }
    }
    report.categories = counts.into_values().filter(|c| c.instances > 0).collect();
    Ok(report)
}

fn count_tar_members(path: &Path) -> io::Result<u64> {
    let mut archive = tar::Archive::new(fs::File::open(path)?);
    let mut n = 0;
    for entry in archive.entries()? {
        entry?;
        n += 1;
    }
    Ok(n)
}
