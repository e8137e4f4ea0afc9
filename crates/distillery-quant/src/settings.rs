//! Which settings a matrix can be quantized with and stored at: the one check that configs,
//! quantization and the GPTQ file layout all apply.

/// Bit widths of the codes packed matrices and GPTQ files hold.
pub const SUPPORTED_BITS: [u32; 4] = [2, 3, 4, 8];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error("{0} bits are not supported (2, 3, 4 or 8)")]
    UnsupportedBits(u32),
    #[error("a group of 0 columns is no group; use one group per row instead")]
    EmptyGroup,
    #[error("group_size = {size} is wider than the {inputs} input columns")]
    GroupWiderThanInputs { size: usize, inputs: usize },
    #[error(
        "{inputs} inputs x {outputs} outputs at {bits} bits do not fill whole 32-bit words \
         (GPTQ storage needs both to be multiples of {})",
        word_multiple(*bits)
    )]
    NotWholeWords {
        inputs: usize,
        outputs: usize,
        bits: u32,
    },
}

pub fn check_bits(bits: u32) -> Result<(), SettingsError> {
    if SUPPORTED_BITS.contains(&bits) {
        Ok(())
    } else {
        Err(SettingsError::UnsupportedBits(bits))
    }
}

/// Groups of `group_size` consecutive input columns (one per row when `None`); like
/// AutoGPTQ's, the last may be shorter when the size does not divide the width.
pub fn check_group_size(group_size: Option<usize>, inputs: usize) -> Result<(), SettingsError> {
    match group_size {
        Some(0) => Err(SettingsError::EmptyGroup),
        Some(size) if size > inputs => Err(SettingsError::GroupWiderThanInputs { size, inputs }),
        _ => Ok(()),
    }
}

/// GPTQ files pack whole 32-bit words of codes along a matrix's inputs and of zeros along its
/// outputs.
pub fn check_whole_words(bits: u32, inputs: usize, outputs: usize) -> Result<(), SettingsError> {
    let word = word_multiple(bits);
    if inputs.is_multiple_of(word) && outputs.is_multiple_of(word) {
        Ok(())
    } else {
        Err(SettingsError::NotWholeWords {
            inputs,
            outputs,
            bits,
        })
    }
}

/// Whether an `inputs x outputs` matrix can be quantized with `bits` and `group_size` and
/// stored in a GPTQ file.
pub fn check_storable(
    bits: u32,
    group_size: Option<usize>,
    inputs: usize,
    outputs: usize,
) -> Result<(), SettingsError> {
    check_bits(bits)?;
    check_group_size(group_size, inputs)?;
    check_whole_words(bits, inputs, outputs)
}

/// The widths whose codes of `bits` bits fill whole 32-bit words: multiples of
/// `32 / gcd(32, bits)`.
fn word_multiple(bits: u32) -> usize {
    32 >> bits.trailing_zeros().min(5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_words_need_multiples_of_32_over_the_common_power_of_two() {
        assert_eq!(
            [1, 2, 3, 4, 8, 16, 32, 6].map(word_multiple),
            [32, 16, 32, 8, 4, 2, 1, 16]
        );
        assert_eq!(check_whole_words(4, 8, 24), Ok(()));
        assert_eq!(
            check_whole_words(3, 32, 16),
            Err(SettingsError::NotWholeWords {
                inputs: 32,
                outputs: 16,
                bits: 3
            })
        );
    }

    #[test]
    fn storable_settings_check_bits_then_groups_then_words() {
        assert_eq!(
            check_storable(5, Some(0), 7, 7),
            Err(SettingsError::UnsupportedBits(5))
        );
        assert_eq!(
            check_storable(4, Some(0), 7, 7),
            Err(SettingsError::EmptyGroup)
        );
        assert_eq!(
            check_storable(4, Some(64), 32, 7),
            Err(SettingsError::GroupWiderThanInputs {
                size: 64,
                inputs: 32
            })
        );
        assert_eq!(
            check_storable(8, None, 36, 8),
            Ok(()),
            "8-bit codes fill words in fours"
        );
        assert!(check_storable(2, Some(32), 32, 8).is_err());
        assert_eq!(check_storable(2, Some(32), 32, 16), Ok(()));
    }
}
