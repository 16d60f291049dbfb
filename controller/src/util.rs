//! Small helpers: wall-clock time for proposers, id generation, timestamp rendering.

use crate::command::UnixMillis;

pub fn now_ms() -> UnixMillis {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// RFC 3339 in UTC with exactly three fractional digits, so timestamps line up and sort as text
/// (years 0 to 9999; others give an empty string). Computed by hand: listings format many of
/// these, and a general formatter costs more than the rest of the response.
pub fn rfc3339(ms: UnixMillis) -> String {
    let secs = ms.div_euclid(1000);
    let milli = ms.rem_euclid(1000);
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    if !(0..=9999).contains(&year) {
        return String::new();
    }
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{milli:03}Z", sod / 3600, sod % 3600 / 60, sod % 60)
}

/// (year, month, day) of the proleptic Gregorian calendar for days since 1970-01-01
/// (Howard Hinnant's civil_from_days).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// An error that is only a message, for error slots (openraft's among them) that want a
/// `std::error::Error`.
#[derive(Debug)]
pub struct MessageError(pub String);

impl std::fmt::Display for MessageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for MessageError {}

/// A new identifier: a UUIDv7, whose leading bits are the time, so that rows keyed by it are
/// appended at the end of their indexes rather than scattered across them (a random key dirties
/// a different page of each index on every insert, and every dirty page is written to the WAL).
/// Ids are not secrets: tokens and session values are random bytes of their own.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// A node id that survives a trip through JavaScript numbers (below 2^53), never 0.
pub fn new_node_id() -> u64 {
    let bytes = uuid::Uuid::new_v4();
    let n = u64::from_le_bytes(bytes.as_bytes()[..8].try_into().unwrap_or([1; 8]));
    (n & ((1 << 53) - 1)).max(1)
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps_have_fixed_width() {
        assert_eq!(super::rfc3339(1_764_000_000_400), "2025-11-24T16:00:00.400Z");
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::rfc3339(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(super::rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn timestamps_match_a_general_formatter() {
        const FORMAT: &[time::format_description::BorrowedFormatItem<'static>] =
            time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
        // Every day of 1900..2400 at a varying time of day, and the edges of the range.
        let mut ms: i64 = -2_208_988_800_000;
        while ms < 13_569_465_600_000 {
            let expected = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
                .unwrap()
                .format(FORMAT)
                .unwrap();
            assert_eq!(super::rfc3339(ms), expected, "{ms}");
            ms += 86_400_000 + 3_600_123;
        }
        assert_eq!(super::rfc3339(-62_167_219_200_000), "0000-01-01T00:00:00.000Z");
        assert_eq!(super::rfc3339(253_402_300_799_999), "9999-12-31T23:59:59.999Z");
        assert_eq!(super::rfc3339(253_402_300_800_000), "");
    }
}
