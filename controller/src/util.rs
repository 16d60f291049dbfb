//! Small helpers: wall-clock time for proposers, id generation, timestamp rendering.

use crate::command::UnixMillis;

pub fn now_ms() -> UnixMillis {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// RFC 3339 in UTC with exactly three fractional digits, so timestamps line up and sort as text.
pub fn rfc3339(ms: UnixMillis) -> String {
    const FORMAT: &[time::format_description::BorrowedFormatItem<'static>] =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| t.format(FORMAT).ok())
        .unwrap_or_default()
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

pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
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
    }
}
