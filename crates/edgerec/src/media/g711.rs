//! G.711 µ-law (payload type 0, PCMU) and A-law (payload type 8, PCMA), to and from 16-bit
//! linear PCM (ITU-T G.711, the segment-and-bias formulation). Pure functions.

const BIAS: i32 = 0x84;
const CLIP: i32 = 32635;

/// Encodes one 16-bit sample as µ-law.
pub fn linear_to_ulaw(sample: i16) -> u8 {
    let mut s = i32::from(sample);
    let sign = if s < 0 {
        s = -s;
        0x80
    } else {
        0
    };
    s = s.min(CLIP) + BIAS;
    let exponent = (7 - (s.leading_zeros() as i32 - 17)).clamp(0, 7);
    let mantissa = (s >> (exponent + 3)) & 0x0f;
    !(sign | (exponent << 4) as u8 | mantissa as u8)
}

/// Decodes one µ-law byte (a table lookup).
pub fn ulaw_to_linear(byte: u8) -> i16 {
    ULAW[usize::from(byte)]
}

/// Every µ-law byte decoded, made at compile time.
static ULAW: [i16; 256] = {
    let mut t = [0i16; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = ulaw_decode(b as u8);
        b += 1;
    }
    t
};

const fn ulaw_decode(byte: u8) -> i16 {
    let u = !byte;
    let sign = u & 0x80;
    let exponent = ((u >> 4) & 0x07) as i32;
    let mantissa = (u & 0x0f) as i32;
    let magnitude = (((mantissa << 3) + BIAS) << exponent) - BIAS;
    // At most (15 << 3 + 132) << 7 - 132 = 32124: always an i16.
    (if sign != 0 { -magnitude } else { magnitude }) as i16
}

/// Encodes one 16-bit sample as A-law.
pub fn linear_to_alaw(sample: i16) -> u8 {
    let s = i32::from(sample) >> 3; // 13-bit
    let (sign, mag) = if s >= 0 {
        (0xd5u8, s)
    } else {
        (0x55u8, -s - 1)
    };
    let mag = mag.min(0x0fff);
    let code = if mag < 32 {
        (mag >> 1) as u8
    } else {
        let exponent = (31 - mag.leading_zeros() as i32) - 4; // 1..=7
        let mantissa = (mag >> exponent) & 0x0f;
        ((exponent << 4) | mantissa) as u8
    };
    code ^ sign
}

/// Decodes one A-law byte.
pub fn alaw_to_linear(byte: u8) -> i16 {
    ALAW[usize::from(byte)]
}

/// Every A-law byte decoded, made at compile time.
static ALAW: [i16; 256] = {
    let mut t = [0i16; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = alaw_decode(b as u8);
        b += 1;
    }
    t
};

const fn alaw_decode(byte: u8) -> i16 {
    let a = byte ^ 0x55;
    let exponent = ((a >> 4) & 0x07) as i32;
    let mantissa = (a & 0x0f) as i32;
    let magnitude = if exponent == 0 {
        (mantissa << 4) + 8
    } else {
        ((mantissa << 4) + 0x108) << (exponent - 1)
    };
    // At most (15 << 4 + 0x108) << 6 = 32256: always an i16.
    (if a & 0x80 != 0 { magnitude } else { -magnitude }) as i16
}

/// The decoding table of an RTP payload type: 0 (PCMU) or 8 (PCMA).
pub fn table(payload_type: u8) -> Option<&'static [i16; 256]> {
    match payload_type {
        0 => Some(&ULAW),
        8 => Some(&ALAW),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // Silence and full scale, as every G.711 implementation has them.
        assert_eq!(linear_to_ulaw(0), 0xff);
        assert_eq!(ulaw_to_linear(0xff), 0);
        assert_eq!(ulaw_to_linear(0x7f), 0);
        assert_eq!(ulaw_to_linear(0x00), -32124);
        assert_eq!(ulaw_to_linear(0x80), 32124);
        assert_eq!(linear_to_alaw(0), 0xd5);
        assert_eq!(alaw_to_linear(0xd5), 8);
        assert_eq!(alaw_to_linear(0x55), -8);
        assert_eq!(alaw_to_linear(0xaa), 32256);
        assert_eq!(alaw_to_linear(0x2a), -32256);
    }

    #[test]
    fn every_code_round_trips_through_linear() {
        for b in 0..=255u8 {
            let u = ulaw_to_linear(b);
            let back = linear_to_ulaw(u);
            assert_eq!(ulaw_to_linear(back), u, "µ-law {b:#04x}");
            let a = alaw_to_linear(b);
            assert_eq!(linear_to_alaw(a), b, "A-law {b:#04x}");
        }
    }

    #[test]
    fn quantisation_error_is_bounded() {
        for s in (-32000i32..32000).step_by(7) {
            let s = s as i16;
            let u = i32::from(ulaw_to_linear(linear_to_ulaw(s)));
            let a = i32::from(alaw_to_linear(linear_to_alaw(s)));
            let tol = (i32::from(s).abs() / 16).max(16);
            assert!((u - i32::from(s)).abs() <= tol, "µ-law {s} -> {u}");
            assert!((a - i32::from(s)).abs() <= tol, "A-law {s} -> {a}");
        }
    }
}
