//! Exact readings of JSON numbers (RFC 8259 §6) from their text.
//!
//! JSON has one number type, so `12`, `12.0`, `1.2e1` and `1200e-2` are the same value; a billing
//! system must read them alike and must never round. These functions read the digits themselves
//! instead of going through `f64` (where `12.000000000000000001` would become `12`).
//! The input is a JSON number token as the parser validated it (`-?int(.frac)?([eE][+-]?exp)?`).

/// 2^53 − 1, the largest integer every JSON implementation represents exactly (PRODUCT.md §1;
/// RFC 8259 §6, I-JSON RFC 7493 §2.2).
pub const MAX_EXACT_JSON_INTEGER: u64 = (1 << 53) - 1;

/// Largest meter value one event may carry: [`MAX_EXACT_JSON_INTEGER`].
pub const MAX_METER_VALUE: u64 = MAX_EXACT_JSON_INTEGER;

/// Why a number is not a meter value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotMeterValue {
    /// Below zero (`-0` and `-0.0` are zero, not negative).
    Negative,
    /// Not integer-valued (`12.5`, `1e-1`).
    Fractional,
    /// Above [`MAX_METER_VALUE`].
    TooLarge,
    /// Not a JSON number token.
    NotANumber,
}

/// A number token split into sign, significant digits and a decimal exponent:
/// value = (−1)^negative × digits × 10^exp, `digits` without leading or trailing zeros
/// (empty for zero).
struct Decimal<'a> {
    negative: bool,
    int: &'a [u8],
    frac: &'a [u8],
    /// The written exponent, saturated to ±2^62 (no written exponent can matter beyond that).
    exp: i64,
}

fn split(token: &str) -> Option<Decimal<'_>> {
    let b = token.as_bytes();
    let mut i = 0;
    let negative = b.first() == Some(&b'-');
    if negative {
        i += 1;
    }
    let start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    let int = &b[start..i];
    if int.is_empty() || (int.len() > 1 && int[0] == b'0') {
        return None;
    }
    let mut frac: &[u8] = &[];
    if b.get(i) == Some(&b'.') {
        let s = i + 1;
        i = s;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        frac = &b[s..i];
        if frac.is_empty() {
            return None;
        }
    }
    let mut exp: i64 = 0;
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        let neg = match b.get(i) {
            Some(b'-') => {
                i += 1;
                true
            }
            Some(b'+') => {
                i += 1;
                false
            }
            _ => false,
        };
        let s = i;
        while i < b.len() && b[i].is_ascii_digit() {
            exp = exp.saturating_mul(10).saturating_add(i64::from(b[i] - b'0')).min(1 << 62);
            i += 1;
        }
        if i == s {
            return None;
        }
        if neg {
            exp = -exp;
        }
    }
    (i == b.len()).then_some(Decimal { negative, int, frac, exp })
}

impl Decimal<'_> {
    /// Significant digits (leading zeros of the integer part and trailing zeros of the whole
    /// digit string removed) and the exponent of the last one.
    fn significant(&self) -> (Vec<u8>, i64) {
        let mut digits: Vec<u8> = self.int.iter().chain(self.frac).copied().collect();
        let mut exp = self.exp.saturating_sub(self.frac.len() as i64);
        while digits.last() == Some(&b'0') {
            digits.pop();
            exp = exp.saturating_add(1);
        }
        let lead = digits.iter().take_while(|&&d| d == b'0').count();
        digits.drain(..lead);
        (digits, exp)
    }
}

/// Reads a meter value: a non-negative integer-valued JSON number of at most
/// [`MAX_METER_VALUE`], written in any JSON form (`12`, `12.0`, `1.2e1`, `1e3`, `-0`).
pub fn meter_value(token: &str) -> Result<u64, NotMeterValue> {
    // Fast path: plain digits (what producers almost always send).
    let b = token.as_bytes();
    if !b.is_empty() && b.len() <= 16 && b.iter().all(u8::is_ascii_digit) && (b.len() == 1 || b[0] != b'0') {
        let v = b.iter().fold(0u64, |v, d| v * 10 + u64::from(d - b'0'));
        return if v <= MAX_METER_VALUE { Ok(v) } else { Err(NotMeterValue::TooLarge) };
    }
    let d = split(token).ok_or(NotMeterValue::NotANumber)?;
    let (digits, exp) = d.significant();
    if digits.is_empty() {
        return Ok(0); // zero in any form, `-0` included
    }
    if d.negative {
        return Err(NotMeterValue::Negative);
    }
    if exp < 0 {
        return Err(NotMeterValue::Fractional);
    }
    // 2^53 − 1 has 16 digits.
    if digits.len() as i64 + exp > 16 {
        return Err(NotMeterValue::TooLarge);
    }
    let mut v = digits.iter().fold(0u64, |v, d| v * 10 + u64::from(d - b'0'));
    for _ in 0..exp {
        v *= 10;
    }
    if v <= MAX_METER_VALUE {
        Ok(v)
    } else {
        Err(NotMeterValue::TooLarge)
    }
}

