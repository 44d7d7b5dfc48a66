//! Frames: `COBS(postcard(message) ++ crc32_le(postcard(message))) ++ [0]`.
//!
//! COBS removes every zero byte from the body, so a zero always ends a frame and a receiver
//! that lost bytes (a cut link, a truncated frame) re-synchronises at the next zero. The CRC
//! catches bit flips that COBS alone would turn into a different, well-formed message.

use alloc::vec::Vec;
use core::fmt;
use serde::{Serialize, de::DeserializeOwned};

use crate::limits::MAX_FRAME_BYTES;

/// CRC-32 (ISO-HDLC, zlib's), as frames, the device outbox and the host journal use it.
/// crc32fast picks a SIMD implementation where the CPU has one (many GB/s on x86-64 and
/// aarch64) and a table otherwise, and builds without std.
pub fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// More than [`MAX_FRAME_BYTES`] arrived without a delimiter; they were discarded.
    TooLong,
    Cobs,
    TooShort,
    Crc {
        expected: u32,
        found: u32,
    },
    /// The CRC matched but the bytes are not a message of this protocol version.
    Deserialize,
    TrailingBytes,
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooLong => write!(f, "frame longer than {MAX_FRAME_BYTES} bytes"),
            FrameError::Cobs => write!(f, "frame is not valid COBS"),
            FrameError::TooShort => write!(f, "frame too short to hold a CRC"),
            FrameError::Crc { expected, found } => {
                write!(
                    f,
                    "frame CRC mismatch (frame says {expected:08x}, bytes give {found:08x})"
                )
            }
            FrameError::Deserialize => write!(f, "frame passed its CRC but is not a valid message"),
            FrameError::TrailingBytes => write!(f, "frame has bytes after its message"),
        }
    }
}

/// Serialises and frames `message`, delimiter included.
pub fn encode_message<T: Serialize>(message: &T) -> Vec<u8> {
    let mut body = postcard::to_allocvec(message).expect("serialising to a Vec cannot fail");
    let crc = crc32(&body);
    body.extend_from_slice(&crc.to_le_bytes());
    let mut framed = alloc::vec![0u8; cobs::max_encoding_length(body.len()) + 1];
    let n = cobs::encode(&body, &mut framed);
    framed.truncate(n + 1);
    framed[n] = 0;
    framed
}

/// Decodes one frame as yielded by [`FrameDecoder`] (without its delimiter).
pub fn decode_message<T: DeserializeOwned>(frame: &[u8]) -> Result<T, FrameError> {
    if frame.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLong);
    }
    let mut body = frame.to_vec();
    let n = cobs::decode_in_place(&mut body).map_err(|_| FrameError::Cobs)?;
    if n < 4 {
        return Err(FrameError::TooShort);
    }
    let (payload, crc_bytes) = body[..n].split_at(n - 4);
    let expected = u32::from_le_bytes([crc_bytes[0], crc_bytes[1], crc_bytes[2], crc_bytes[3]]);
    let found = crc32(payload);
    if expected != found {
        return Err(FrameError::Crc { expected, found });
    }
    // Every length prefix inside is bounded by the payload (postcard reads from the slice and
    // serde pre-allocates at most 1 MiB on a length hint), so a decode allocates O(frame size).
    let (message, rest) = postcard::take_from_bytes(payload).map_err(|_| FrameError::Deserialize)?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes);
    }
    Ok(message)
}

/// Splits a byte stream into frames at zero bytes, holding at most [`MAX_FRAME_BYTES`] (or the
/// smaller limit given) of an unfinished frame.
#[derive(Debug)]
pub struct FrameDecoder {
    partial: Vec<u8>,
    limit: usize,
    discarding: bool,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::with_limit(MAX_FRAME_BYTES)
    }
}

impl FrameDecoder {
    pub fn with_limit(limit: usize) -> Self {
        FrameDecoder {
            partial: Vec::new(),
            limit: limit.min(MAX_FRAME_BYTES),
            discarding: false,
        }
    }

    /// Feeds received bytes; calls `on_frame` with each complete frame body (delimiter stripped;
    /// empty frames from repeated delimiters are skipped) or with [`FrameError::TooLong`].
    pub fn feed(&mut self, mut input: &[u8], mut on_frame: impl FnMut(Result<&[u8], FrameError>)) {
        while !input.is_empty() {
            match input.iter().position(|&b| b == 0) {
                Some(end) => {
                    let chunk = &input[..end];
                    input = &input[end + 1..];
                    if self.discarding {
                        self.discarding = false;
                        self.partial.clear();
                        continue;
                    }
                    if self.partial.is_empty() {
                        if chunk.len() > self.limit {
                            on_frame(Err(FrameError::TooLong));
                        } else if !chunk.is_empty() {
                            on_frame(Ok(chunk));
                        }
                    } else if self.partial.len() + chunk.len() > self.limit {
                        self.partial.clear();
                        on_frame(Err(FrameError::TooLong));
                    } else {
                        self.partial.extend_from_slice(chunk);
                        on_frame(Ok(&self.partial));
                        self.partial.clear();
                    }
                }
                None => {
                    if !self.discarding {
                        if self.partial.len() + input.len() > self.limit {
                            self.partial = Vec::new();
                            self.discarding = true;
                            on_frame(Err(FrameError::TooLong));
                        } else {
                            self.partial.extend_from_slice(input);
                        }
                    }
                    input = &[];
                }
            }
        }
    }

