//! The sample stream between a divergen device and `divergen-host`.
//!
//! Everything on the wire is a [`DeviceMessage`] or a [`HostMessage`], serialised with postcard,
//! followed by a CRC-32 of those bytes, COBS-encoded and terminated by a zero byte
//! ([`frame`]). A connection starts with [`Hello`]; the host answers [`HostMessage::Welcome`]
//! with the first sequence number it does not have yet, so a device resumes exactly there after
//! a reconnect or a restart. Acknowledgements are cumulative.
//!
//! The crate is `no_std` + `alloc` so a microcontroller-class device can speak it; the clock
//! and the byte transport are the caller's (see [`timing`]).

#![no_std]
extern crate alloc;

pub mod frame;
pub mod rle;
pub mod timing;

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use serde::{Deserialize, Serialize};
use sha2::Digest;

pub use frame::{FrameDecoder, FrameError, crc32, decode_message, encode_message};
pub use rle::Rle;

/// Bumped on any change to the messages below; peers with another version are refused.
pub const PROTOCOL_VERSION: u16 = 1;

/// Bounds on every field, so a hostile or corrupt peer cannot make the decoder allocate without
/// limit. A frame larger than [`limits::MAX_FRAME_BYTES`] is discarded before it is decoded.
pub mod limits {
    /// A 4096x4096 raw RGB8 image plus annotations fits.
    pub const MAX_FRAME_BYTES: usize = 64 << 20;
    pub const MAX_IMAGE_SIDE: u32 = 4096;
    pub const MAX_INSTANCES: usize = 2048;
    pub const MAX_ID_LEN: usize = 64;
    pub const MAX_TEXT_LEN: usize = 1024;
    pub const MAX_CATEGORIES: usize = 65_536;
    pub const MAX_CATEGORY_ID_LIST: usize = 4096;
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum DeviceMessage {
    Hello(Hello),
    /// Sent only when the host answers [`HostMessage::NeedCategories`].
    Categories(CategoryTable),
    Sample(Sample),
    Heartbeat,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum HostMessage {
    /// The session is accepted; `next_seq` is the first sequence number the host does not have.
    Welcome {
        next_seq: u64,
    },
    /// The host has no category table pinned yet; send it.
    NeedCategories,
    /// Every sample with a sequence number below `next_seq` is durably stored.
    Ack {
        next_seq: u64,
    },
    /// A frame was lost or arrived out of order; send again from `from`.
    Resend {
        from: u64,
    },
    Refused(Refusal),
    Heartbeat,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u16,
    pub device_id: String,
    pub run_id: String,
    /// [`CategoryTable::fingerprint`] of the table the device's category ids refer to.
    pub category_table: [u8; 32],
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Refusal {
    ProtocolVersion {
        host: u16,
        device: u16,
    },
    CategoryTable {
        host: [u8; 32],
        device: [u8; 32],
    },
    /// A message that decoded but broke the protocol (bad ids, a sample that fails validation…).
    Invalid {
        seq: Option<u64>,
        problem: String,
    },
    ShuttingDown,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::ProtocolVersion { host, device } => {
                write!(
                    f,
                    "protocol version mismatch: host speaks {host}, device speaks {device}"
                )
            }
            Refusal::CategoryTable { host, device } => write!(
                f,
                "category table mismatch: host has {}, device has {} (the host's output folder was made for another table)",
                Hex(&host[..8]),
                Hex(&device[..8])
            ),
            Refusal::Invalid {
                seq: Some(seq),
                problem,
            } => write!(f, "sample {seq} refused: {problem}"),
            Refusal::Invalid { seq: None, problem } => write!(f, "message refused: {problem}"),
            Refusal::ShuttingDown => write!(f, "host is shutting down"),
        }
    }
}

pub struct Hex<'a>(pub &'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frequency {
    // LVIS's codes, so an LVIS annotation file's `categories` reads as a table.
    #[serde(rename = "f")]
    Frequent,
    #[serde(rename = "c")]
    Common,
    #[serde(rename = "r")]
    Rare,
}

impl Frequency {
    /// LVIS's one-letter code.
    pub fn code(self) -> &'static str {
        match self {
            Frequency::Frequent => "f",
            Frequency::Common => "c",
            Frequency::Rare => "r",
        }
    }

