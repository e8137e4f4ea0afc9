//! IEEE half precision, the storage type of GPTQ scales and of ggml block scales.

/// f32 to IEEE half precision, rounding to nearest even, overflow to infinity.
pub fn f32_to_f16(value: f32) -> u16 {
    let bits = value.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exponent = ((bits >> 23) & 0xff) as i32;
    let mantissa = bits & 0x7f_ffff;
    if exponent == 0xff {
        let nan = if mantissa != 0 { 0x200 } else { 0 };
        return sign | 0x7c00 | nan;
    }
    let half_exponent = exponent - 127 + 15;
    if half_exponent >= 0x1f {
        return sign | 0x7c00;
    }
    if half_exponent <= 0 {
        if half_exponent < -10 {
            return sign;
        }
        // Subnormal half: shift the mantissa (with its implicit bit) into place, rounding.
        let full = mantissa | 0x80_0000;
        let shift = (14 - half_exponent) as u32;
        let half_mantissa = full >> shift;
        let remainder = full & ((1 << shift) - 1);
        let halfway = 1 << (shift - 1);
        let round_up = remainder > halfway || (remainder == halfway && half_mantissa & 1 == 1);
        return sign | (half_mantissa + u32::from(round_up)) as u16;
    }
    let half_mantissa = mantissa >> 13;
    let remainder = mantissa & 0x1fff;
    let round_up = remainder > 0x1000 || (remainder == 0x1000 && half_mantissa & 1 == 1);
    // A carry out of the mantissa correctly bumps the exponent.
    let rounded = ((half_exponent as u32) << 10 | half_mantissa) + u32::from(round_up);
    sign | rounded as u16
}

/// IEEE half precision to f32, subnormals and infinities included.
pub fn f16_to_f32(bits: u16) -> f32 {
    let sign = u32::from(bits >> 15) << 31;
    let exponent = u32::from((bits >> 10) & 0x1f);
    let mantissa = u32::from(bits & 0x3ff);
    match (exponent, mantissa) {
        (0, 0) => f32::from_bits(sign),
        (0, _) => {
            let value = mantissa as f32 * 2f32.powi(-24);
            if sign == 0 { value } else { -value }
        }
        (0x1f, 0) => f32::from_bits(sign | 0xff << 23),
        (0x1f, _) => f32::from_bits(sign | 0xff << 23 | mantissa << 13),
        _ => f32::from_bits(sign | (exponent + 127 - 15) << 23 | mantissa << 13),
    }
}

/// `value` rounded to the nearest half-precision number, as an f32.
pub fn round_to_f16(value: f32) -> f32 {
    f16_to_f32(f32_to_f16(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_conversions_round_to_nearest_even() {
        for (value, bits) in [
            (1.0f32, 0x3c00u16),
            (-2.0, 0xc000),
            (65504.0, 0x7bff),
            (0.333_251_95, 0x3555),
            (2f32.powi(-24), 0x0001),
            (0.0, 0x0000),
        ] {
            assert_eq!(f32_to_f16(value), bits, "{value}");
            assert_eq!(f16_to_f32(bits), value);
        }
        assert_eq!(f32_to_f16(1e6), 0x7c00, "overflow is infinity");
        // 1 + 2^-11 lies halfway between 1 and the next half: ties go to the even mantissa.
        assert_eq!(f32_to_f16(1.0 + 2f32.powi(-11)), 0x3c00);
        assert_eq!(f32_to_f16(1.0 + 3.0 * 2f32.powi(-11)), 0x3c02);
        for bits in (0u16..0x7c00).step_by(7) {
            assert_eq!(
                f32_to_f16(f16_to_f32(bits)),
                bits,
                "round trip of {bits:#x}"
            );
        }
    }
}
