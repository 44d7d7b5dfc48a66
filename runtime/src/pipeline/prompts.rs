//! Stage 1's prompt diversity: DiverGen's template, its LLM-written prompt banks (one prompt a
//! line, `<id>.txt`), and a seeded attribute grammar that writes prompts in the banks' style for
//! categories that have no bank.

use std::path::Path;

use divergen_protocol::Category;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};

use super::config::PromptSource;
use crate::Result;

pub const WHITE_BACKGROUND: &str = ", in a white background";

/// DiverGen's manual template (`tools/generate_prompt.py`).
pub fn template(category: &Category) -> String {
    format!(
        "a photo of a single {}, {}{WHITE_BACKGROUND}",
        display_name(category),
        category.def
    )
}

/// LVIS names use underscores and sometimes a `_(sense)` suffix: "bow_(weapon)" → "bow (weapon)".
pub fn display_name(category: &Category) -> String {
    category.name.replace('_', " ")
}

/// The five openings of the banks, with how often each appears there (of 18,432 lines).
const OPENINGS: [(&str, u32); 5] = [
    ("A photo of", 3345),
    ("An image of", 3892),
    ("A real photo of", 3624),
    ("A photography of", 3581),
    ("An illustration of", 3753),
];
const SIZES: [&str; 6] = ["small", "large", "tiny", "compact", "oversized", "medium-sized"];
const COLOURS: [&str; 14] = [
    "red",
    "blue",
    "green",
    "yellow",
    "black",
    "white",
    "silver",
    "brown",
    "orange",
    "purple",
    "pink",
    "grey",
    "golden",
    "multicoloured",
];
const MATERIALS: [&str; 10] = [
    "wooden", "metal", "plastic", "ceramic", "glass", "leather", "fabric", "stone", "paper", "rubber",
];
const STYLES: [&str; 9] = [
    "vintage",
    "modern",
    "sleek",
    "rustic",
    "minimalist",
    "ornate",
    "colourful",
    "classic",
    "weathered",
];
const CONTEXTS: [&str; 10] = [
    "seen from the side",
    "seen from above",
    "in soft studio light",
    "with a glossy finish",
    "with fine surface detail",
    "with a matte texture",
    "in sharp focus",
    "casting a soft shadow",
    "in a slightly tilted pose",
    "shown in full",
];

/// Writes `count` distinct-as-possible prompts for a category in the banks' style: an opening,
/// an article, two or three attributes (size/colour/material/style), the name, an optional
/// context phrase, then the white-background suffix. A pure function of (category, seed).
pub fn grammar(category: &Category, count: usize, seed: u64) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed ^ (u64::from(category.id)).wrapping_mul(0xA24B_AED4_963E_E407));
    let name = display_name(category);
    let total: u32 = OPENINGS.iter().map(|(_, n)| n).sum();
    let mut out: Vec<String> = Vec::with_capacity(count);
    let mut attempts = 0;
    while out.len() < count {
        attempts += 1;
        let mut pick = rng.random_range(0..total);
        let opening = OPENINGS
            .iter()
            .find(|(_, n)| {
                let hit = pick < *n;
                pick = pick.saturating_sub(*n);
                hit
            })
            .map_or(OPENINGS[0].0, |(o, _)| o);
        let mut attributes: Vec<&str> = Vec::new();
        if rng.random_bool(0.5) {
            attributes.push(SIZES.choose(&mut rng).copied().unwrap_or("small"));
        }
        if rng.random_bool(0.4) {
            attributes.push(STYLES.choose(&mut rng).copied().unwrap_or("modern"));
        }
        if rng.random_bool(0.8) {
            attributes.push(COLOURS.choose(&mut rng).copied().unwrap_or("red"));
        }
        if rng.random_bool(0.4) {
            attributes.push(MATERIALS.choose(&mut rng).copied().unwrap_or("metal"));
        }
        let described = if attributes.is_empty() {
            name.clone()
        } else {
            format!("{} {name}", attributes.join(" "))
        };
        let article = if described.starts_with(['a', 'e', 'i', 'o', 'u']) {
            "an"
        } else {
            "a"
        };
        let context = if rng.random_bool(0.6) {
            format!(" {}", CONTEXTS.choose(&mut rng).copied().unwrap_or("shown in full"))
        } else {
            String::new()
        };
        let prompt = format!("{opening} {article} {described}{context}{WHITE_BACKGROUND}");
        // The banks hold duplicates too; the grammar only settles for one when it runs dry.
        if !out.contains(&prompt) || attempts > count * 20 {
            out.push(prompt);
        }
    }
    out
}

