//! CLIP's byte-level BPE tokenizer, token for token the same as Hugging Face's
//! `CLIPTokenizerFast`. The pipeline:
//! 1. normalise: NFC, every whitespace run to one space, lower-case (character by character);
//! 2. split out `<|startoftext|>` / `<|endoftext|>` (matched after normalisation, so
//!    `<|ENDOFTEXT|>` counts too);
//! 3. pre-tokenise with CLIP's pattern (contractions, letter runs, single digits, other symbol
//!    runs; whitespace dropped);
//! 4. map each piece's UTF-8 bytes to printable characters (GPT-2's byte table), append `</w>`
//!    to the last one, merge by rank;
//! 5. `<|startoftext|>` + ids + `<|endoftext|>`, truncated to the context (77).
//!
//! Hand-written rather than the `tokenizers` crate: this is about 200 lines, and `tokenizers`
//! brings a C regex engine (oniguruma) that complicates building for phones. Parity with the
//! reference is tested on 260 strings (`models/fixtures/clip/tokenizer_cases.json`).

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::Mutex;

use regex::Regex;
use unicode_normalization::UnicodeNormalization;

pub const START_OF_TEXT: &str = "<|startoftext|>";
pub const END_OF_TEXT: &str = "<|endoftext|>";
/// CLIP's text context length.
pub const CONTEXT: usize = 77;

#[derive(Debug)]
pub struct TokenizerError(pub String);

impl std::fmt::Display for TokenizerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TokenizerError {}

pub struct ClipTokenizer {
    encoder: HashMap<String, u32>,
    ranks: HashMap<(String, String), u32>,
    byte_chars: [char; 256],
    pattern: Regex,
    whitespace: Regex,
    start: u32,
    end: u32,
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

/// GPT-2's reversible byte→character table: printable bytes map to themselves, the rest to
/// code points from U+0100 up, so every byte string becomes a printable string.
fn byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    let mut next = 256u32;
    for b in 0..256u32 {
        let c = if printable(b) {
            b
        } else {
            next += 1;
            next - 1
        };
        table[b as usize] = char::from_u32(c).expect("below U+0200, always a valid char");
    }
    table
}