/// Reads a JWT NumericDate (RFC 7519 §2: seconds since the epoch, any JSON number, fractions
/// allowed) as whole seconds, rounded down and saturated to the range of `i64`: a claim of any
/// size or form (`9223372036854775807`, `1e19`, `1e400`) has a value and never overflows.
pub fn numeric_date(token: &str) -> Option<i64> {
    let d = split(token)?;
    let (digits, exp) = d.significant();
    if digits.is_empty() {
        return Some(0);
    }
    // Beyond 19 digits the value is outside i64 whatever the digits: saturate.
    let int_digits = digits.len() as i64 + exp;
    if int_digits > 19 {
        return Some(if d.negative { i64::MIN } else { i64::MAX });
    }
    let (whole, has_fraction) = if exp >= 0 {
        let mut v: i128 = digits.iter().fold(0i128, |v, d| v * 10 + i128::from(d - b'0'));
        for _ in 0..exp {
            v *= 10;
        }
        (v, false)
    } else if int_digits <= 0 {
        (0, true)
    } else {
        let k = int_digits as usize;
        (digits[..k].iter().fold(0i128, |v, d| v * 10 + i128::from(d - b'0')), true)
    };
    // Floor: towards −∞ for negative values with a fraction.
    let v = if d.negative { -whole - i128::from(has_fraction) } else { whole };
    Some(v.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use NotMeterValue::*;

    #[test]
    fn meter_values_in_every_json_form() {
        for (t, want) in [
            ("0", Ok(0)),
            ("12", Ok(12)),
            ("12.0", Ok(12)),
            ("12.000", Ok(12)),
            ("1e3", Ok(1000)),
            ("1E3", Ok(1000)),
            ("1e+3", Ok(1000)),
            ("1.2e1", Ok(12)),
            ("1200e-2", Ok(12)),
            ("-0", Ok(0)),
            ("-0.0", Ok(0)),
            ("0e999999999999999999999", Ok(0)),
            ("0.000e-5", Ok(0)),
            ("9007199254740991", Ok(MAX_METER_VALUE)),
            ("9007199254740991.0", Ok(MAX_METER_VALUE)),
            ("9.007199254740991e15", Ok(MAX_METER_VALUE)),
            ("9007199254740992", Err(TooLarge)),
            ("18446744073709551615", Err(TooLarge)),
            ("1e16", Err(TooLarge)),
            ("1e400", Err(TooLarge)),
            ("12.5", Err(Fractional)),
            ("12.000000000000000001", Err(Fractional)),
            ("1e-1", Err(Fractional)),
            ("1e-400", Err(Fractional)),
            ("-1", Err(Negative)),
            ("-1e3", Err(Negative)),
            ("-0.5", Err(Negative)),
            ("", Err(NotANumber)),
            ("01", Err(NotANumber)),
            ("1.", Err(NotANumber)),
            (".5", Err(NotANumber)),
            ("1e", Err(NotANumber)),
            ("+1", Err(NotANumber)),
            ("0x10", Err(NotANumber)),
        ] {
            assert_eq!(meter_value(t), want, "{t}");
        }
    }

    #[test]
    fn numeric_dates_saturate_and_floor() {
        for (t, want) in [
            ("0", Some(0)),
            ("1700000000", Some(1_700_000_000)),
            ("1700000000.9", Some(1_700_000_000)),
            ("1.7e9", Some(1_700_000_000)),
            ("-1.5", Some(-2)),
            ("-0.5", Some(-1)),
            ("0.5", Some(0)),
            ("9223372036854775807", Some(i64::MAX)),
            ("9223372036854775808", Some(i64::MAX)),
            ("1e19", Some(i64::MAX)),
            ("1e400", Some(i64::MAX)),
            ("-1e400", Some(i64::MIN)),
            ("1e-400", Some(0)),
            ("x", None),
        ] {
            assert_eq!(numeric_date(t), want, "{t}");
        }
    }

    proptest::proptest! {
        /// Against integer arithmetic: every way of writing an integer reads as that integer.
        #[test]
        fn integer_forms_agree(v in 0u64..=MAX_METER_VALUE, zeros in 0usize..4, shift in 0u32..6) {
            let s = v.to_string();
            proptest::prop_assert_eq!(meter_value(&s), Ok(v));
            let frac = format!("{s}.{}", "0".repeat(zeros.max(1)));
            proptest::prop_assert_eq!(meter_value(&frac), Ok(v));
            let p = 10u64.pow(shift);
            let sci = format!("{}e-{shift}", u128::from(v) * u128::from(p));
            proptest::prop_assert_eq!(meter_value(&sci), Ok(v));
            proptest::prop_assert_eq!(numeric_date(&s), Some(v as i64));
        }
    }
}