    /// The frequency of an LVIS code (`f`, `c`, `r`); `None` for anything else.
    pub fn from_code(code: &str) -> Option<Self> {
        match code {
            "f" => Some(Frequency::Frequent),
            "c" => Some(Frequency::Common),
            "r" => Some(Frequency::Rare),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Category {
    pub id: u32,
    pub name: String,
    pub synset: String,
    pub def: String,
    pub frequency: Frequency,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CategoryTable {
    pub categories: Vec<Category>,
}

impl CategoryTable {
    /// SHA-256 of the table's postcard encoding: two peers agree on ids, names and frequencies
    /// exactly when the fingerprints match.
    pub fn fingerprint(&self) -> [u8; 32] {
        let bytes = postcard::to_allocvec(self).expect("serialising to a Vec cannot fail");
        sha2::Sha256::digest(&bytes).into()
    }

    pub fn get(&self, id: u32) -> Option<&Category> {
        self.categories.iter().find(|c| c.id == id)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.categories.is_empty() || self.categories.len() > limits::MAX_CATEGORIES {
            return Err(alloc::format!(
                "category table must hold 1..={} categories, has {}",
                limits::MAX_CATEGORIES,
                self.categories.len()
            ));
        }
        let mut ids: Vec<u32> = self.categories.iter().map(|c| c.id).collect();
        ids.sort_unstable();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(alloc::format!("category id {} appears twice", w[0]));
        }
        for c in &self.categories {
            if c.id == 0 {
                return Err(alloc::format!("category '{}' has id 0; COCO ids start at 1", c.name));
            }
            check_text("category name", &c.name)?;
            check_text("category synset", &c.synset)?;
            check_text("category def", &c.def)?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub device_id: String,
    pub run_id: String,
    pub seed: u64,
    /// Assigned by the device's outbox; consecutive from 0 within one (device, run).
    pub seq: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ImageData {
    Png(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Row-major, 3 bytes a pixel, no padding.
    Rgb8(#[serde(with = "serde_bytes")] Vec<u8>),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Origin {
    /// An annotation of the real background image, kept after pasting.
    Real,
    Generated {
        generator_id: u16,
        prompt_id: u32,
        clip_score: f32,
        sam_iou: f32,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    pub category_id: u32,
    /// COCO `[x, y, w, h]` in pixels.
    pub bbox: [f32; 4],
    pub mask: Rle,
    pub origin: Origin,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub provenance: Provenance,
    pub width: u32,
    pub height: u32,
    pub image: ImageData,
    pub instances: Vec<Instance>,
    /// LVIS: categories verified absent from the image.
    pub neg_category_ids: Vec<u32>,
    /// LVIS: categories present but not exhaustively annotated.
    pub not_exhaustive_category_ids: Vec<u32>,
}

impl Sample {
    /// Everything that can be checked without decoding the PNG. Category ids are checked against
    /// the table the session agreed on.
    pub fn validate(&self, categories: Option<&CategoryTable>) -> Result<(), String> {
        check_id("device id", &self.provenance.device_id)?;
        check_id("run id", &self.provenance.run_id)?;
        let (w, h) = (self.width, self.height);
        if w == 0 || h == 0 || w > limits::MAX_IMAGE_SIDE || h > limits::MAX_IMAGE_SIDE {
            return Err(alloc::format!(
                "image size {w}x{h} is outside 1..={}",
                limits::MAX_IMAGE_SIDE
            ));
        }
        match &self.image {
            ImageData::Rgb8(bytes) if bytes.len() != w as usize * h as usize * 3 => {
                return Err(alloc::format!(
                    "raw RGB8 image has {} bytes, {w}x{h} needs {}",
                    bytes.len(),
                    w * h * 3
                ));
            }
            ImageData::Png(bytes) => {
                // Signature, then the IHDR chunk: length 13, "IHDR", width and height big-endian.
                if bytes.len() < 24 || bytes[..8] != *b"\x89PNG\r\n\x1a\n" || bytes[12..16] != *b"IHDR" {
                    return Err(String::from("image is marked PNG but has no PNG signature and header"));
                }
                let png_w = u32::from_be_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
                let png_h = u32::from_be_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]);
                if (png_w, png_h) != (w, h) {
                    return Err(alloc::format!("PNG is {png_w}x{png_h}, the sample says {w}x{h}"));
                }
            }
            _ => {}
        }
        if self.instances.len() > limits::MAX_INSTANCES {
            return Err(alloc::format!(
                "{} instances, at most {}",
                self.instances.len(),
                limits::MAX_INSTANCES
            ));
        }
        for list in [&self.neg_category_ids, &self.not_exhaustive_category_ids] {
            if list.len() > limits::MAX_CATEGORY_ID_LIST {
                return Err(alloc::format!("category id list of {} entries", list.len()));
            }
            if let Some(table) = categories
                && let Some(id) = list.iter().find(|&&id| table.get(id).is_none())
            {
                return Err(alloc::format!("LVIS image field names unknown category id {id}"));
            }
        }
        for (i, inst) in self.instances.iter().enumerate() {
            let at = |problem: &str| alloc::format!("instance {i}: {problem}");
            if let Some(table) = categories
                && table.get(inst.category_id).is_none()
            {
                return Err(at(&alloc::format!("unknown category id {}", inst.category_id)));
            }
            if inst.mask.height != h || inst.mask.width != w {
                return Err(at(&alloc::format!(
                    "mask size {}x{} differs from image {w}x{h}",
                    inst.mask.width,
                    inst.mask.height
                )));
            }
            inst.mask.check().map_err(at)?;
            if inst.bbox.iter().any(|v| !v.is_finite() || *v < 0.0) {
                return Err(at("bbox has a negative or non-finite value"));
            }
            if let Origin::Generated {
                clip_score, sam_iou, ..
            } = inst.origin
                && !(clip_score.is_finite() && sam_iou.is_finite())
            {
                return Err(at("clip_score or sam_iou is not finite"));
            }
        }
        Ok(())
    }
}

impl Hello {
    pub fn validate(&self) -> Result<(), String> {
        check_id("device id", &self.device_id)?;
        check_id("run id", &self.run_id)
    }
}

/// Ids become file names on the host, so they are restricted to a portable set.
pub fn check_id(what: &str, id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= limits::MAX_ID_LEN
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(alloc::format!(
            "{what} {id:?} must be 1..={} characters of A-Z a-z 0-9 - _ . and not start with '.'",
            limits::MAX_ID_LEN
        ))
    }
}

fn check_text(what: &str, text: &str) -> Result<(), String> {
    if text.len() > limits::MAX_TEXT_LEN {
        return Err(alloc::format!(
            "{what} is {} bytes long, at most {}",
            text.len(),
            limits::MAX_TEXT_LEN
        ));
    }
    Ok(())
}