/// Reads `<bank>/<id>.txt` if it exists: its non-empty lines.
pub fn read_bank(bank: &Path, category: &Category) -> Result<Option<Vec<String>>> {
    let path = bank.join(format!("{}.txt", category.id));
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let lines: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if lines.is_empty() {
        return Err(format!("{}: the prompt bank file is empty", path.display()).into());
    }
    if let Some(long) = lines.iter().find(|l| l.len() > 1000) {
        return Err(format!(
            "{}: a prompt of {} characters (1000 at most)",
            path.display(),
            long.len()
        )
        .into());
    }
    Ok(Some(lines))
}

/// The prompts a category's images cycle through, as DiverGen builds them: a category with a
/// bank uses the bank (128 prompts × 8 images in DiverGen); otherwise the template, plus grammar
/// prompts when that source is on.
pub fn category_prompts(
    category: &Category,
    sources: &[PromptSource],
    bank: Option<&Path>,
    grammar_count: usize,
    seed: u64,
) -> Result<Vec<String>> {
    if sources.contains(&PromptSource::Bank)
        && let Some(bank) = bank
        && let Some(lines) = read_bank(bank, category)?
    {
        return Ok(lines);
    }
    let mut prompts = Vec::new();
    if sources.contains(&PromptSource::Template) {
        prompts.push(template(category));
    }
    if sources.contains(&PromptSource::Grammar) {
        prompts.extend(grammar(category, grammar_count, seed));
    }
    if prompts.is_empty() {
        // Only "bank" is on and this category has no file: the template is the paper's fallback.
        prompts.push(template(category));
    }
    Ok(prompts)
}

/// Which prompt each of `count` images of a category gets: every prompt once per round, in a
/// seeded order, so 128 prompts over 1,024 images give each exactly 8.
pub fn assign(prompts: usize, count: usize, seed: u64) -> Vec<usize> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let mut round: Vec<usize> = (0..prompts).collect();
        round.shuffle(&mut rng);
        out.extend(round.into_iter().take(count - out.len()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use divergen_protocol::Frequency;

    fn category(id: u32, name: &str) -> Category {
        Category {
            id,
            name: name.into(),
            synset: String::new(),
            def: "a thing used in tests".into(),
            frequency: Frequency::Rare,
        }
    }

    #[test]
    fn the_template_is_divergens() {
        assert_eq!(
            template(&category(1, "aerosol_can")),
            "a photo of a single aerosol can, a thing used in tests, in a white background"
        );
    }

    #[test]
    fn grammar_prompts_look_like_the_bank_and_are_seeded() {
        let c = category(7, "apple");
        let a = grammar(&c, 128, 3);
        assert_eq!(a, grammar(&c, 128, 3));
        assert_ne!(a, grammar(&c, 128, 4));
        let distinct: std::collections::HashSet<_> = a.iter().collect();
        assert!(distinct.len() >= 120, "only {} distinct prompts of 128", distinct.len());
        for p in &a {
            assert!(OPENINGS.iter().any(|(o, _)| p.starts_with(o)), "{p}");
            assert!(p.ends_with(WHITE_BACKGROUND), "{p}");
            assert!(p.contains("apple"), "{p}");
        }
        // Every opening shows up, roughly in the bank's proportions.
        for (o, _) in OPENINGS {
            assert!(
                a.iter().filter(|p| p.starts_with(&format!("{o} "))).count() >= 10,
                "{o}"
            );
        }
    }

    #[test]
    fn prompts_are_used_evenly() {
        let picks = assign(128, 1024, 5);
        let mut counts = [0usize; 128];
        for p in picks {
            counts[p] += 1;
        }
        assert!(counts.iter().all(|&c| c == 8));
    }
}