impl ClipTokenizer {
    /// From a Hugging Face tokenizer folder's `vocab.json` and `merges.txt`.
    pub fn from_files(vocab_json: &Path, merges_txt: &Path) -> Result<Self, TokenizerError> {
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| TokenizerError(format!("{}: {e}", p.display())));
        let encoder: HashMap<String, u32> = serde_json::from_str(&read(vocab_json)?)
            .map_err(|e| TokenizerError(format!("{}: not a token → id map: {e}", vocab_json.display())))?;
        let merges_text = read(merges_txt)?;
        let mut merges = Vec::new();
        for (n, line) in merges_text.lines().enumerate() {
            if line.starts_with("#version") || line.trim().is_empty() {
                continue;
            }
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => merges.push((a.to_string(), b.to_string())),
                _ => {
                    return Err(TokenizerError(format!(
                        "{} line {}: expected two space-separated symbols, found {line:?}",
                        merges_txt.display(),
                        n + 1
                    )));
                }
            }
        }
        Self::new(encoder, merges).map_err(|e| TokenizerError(format!("{}: {e}", vocab_json.display())))
    }

    /// From a checkpoint folder: `vocab.json` + `merges.txt` there or in its `tokenizer/`.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        for folder in [dir.to_path_buf(), dir.join("tokenizer")] {
            let (vocab, merges) = (folder.join("vocab.json"), folder.join("merges.txt"));
            if vocab.exists() && merges.exists() {
                return Self::from_files(&vocab, &merges);
            }
        }
        Err(TokenizerError(format!(
            "{}: no vocab.json + merges.txt (looked there and in tokenizer/)",
            dir.display()
        )))
    }

    /// From OpenAI's `bpe_simple_vocab_16e6.txt.gz`, building the vocabulary as OpenAI's
    /// `simple_tokenizer` does: 256 byte symbols, the same with `</w>`, one token per merge, then
    /// the two special tokens (49,408 in all).
    pub fn from_openai_bpe(path: &Path) -> Result<Self, TokenizerError> {
        let err = |e: String| TokenizerError(format!("{}: {e}", path.display()));
        let mut text = String::new();
        let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
        flate2::read::GzDecoder::new(file)
            .read_to_string(&mut text)
            .map_err(|e| err(e.to_string()))?;
        let merges: Vec<(String, String)> = text
            .split('\n')
            .skip(1)
            .take(49152 - 256 - 2)
            .map(|line| {
                let mut parts = line.split_whitespace();
                match (parts.next(), parts.next()) {
                    (Some(a), Some(b)) => Ok((a.to_string(), b.to_string())),
                    _ => Err(err(format!("merge line {line:?} is not two symbols"))),
                }
            })
            .collect::<Result<_, _>>()?;
        Self::from_merges(merges).map_err(err)
    }

    /// A vocabulary laid out as OpenAI's: the byte symbols, the same with `</w>`, one token per
    /// merge, then the two special tokens.
    fn from_merges(merges: Vec<(String, String)>) -> Result<Self, String> {
        // OpenAI lists the byte symbols in its table's insertion order: the printable bytes
        // first, then the ones remapped above U+0100.
        let table = byte_chars();
        let mut bytes: Vec<char> = (0..256)
            .filter(|&b| table[b] as u32 == b as u32)
            .map(|b| table[b])
            .collect();
        bytes.extend((0..256).filter(|&b| table[b] as u32 != b as u32).map(|b| table[b]));
        let mut vocab: Vec<String> = bytes.iter().map(|c| c.to_string()).collect();
        vocab.extend(bytes.iter().map(|c| format!("{c}</w>")));
        vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        vocab.extend([START_OF_TEXT.to_string(), END_OF_TEXT.to_string()]);
        let encoder = vocab.into_iter().enumerate().map(|(i, t)| (t, i as u32)).collect();
        Self::new(encoder, merges)
    }

    /// A small vocabulary for a closed domain: every byte (so any text still tokenizes) plus
    /// one whole-word token per given word, built by merging its characters left to right.
    /// A tiny text model then needs a few hundred embedding rows instead of 49,408.
    pub fn for_words<'a>(words: impl IntoIterator<Item = &'a str>) -> Result<Self, TokenizerError> {
        let table = byte_chars();
        let mut merges: Vec<(String, String)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for word in words {
            let symbols: Vec<String> = word
                .to_lowercase()
                .bytes()
                .map(|b| table[b as usize].to_string())
                .collect();
            let Some((first, rest)) = symbols.split_first() else {
                continue;
            };
            let mut current = first.clone();
            for (i, next) in rest.iter().enumerate() {
                let next = if i + 1 == rest.len() {
                    format!("{next}</w>")
                } else {
                    next.clone()
                };
                let merge = (current.clone(), next.clone());
                if seen.insert(merge.clone()) {
                    merges.push(merge);
                }
                current.push_str(&next);
            }
        }
        Self::from_merges(merges).map_err(TokenizerError)
    }

    fn new(encoder: HashMap<String, u32>, merges: Vec<(String, String)>) -> Result<Self, String> {
        let special = |t: &str| encoder.get(t).copied().ok_or_else(|| format!("vocabulary has no {t}"));
        let (start, end) = (special(START_OF_TEXT)?, special(END_OF_TEXT)?);
        let ranks = merges.into_iter().enumerate().map(|(i, m)| (m, i as u32)).collect();
        Ok(ClipTokenizer {
            encoder,
            ranks,
            byte_chars: byte_chars(),
            pattern: Regex::new(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")
                .expect("CLIP's pattern is a valid regex"),
            whitespace: Regex::new(r"\s+").expect("valid regex"),
            start,
            end,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Writes `vocab.json` + `merges.txt` (Hugging Face's tokenizer files) into `dir`, e.g. to
    /// turn OpenAI's merge list into a checkpoint folder's tokenizer.
    pub fn save_hf(&self, dir: &Path) -> Result<(), TokenizerError> {
        let err = |p: &Path, e: &dyn std::fmt::Display| TokenizerError(format!("{}: {e}", p.display()));
        let mut vocab: Vec<(&String, &u32)> = self.encoder.iter().collect();
        vocab.sort_by_key(|(_, id)| **id);
        let vocab: serde_json::Map<String, serde_json::Value> =
            vocab.into_iter().map(|(t, id)| (t.clone(), (*id).into())).collect();
        let path = dir.join("vocab.json");
        let json = serde_json::to_vec(&vocab).map_err(|e| err(&path, &e))?;
        std::fs::write(&path, json).map_err(|e| err(&path, &e))?;
        let mut merges: Vec<(&(String, String), &u32)> = self.ranks.iter().collect();
        merges.sort_by_key(|(_, rank)| **rank);
        let mut text = String::from("#version: 0.2\n");
        for ((a, b), _) in merges {
            text.push_str(&format!("{a} {b}\n"));
        }
        let path = dir.join("merges.txt");
        std::fs::write(&path, text).map_err(|e| err(&path, &e))
    }

    pub fn vocab_size(&self) -> usize {
        self.encoder.len()
    }

    pub fn start_id(&self) -> u32 {
        self.start
    }

    pub fn end_id(&self) -> u32 {
        self.end
    }

    /// `<|startoftext|>` + tokens + `<|endoftext|>`, at most [`CONTEXT`] ids (the text is cut,
    /// the end token kept).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let normalized: String = text.nfc().collect::<String>();
        let normalized = self.whitespace.replace_all(&normalized, " ");
        let normalized: String = normalized.chars().flat_map(char::to_lowercase).collect();
        let mut ids = vec![self.start];
        let mut rest = normalized.as_str();
        while !rest.is_empty() {
            let next_special = [(START_OF_TEXT, self.start), (END_OF_TEXT, self.end)]
                .into_iter()
                .filter_map(|(t, id)| rest.find(t).map(|at| (at, t.len(), id)))
                .min();
            let (plain, special) = match next_special {
                Some((at, len, id)) => (&rest[..at], Some((len, id, at))),
                None => (rest, None),
            };
            for piece in self.pattern.find_iter(plain) {
                ids.extend(self.bpe(piece.as_str()));
            }
            match special {
                Some((len, id, at)) => {
                    ids.push(id);
                    rest = &rest[at + len..];
                }
                None => rest = "",
            }
        }
        ids.truncate(CONTEXT - 1);
        ids.push(self.end);
        ids
    }

    /// [`Self::encode`] padded with `pad` to exactly [`CONTEXT`] ids, and the unpadded length.
    pub fn encode_padded(&self, text: &str, pad: u32) -> (Vec<u32>, usize) {
        let mut ids = self.encode(text);
        let len = ids.len();
        ids.resize(CONTEXT, pad);
        (ids, len)
    }

    fn bpe(&self, piece: &str) -> Vec<u32> {
        if let Some(ids) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(piece) {
            return ids.clone();
        }
        let mut symbols: Vec<String> = piece.bytes().map(|b| self.byte_chars[b as usize].to_string()).collect();
        if let Some(last) = symbols.last_mut() {
            last.push_str("</w>");
        }
        while symbols.len() > 1 {
            let best = symbols
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| self.ranks.get(&(w[0].clone(), w[1].clone())).map(|&r| (r, i)))
                .min();
            let Some((_, i)) = best else { break };
            // Merge every occurrence of the best pair, left to right, as the reference does.
            let (a, b) = (symbols[i].clone(), symbols[i + 1].clone());
            let mut merged = Vec::with_capacity(symbols.len());
            let mut k = 0;
            while k < symbols.len() {
                if k + 1 < symbols.len() && symbols[k] == a && symbols[k + 1] == b {
                    merged.push(format!("{a}{b}"));
                    k += 2;
                } else {
                    merged.push(std::mem::take(&mut symbols[k]));
                    k += 1;
                }
            }
            symbols = merged;
        }
        // Every byte symbol is in the vocabulary, so unknown symbols only come from a vocabulary
        // that lacks merges' results; they are skipped like the reference's missing tokens.
        let ids: Vec<u32> = symbols.iter().filter_map(|s| self.encoder.get(s).copied()).collect();
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(piece.to_string(), ids.clone());
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/clip")
    }

    fn tokenizer() -> ClipTokenizer {
        ClipTokenizer::from_openai_bpe(&fixtures().join("bpe_simple_vocab_16e6.txt.gz")).unwrap()
    }

    #[test]
    fn ids_match_the_reference_on_every_tricky_string() {
        let tok = tokenizer();
        assert_eq!(tok.vocab_size(), 49408);
        assert_eq!((tok.start_id(), tok.end_id()), (49406, 49407));
        let cases: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fixtures().join("tokenizer_cases.json")).unwrap()).unwrap();
        let strings = cases["strings"].as_array().unwrap();
        let ids = cases["ids"].as_array().unwrap();
        assert!(strings.len() >= 200);
        let mut wrong = Vec::new();
        for (s, want) in strings.iter().zip(ids) {
            let s = s.as_str().unwrap();
            let want: Vec<u32> = want
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let got = tok.encode(s);
            if got != want {
                wrong.push(format!("{s:?}: got {got:?}, reference {want:?}"));
            }
        }
        assert!(
            wrong.is_empty(),
            "{} of {} differ:\n{}",
            wrong.len(),
            strings.len(),
            wrong.join("\n")
        );
    }

    #[test]
    fn hugging_face_files_give_the_same_tokenizer_as_openais_merge_list() {
        let dir = std::env::temp_dir().join(format!("divergen-clip-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let openai = tokenizer();
        openai.save_hf(&dir).unwrap();
        let hf = ClipTokenizer::from_dir(&dir).unwrap();
        for s in ["a photo of a cat", "Ångström's 3 çafés!", "<|endoftext|> x"] {
            assert_eq!(hf.encode(s), openai.encode(s));
        }
        let (padded, len) = hf.encode_padded("a cat", 0);
        assert_eq!(
            (padded.len(), len, padded[len - 1], padded[len]),
            (CONTEXT, 4, 49407, 0)
        );
        std::fs::write(dir.join("merges.txt"), "#version: 0.2\nonly_one_symbol\n").unwrap();
        let err = ClipTokenizer::from_dir(&dir).err().unwrap().to_string();
        assert!(err.contains("merges.txt line 2"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
