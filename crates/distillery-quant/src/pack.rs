//! Packing n-bit codes into 32-bit words, as GPTQ checkpoints store them.
//!
//! Codes form one little-endian bit stream: code `k` occupies bits `bits * k ..
//! bits * (k + 1)` of the stream, word `w` holds stream bits `32 * w .. 32 * (w + 1)`. For 2,
//! 4 and 8 bits a word holds a whole number of codes; 3-bit codes straddle words, 32 codes in
//! every 3 words (AutoGPTQ's layout). `qweight` packs each output channel's codes along the
//! input dimension: `[in * bits / 32, out]`.

/// `codes` (each below `2^bits`) as a bit stream of 32-bit words.
pub fn pack_bits(codes: &[u32], bits: u32) -> Vec<u32> {
    let total_bits = codes.len() * bits as usize;
    let mut words = vec![0u32; total_bits.div_ceil(32)];
    for (index, &code) in codes.iter().enumerate() {
        debug_assert!(code < (1 << bits), "code {code} has more than {bits} bits");
        let start = index * bits as usize;
        let (word, offset) = (start / 32, start % 32);
        words[word] |= code << offset;
        if offset + bits as usize > 32 {
            words[word + 1] |= code >> (32 - offset);
        }
    }
    words
}

/// Code `index` of a bit stream of `bits`-bit codes held as little-endian bytes.
pub fn code_at(bytes: &[u8], bits: u32, index: usize) -> u32 {
    let start = index * bits as usize;
    let (byte, offset) = (start / 8, start % 8);
    // Codes of at most 8 bits span at most two bytes.
    let next = bytes.get(byte + 1).copied().unwrap_or(0);
    let window = u16::from_le_bytes([bytes[byte], next]);
    u32::from((window >> offset) & ((1u16 << bits) - 1))
}

/// The first `count` codes of a bit stream written by [`pack_bits`].
pub fn unpack_bits(words: &[u32], bits: u32, count: usize) -> Vec<u32> {
    let mask = (1u32 << bits) - 1;
    (0..count)
        .map(|index| {
            let start = index * bits as usize;
            let (word, offset) = (start / 32, start % 32);
            let mut code = words[word] >> offset;
            if offset + bits as usize > 32 {
                code |= words[word + 1] << (32 - offset);
            }
            code & mask
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_bit_codes_fill_words_from_the_low_nibble() {
        let codes: Vec<u32> = (0..8).collect();
        assert_eq!(pack_bits(&codes, 4), vec![0x7654_3210]);
        assert_eq!(pack_bits(&[0xF, 0x1], 4), vec![0x1F]);
    }

    #[test]
    fn three_bit_codes_straddle_words_as_autogptq_packs_them() {
        // 32 codes in 3 words: code 10 splits 2 + 1 bits over words 0 and 1, code 21 splits
        // 1 + 2 bits over words 1 and 2.
        let mut codes = vec![0u32; 32];
        codes[0] = 0b101;
        codes[10] = 0b111;
        codes[21] = 0b110;
        codes[31] = 0b011;
        let words = pack_bits(&codes, 3);
        assert_eq!(words.len(), 3);
        assert_eq!(words[0], 0b101 | (0b11 << 30));
        // Word 1: the high bit of code 10 at bit 0; code 21's low bit (0) at bit 31.
        assert_eq!(words[1], 0b1);
        assert_eq!(words[2], 0b11 | (0b011 << 29));
        assert_eq!(unpack_bits(&words, 3, 32), codes);
    }

    #[test]
    fn every_width_round_trips() {
        for bits in [2u32, 3, 4, 8] {
            let codes: Vec<u32> = (0..96).map(|i| (i * 7 + 3) % (1 << bits)).collect();
            assert_eq!(
                unpack_bits(&pack_bits(&codes, bits), bits, codes.len()),
                codes
            );
        }
    }
}
