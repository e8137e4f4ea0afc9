//! An independent reader of TensorBoard event files: TFRecord framing with masked CRC-32C
//! checks, and just enough protobuf decoding for `Event { wall_time, step, summary }` and
//! `Summary.Value { tag, simple_value }`.

use std::collections::BTreeMap;
use std::path::Path;

/// TFRecord's CRC mask (tensorflow/core/lib/hash/crc32c.h).
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn read_u32(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes.try_into().unwrap())
}

/// The payloads of a TFRecord file, each CRC-checked.
fn records(bytes: &[u8]) -> Vec<&[u8]> {
    let mut records = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let header = &bytes[at..at + 8];
        let length = u64::from_le_bytes(header.try_into().unwrap()) as usize;
        assert_eq!(
            read_u32(&bytes[at + 8..at + 12]),
            masked_crc(header),
            "length CRC"
        );
        let data = &bytes[at + 12..at + 12 + length];
        let data_crc = read_u32(&bytes[at + 12 + length..at + 16 + length]);
        assert_eq!(data_crc, masked_crc(data), "data CRC");
        records.push(data);
        at += 16 + length;
    }
    records
}

fn varint(bytes: &[u8], at: &mut usize) -> u64 {
    let mut value = 0u64;
    let mut shift = 0;
    loop {
        let byte = bytes[*at];
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return value;
        }
        shift += 7;
    }
}

enum Field<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(&'a [u8]),
    Fixed32([u8; 4]),
}

fn fields(bytes: &[u8]) -> Vec<(u64, Field<'_>)> {
    let mut fields = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let key = varint(bytes, &mut at);
        let field = match key & 7 {
            0 => Field::Varint(varint(bytes, &mut at)),
            1 => {
                at += 8;
                Field::Fixed64(bytes[at - 8..at].try_into().unwrap())
            }
            2 => {
                let length = varint(bytes, &mut at) as usize;
                at += length;
                Field::Bytes(&bytes[at - length..at])
            }
            5 => {
                at += 4;
                Field::Fixed32(bytes[at - 4..at].try_into().unwrap())
            }
            wire => panic!("unexpected wire type {wire}"),
        };
        fields.push((key >> 3, field));
    }
    fields
}

/// Scalars by tag, in file order, as `(step, value)`.
pub fn scalars(dir: &Path) -> BTreeMap<String, Vec<(i64, f32)>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    let mut scalars: BTreeMap<String, Vec<(i64, f32)>> = BTreeMap::new();
    let mut saw_version = false;
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        for record in records(&bytes) {
            let mut step = 0;
            for (number, field) in fields(record) {
                match (number, field) {
                    (1, Field::Fixed64(raw)) => {
                        let wall_time = f64::from_le_bytes(raw);
                        assert!(wall_time > 1.5e9, "wall_time {wall_time}");
                    }
                    (2, Field::Varint(value)) => step = value as i64,
                    (3, Field::Bytes(version)) => {
                        assert_eq!(version, b"brain.Event:2");
                        saw_version = true;
                    }
                    (5, Field::Bytes(summary)) => {
                        for (_, value) in fields(summary) {
                            let Field::Bytes(value) = value else { continue };
                            let mut tag = String::new();
                            let mut simple = None;
                            for (number, field) in fields(value) {
                                match (number, field) {
                                    (1, Field::Bytes(text)) => {
                                        tag = String::from_utf8(text.to_vec()).unwrap()
                                    }
                                    (2, Field::Fixed32(raw)) => {
                                        simple = Some(f32::from_le_bytes(raw))
                                    }
                                    _ => {}
                                }
                            }
                            scalars
                                .entry(tag)
                                .or_default()
                                .push((step, simple.expect("a simple_value")));
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    assert!(saw_version, "no file_version event in {}", dir.display());
    scalars
}
