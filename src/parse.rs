// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The one parser of numbers and inclusive ranges that every command line
//! and configuration string of the project uses: decimal or `0x` hex,
//! with `_` allowed between digits (`0xffff_f000`).

use std::ops::RangeInclusive;

use thiserror::Error;

/// A string that is not a number or range of the expected kind.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ParseError {
    /// Not a decimal or `0x` hexadecimal number.
    #[error("`{0}` is not a number (decimal or 0x hex)")]
    NotANumber(String),
    /// A number too large for its type.
    #[error("`{text}` does not fit in {bits} bits")]
    TooLarge {
        /// The input.
        text: String,
        /// Width of the type.
        bits: u32,
    },
    /// Not of the form `A-B`.
    #[error("`{0}` is not a range (expected A-B)")]
    NotARange(String),
    /// `A-B` with A > B.
    #[error("range `{0}` is reversed")]
    Reversed(String),
}

/// Parses a `u64`: decimal or `0x` hex, `_` between digits allowed.
pub fn parse_u64(s: &str) -> Result<u64, ParseError> {
    let t = s.trim();
    let (digits, radix) = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (t, 10),
    };
    // Digits and `_` only, `_` only between digits: not leading, not
    // trailing, not alone. Checked here rather than left to
    // `from_str_radix`, which takes a leading `+` and reports an overflow
    // before the garbage that follows it.
    if digits.is_empty()
        || digits.starts_with('_')
        || digits.ends_with('_')
        || !digits.chars().all(|c| c == '_' || c.is_digit(radix))
    {
        return Err(ParseError::NotANumber(s.to_string()));
    }
    let clean: String = digits.chars().filter(|&c| c != '_').collect();
    // Only valid digits are left: the one possible failure is overflow.
    u64::from_str_radix(&clean, radix).map_err(|_| ParseError::TooLarge {
        text: s.to_string(),
        bits: 64,
    })
}

/// Parses a `u32` like [`parse_u64`].
pub fn parse_u32(s: &str) -> Result<u32, ParseError> {
    let too_large = || ParseError::TooLarge {
        text: s.to_string(),
        bits: 32,
    };
    match parse_u64(s) {
        Ok(v) => u32::try_from(v).map_err(|_| too_large()),
        // Too large for 64 bits is too large for the 32 asked for.
        Err(ParseError::TooLarge { .. }) => Err(too_large()),
        Err(e) => Err(e),
    }
}

/// Parses an inclusive range `A-B` (A <= B) of `u32`s.
pub fn parse_u32_range(s: &str) -> Result<RangeInclusive<u32>, ParseError> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| ParseError::NotARange(s.to_string()))?;
    let (a, b) = (parse_u32(a)?, parse_u32(b)?);
    if a > b {
        return Err(ParseError::Reversed(s.to_string()));
    }
    Ok(a..=b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_hex_and_underscores_parse() {
        assert_eq!(parse_u64("42"), Ok(42));
        assert_eq!(parse_u64("0x2a"), Ok(42));
        assert_eq!(parse_u64("0X2A"), Ok(42));
        assert_eq!(parse_u64(" 0xffff_f000 "), Ok(0xffff_f000));
        assert_eq!(parse_u64("1_000"), Ok(1000));
    }

    #[test]
    fn garbage_is_refused_with_the_input_in_the_message() {
        for bad in ["", "0x", "x1", "_1", "1_", "0x_", "-1", "1 2", "0xg"] {
            let e = parse_u64(bad).unwrap_err();
            assert!(matches!(e, ParseError::NotANumber(_)), "{bad}: {e}");
        }
        assert!(matches!(
            parse_u64("0x1_0000_0000_0000_0000"),
            Err(ParseError::TooLarge { bits: 64, .. })
        ));
        assert!(matches!(
            parse_u32("4294967296"),
            Err(ParseError::TooLarge { bits: 32, .. })
        ));
    }

    /// Found by the `endpoints` fuzz target: `from_str_radix` took a sign
    /// (`--endpoints +5` was endpoint 5, `0x+ff` was 255), a long run of
    /// digits followed by garbage was called too large, and a `u32` too
    /// large for 64 bits was reported as not fitting in 64 bits.
    #[test]
    fn signs_are_refused_and_garbage_is_not_a_number() {
        for bad in ["+1", "+0x1", "0x+ff", "0X+F", "+_1", "0x+_f", "+"] {
            let e = parse_u64(bad).unwrap_err();
            assert!(matches!(e, ParseError::NotANumber(_)), "{bad}: {e}");
        }
        for bad in [
            "99999999999999999999x",
            "0xfffffffffffffffffz",
            "1_000_000_000_000_000_000_000+",
        ] {
            let e = parse_u64(bad).unwrap_err();
            assert!(matches!(e, ParseError::NotANumber(_)), "{bad}: {e}");
        }
        assert!(matches!(
            parse_u64("99999999999999999999"),
            Err(ParseError::TooLarge { bits: 64, .. })
        ));
        // A u32 too large for 64 bits is reported against 32.
        assert!(matches!(
            parse_u32("99999999999999999999"),
            Err(ParseError::TooLarge { bits: 32, .. })
        ));
        assert!(matches!(
            parse_u32_range("+1-2"),
            Err(ParseError::NotANumber(_))
        ));
        assert!("+5".parse::<crate::config::EndpointSet>().is_err());
    }

    #[test]
    fn ranges_are_inclusive_and_ordered() {
        assert_eq!(parse_u32_range("1-0x100"), Ok(1..=0x100));
        assert_eq!(parse_u32_range("5-5"), Ok(5..=5));
        assert!(matches!(
            parse_u32_range("9-1"),
            Err(ParseError::Reversed(_))
        ));
        assert!(matches!(
            parse_u32_range("9"),
            Err(ParseError::NotARange(_))
        ));
        assert!(matches!(
            parse_u32_range("1-2-3"),
            Err(ParseError::NotANumber(_))
        ));
    }
}