    /// Bytes of an unfinished frame held right now.
    pub fn pending(&self) -> usize {
        self.partial.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;
    use alloc::string::ToString;
    use alloc::vec;

    fn sample(seq: u64) -> DeviceMessage {
        DeviceMessage::Sample(Sample {
            provenance: Provenance {
                device_id: "dev-1".into(),
                run_id: "run.7".into(),
                seed: 42,
                seq,
            },
            width: 2,
            height: 1,
            image: ImageData::Rgb8(vec![0, 1, 2, 0, 0, 255]),
            instances: vec![Instance {
                category_id: 3,
                bbox: [1.0, 0.0, 1.0, 1.0],
                mask: Rle::from_row_major(1, 2, &[0, 1]),
                origin: Origin::Generated {
                    generator_id: 1,
                    prompt_id: 9,
                    clip_score: 0.71,
                    sam_iou: 0.93,
                },
            }],
            neg_category_ids: vec![5],
            not_exhaustive_category_ids: vec![],
        })
    }

    fn frames_of(bytes: &[u8], decoder: &mut FrameDecoder) -> Vec<Result<Vec<u8>, FrameError>> {
        let mut out = Vec::new();
        decoder.feed(bytes, |f| out.push(f.map(|b| b.to_vec())));
        out
    }

    #[test]
    fn messages_round_trip_through_frames_fed_byte_by_byte() {
        let messages = [sample(0), sample(1), DeviceMessage::Heartbeat];
        let stream: Vec<u8> = messages.iter().flat_map(encode_message).collect();
        assert_eq!(
            stream.iter().filter(|&&b| b == 0).count(),
            3,
            "only delimiters are zero"
        );
        let mut decoder = FrameDecoder::default();
        let mut got = Vec::new();
        for b in &stream {
            for frame in frames_of(core::slice::from_ref(b), &mut decoder) {
                got.push(decode_message::<DeviceMessage>(&frame.unwrap()).unwrap());
            }
        }
        assert_eq!(got, messages);
    }

    #[test]
    fn every_single_bit_flip_is_caught() {
        let framed = encode_message(&sample(5));
        let body = &framed[..framed.len() - 1];
        for bit in 0..body.len() * 8 {
            let mut corrupt = body.to_vec();
            corrupt[bit / 8] ^= 1 << (bit % 8);
            // A flip that makes a zero splits the frame: each part must fail on its own.
            for part in corrupt.split(|&b| b == 0).filter(|p| !p.is_empty()) {
                assert!(
                    decode_message::<DeviceMessage>(part).is_err(),
                    "bit {bit} went undetected"
                );
            }
        }
    }

    #[test]
    fn truncated_frame_is_rejected_and_the_next_one_still_decodes() {
        let a = encode_message(&sample(1));
        let b = encode_message(&sample(2));
        let mut stream = a[..a.len() / 2].to_vec();
        stream.push(0); // the link dropped the rest of `a`; a delimiter arrives
        stream.extend_from_slice(&b);
        let mut decoder = FrameDecoder::default();
        let frames = frames_of(&stream, &mut decoder);
        assert_eq!(frames.len(), 2);
        assert!(decode_message::<DeviceMessage>(frames[0].as_ref().unwrap()).is_err());
        assert_eq!(
            decode_message::<DeviceMessage>(frames[1].as_ref().unwrap()).unwrap(),
            sample(2)
        );
    }

    #[test]
    fn oversized_frame_is_discarded_without_buffering_it() {
        let mut decoder = FrameDecoder::with_limit(16);
        let mut errors = 0;
        decoder.feed(&[7u8; 10], |_| panic!("no frame yet"));
        decoder.feed(&[7u8; 10], |f| {
            assert_eq!(f.unwrap_err(), FrameError::TooLong);
            errors += 1;
        });
        assert_eq!(decoder.pending(), 0);
        decoder.feed(&[7u8; 100], |_| panic!("still discarding"));
        let good = encode_message(&DeviceMessage::Heartbeat);
        let mut frames = Vec::new();
        decoder.feed(&[0], |f| frames.push(f.is_ok()));
        decoder.feed(&good, |f| {
            frames.push(decode_message::<DeviceMessage>(f.unwrap()).is_ok())
        });
        assert_eq!((errors, frames), (1, vec![true]));
    }

    #[test]
    fn validation_names_the_problem() {
        let DeviceMessage::Sample(mut s) = sample(0) else {
            unreachable!()
        };
        let table = CategoryTable {
            categories: vec![
                Category {
                    id: 3,
                    name: "cat".into(),
                    synset: "cat.n.01".into(),
                    def: "".into(),
                    frequency: Frequency::Rare,
                },
                Category {
                    id: 5,
                    name: "dog".into(),
                    synset: "dog.n.01".into(),
                    def: "".into(),
                    frequency: Frequency::Common,
                },
            ],
        };
        s.validate(Some(&table)).unwrap();
        s.instances[0].category_id = 4;
        assert!(s.validate(Some(&table)).unwrap_err().contains("unknown category id 4"));
        s.instances[0].category_id = 3;
        s.instances[0].mask.counts = vec![1];
        assert!(s.validate(None).unwrap_err().contains("instance 0"));
        s.instances.clear();
        s.provenance.device_id = "../etc".to_string();
        assert!(s.validate(None).unwrap_err().contains("device id"));
        assert_ne!(table.fingerprint(), CategoryTable::default().fingerprint());
    }
}
