//! Hostile bytes through everything a host or device does with received data: frame splitting,
//! COBS + CRC + postcard decoding of both message directions, validation, and the mask helpers
//! that run on validated samples. The input is used twice: as a raw byte stream, and as a frame
//! body given a correct CRC, so the fuzzer reaches the deserialiser instead of stopping at the
//! checksum.
#![no_main]

use divergen_protocol::{DeviceMessage, FrameDecoder, HostMessage, decode_message};
use libfuzzer_sys::fuzz_target;

fn exercise(frame: &[u8]) {
    if let Ok(message) = decode_message::<DeviceMessage>(frame) {
        match message {
            DeviceMessage::Sample(sample) => {
                if sample.validate(None).is_ok() {
                    for instance in &sample.instances {
                        let mask = instance.mask.to_row_major();
                        assert_eq!(mask.iter().filter(|&&b| b != 0).count() as u64, instance.mask.area());
                        let _ = instance.mask.bbox();
                    }
                }
            }
            DeviceMessage::Categories(table) => {
                if table.validate().is_ok() {
                    let _ = table.fingerprint();
                }
            }
            DeviceMessage::Hello(hello) => {
                let _ = hello.validate();
            }
            DeviceMessage::Heartbeat => {}
        }
    }
    if let Ok(HostMessage::Refused(refusal)) = decode_message::<HostMessage>(frame) {
        let _ = refusal.to_string();
    }
}

fuzz_target!(|data: &[u8]| {
    let mut decoder = FrameDecoder::with_limit(1 << 16);
    decoder.feed(data, |frame| {
        if let Ok(frame) = frame {
            exercise(frame);
        }
    });
    let mut body = data.to_vec();
    body.extend_from_slice(&divergen_protocol::crc32(data).to_le_bytes());
    let mut framed = cobs::encode_vec(&body);
    framed.retain(|&b| b != 0);
    exercise(&framed);
});
