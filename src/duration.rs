//! The one duration syntax of every flag and `LIVELOCK_*` variable (the
//! server, `livelock run`, the load generator): `500ms`, `5s`, `1m`,
//! `1h30m`, `1.5s`, `250us`, or a plain number in the unit the flag
//! documents; `forever` where a flag allows no bound; and how a duration is
//! shown to people (`human`). Pure, no I/O.

use std::time::Duration;

/// The longest duration any flag takes (about 31 years): beyond it, an
/// error rather than an overflow.
const SECONDS_MAX: f64 = 1e9;

/// Parses `text`; a plain number is in `plain` (e.g. `Duration::from_secs(1)`
/// for a flag documented in seconds).
pub fn parse(text: &str, plain: Duration) -> Result<Duration, String> {
    let text = text.trim();
    let bad = || format!("{text:?} is not a duration (e.g. 500ms, 5s, 1m, 1h30m)");
    if text.is_empty() {
        return Err(bad());
    }
    let is_number = |c: char| c.is_ascii_digit() || c == '.';
    if text.chars().all(is_number) {
        let value: f64 = text.parse().map_err(|_| bad())?;
        return seconds(text, value * plain.as_secs_f64());
    }
    // A sequence of NUMBER UNIT parts: 1h30m, 2m5s, 1.5s.
    let mut total = 0.0;
    let mut rest = text;
    while !rest.is_empty() {
        let split = rest.find(|c: char| !is_number(c)).ok_or_else(bad)?;
        let (number, after) = rest.split_at(split);
        let value: f64 = number.parse().map_err(|_| bad())?;
        let unit_len = after.find(is_number).unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let scale = match unit {
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86_400.0,
            _ => {
                return Err(format!(
                    "unknown unit {unit:?} in {text:?} (us, ms, s, m, h, d)"
                ))
            }
        };
        total += value * scale;
        rest = next;
    }
    seconds(text, total)
}

/// As `parse`, and `forever` (or `inf`) for no bound (None).
pub fn parse_or_forever(text: &str, plain: Duration) -> Result<Option<Duration>, String> {
    match text.trim() {
        "forever" | "inf" => Ok(None),
        _ => parse(text, plain).map(Some),
    }
}

fn seconds(text: &str, value: f64) -> Result<Duration, String> {
    if !value.is_finite() || !(0.0..=SECONDS_MAX).contains(&value) {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(value))
}

/// An age as people read it: `4.2s`, `4m05s`, `3h02m`, `2d03h`.
pub fn human(age: Duration) -> String {
    let secs = age.as_secs();
    match secs {
        0..=59 => format!("{:.1}s", age.as_secs_f64()),
        60..=3599 => format!("{}m{:02}s", secs / 60, secs % 60),
        3600..=86_399 => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{:02}h", secs / 86_400, secs % 86_400 / 3600),
    }
}

/// Clap value parsers for flags documented in seconds and milliseconds.
pub fn seconds_flag(text: &str) -> Result<Duration, String> {
    parse(text, Duration::from_secs(1))
}

pub fn millis_flag(text: &str) -> Result<Duration, String> {
    parse(text, Duration::from_millis(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn every_form_parses() {
        let ms = Duration::from_millis;
        assert_eq!(parse("500ms", S), Ok(ms(500)));
        assert_eq!(parse("5s", S), Ok(ms(5000)));
        assert_eq!(parse("1m", S), Ok(ms(60_000)));
        assert_eq!(parse("1h30m", S), Ok(ms(5_400_000)));
        assert_eq!(parse("2m5s", S), Ok(ms(125_000)));
        assert_eq!(parse("1.5s", S), Ok(ms(1500)));
        assert_eq!(parse("250us", S), Ok(Duration::from_micros(250)));
        assert_eq!(parse(" 30 ", S), Ok(ms(30_000)), "plain: the flag's unit");
        assert_eq!(parse("30", Duration::from_millis(1)), Ok(ms(30)));
        assert_eq!(parse("0", S), Ok(Duration::ZERO));
        assert_eq!(parse_or_forever("forever", S), Ok(None));
        assert_eq!(parse_or_forever("2s", S), Ok(Some(ms(2000))));
    }

    #[test]
    fn bad_input_is_an_error_that_says_why() {
        for bad in [
            "", "s", "5x", "1h30", "..5s", "-1s", "5 s", "forever", "1e3",
        ] {
            let error = parse(bad, S).expect_err(bad);
            assert!(!error.is_empty());
        }
        assert!(parse("5x", S).unwrap_err().contains("unit"));
        assert!(parse("99999999999s", S).unwrap_err().contains("range"));
    }

    #[test]
    fn ages_read_as_people_read_them() {
        let s = Duration::from_secs;
        assert_eq!(human(Duration::from_millis(4_200)), "4.2s");
        assert_eq!(human(s(245)), "4m05s");
        assert_eq!(human(s(3 * 3600 + 2 * 60 + 7)), "3h02m");
        assert_eq!(human(s(2 * 86_400 + 3 * 3600)), "2d03h");
    }
}
