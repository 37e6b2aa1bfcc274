//! Wall-clock time as the format stores it (unix milliseconds) and the UTC calendar dates
//! that object keys and the export layout are named by. Pure functions apart from
//! [`now_ms`]; no time-zone database is involved, everything is UTC.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the unix epoch, now (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A UTC calendar time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Utc {
    /// Year.
    pub year: i64,
    /// Month, 1-12.
    pub month: u32,
    /// Day, 1-31.
    pub day: u32,
    /// Hour, minute, second, millisecond.
    pub hms_ms: (u32, u32, u32, u32),
}

impl Utc {
    /// The calendar time of unix milliseconds (proleptic Gregorian; days-from-civil
    /// inverted, after Howard Hinnant's algorithm).
    pub fn from_unix_ms(ms: u64) -> Utc {
        let secs = ms / 1000;
        let days = i64::try_from(secs / 86_400).expect("u64 seconds / 86400 fits i64");
        let rem = u32::try_from(secs % 86_400).expect("below 86400");
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = u32::try_from(doy - (153 * mp + 2) / 5 + 1).expect("day 1-31");
        let month = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).expect("month 1-12");
        let year = yoe + era * 400 + i64::from(month <= 2);
        Utc {
            year,
            month,
            day,
            hms_ms: (
                rem / 3600,
                rem / 60 % 60,
                rem % 60,
                u32::try_from(ms % 1000).expect("below 1000"),
            ),
        }
    }

    /// RFC 3339 with milliseconds, `2026-11-29T15:04:05.123Z`.
    pub fn rfc3339(&self) -> String {
        let (h, m, s, ms) = self.hms_ms;
        format!(
            "{:04}-{:02}-{:02}T{h:02}:{m:02}:{s:02}.{ms:03}Z",
            self.year, self.month, self.day
        )
    }
}

/// Unix milliseconds of an RFC 3339 UTC time as stores write them
/// (`2026-11-29T15:04:05Z`, `2026-11-29T15:04:05.123Z`, more fraction digits cut);
/// `None` for anything else, or a time before 1970.
pub fn parse_rfc3339_ms(t: &str) -> Option<u64> {
    let b = t.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let s = t.get(r)?;
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, s) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if b[16] != b':' || !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 {
        return None;
    }
    let rest = t.get(19..)?.strip_suffix('Z')?;
    let ms = match rest.strip_prefix('.') {
        None if rest.is_empty() => 0,
        Some(f) if !f.is_empty() && f.bytes().all(|c| c.is_ascii_digit()) => {
            format!("{f:0<3}")[..3].parse().ok()?
        }
        _ => return None,
    };
    // Days from civil (Howard Hinnant), the inverse of `Utc::from_unix_ms`.
    let yy = if mo <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let mp = if mo > 2 { mo - 3 } else { mo + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + s.min(60);
    u64::try_from(secs).ok().map(|s| s * 1000 + ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        assert_eq!(Utc::from_unix_ms(0).rfc3339(), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            Utc::from_unix_ms(951_782_400_000).rfc3339(),
            "2000-02-29T00:00:00.000Z"
        );
        assert_eq!(
            Utc::from_unix_ms(1_796_051_045_123).rfc3339(),
            "2026-11-30T15:04:05.123Z"
        );
        assert_eq!(
            Utc::from_unix_ms(4_102_444_799_999).rfc3339(),
            "2099-12-31T23:59:59.999Z"
        );
    }

    #[test]
    fn rfc3339_times_read_back() {
        for ms in [0, 951_782_400_000, 1_796_051_045_123, 4_102_444_799_999] {
            let t = Utc::from_unix_ms(ms).rfc3339();
            assert_eq!(parse_rfc3339_ms(&t), Some(ms), "{t}");
        }
        assert_eq!(
            parse_rfc3339_ms("2026-11-30T15:04:05Z"),
            Some(1_796_051_045_000)
        );
        assert_eq!(
            parse_rfc3339_ms("2026-11-30T15:04:05.123456789Z"),
            Some(1_796_051_045_123)
        );
        assert_eq!(
            parse_rfc3339_ms("2026-11-30T15:04:05.1Z"),
            Some(1_796_051_045_100)
        );
        for bad in [
            "",
            "2026-11-30 15:04:05Z",
            "2026-13-30T15:04:05Z",
            "2026-11-30T15:04:05",
            "2026-11-30T15:04:05+01:00",
            "1969-12-31T23:59:59Z",
            "2026-11-30T15:04:05.Z",
            "２026-11-30T15:04:05Z",
        ] {
            assert_eq!(parse_rfc3339_ms(bad), None, "{bad}");
        }
    }
}
