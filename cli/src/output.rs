//! What the CLI prints: aligned plain-text tables and fields, or the API's JSON.

use std::io::Write;

use crate::client::{Answer, CliError};

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Table,
    /// The API's JSON answer, pretty-printed, for scripts.
    Json,
}

/// Columns separated by two spaces, each as wide as its widest cell.
pub struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&'static str]) -> Table {
        Table { header: header.to_vec(), rows: Vec::new() }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.header.len());
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let header: Vec<String> = self.header.iter().map(|h| h.to_string()).collect();
        let lines: Vec<&Vec<String>> = std::iter::once(&header).chain(&self.rows).collect();
        let widths: Vec<usize> =
            (0..header.len()).map(|i| lines.iter().map(|l| l[i].chars().count()).max().unwrap_or(0)).collect();
        let mut out = String::new();
        for line in lines {
            let mut text = String::new();
            for (cell, width) in line.iter().zip(&widths) {
                text.push_str(cell);
                text.extend(std::iter::repeat_n(' ', width - cell.chars().count() + 2));
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `name:  value` lines with the values aligned.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs.iter().map(|(k, v)| format!("{:width$}  {v}\n", format!("{k}:"), width = width + 1)).collect()
}

/// An API timestamp in a table: whole seconds, so a column keeps one width (the API drops
/// trailing zeros from its milliseconds). Anything unparsable is shown as sent.
pub fn timestamp(s: &str) -> String {
    use time::format_description::well_known::Rfc3339;
    time::OffsetDateTime::parse(s, &Rfc3339)
        .ok()
        .and_then(|t| t.to_offset(time::UtcOffset::UTC).replace_nanosecond(0).ok())
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| s.to_string())
}

/// A missing or null value in a table.
pub fn or_dash(v: Option<&str>) -> String {
    v.filter(|s| !s.is_empty()).unwrap_or("-").to_string()
}

/// A boolean in a table or a field.
pub fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

/// A token's state: revoked, expired (by `expires_at`, none for a token that never expires), or active.
pub fn token_status(revoked: bool, expires_at: Option<&str>, now: time::OffsetDateTime) -> &'static str {
    use time::format_description::well_known::Rfc3339;
    if revoked {
        return "revoked";
    }
    match expires_at.map(|e| time::OffsetDateTime::parse(e, &Rfc3339)) {
        None => "active",
        Some(Ok(expires)) if expires <= now => "expired",
        Some(Ok(_)) => "active",
        Some(Err(_)) => "unknown",
    }
}

/// Writes to stdout; a reader that went away (`deployer projects list | head -1`) is not an error.
pub fn emit(text: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.map_err(CliError::Output),
    }
}

/// `--output json`: the answer as the API sent it, re-indented. An empty answer (204) prints nothing.
pub fn emit_json(answer: &Answer) -> Result<(), CliError> {
    if answer.is_empty() {
        return Ok(());
    }
    emit(&format!("{}\n", pretty_json(&answer.raw)))
}

/// Re-indents JSON text the way `serde_json::to_string_pretty` does, without going through a map,
/// so the keys keep the API's order. The text must be valid JSON (every answer is parsed first).
pub fn pretty_json(raw: &str) -> String {
    fn newline(out: &mut String, depth: usize) {
        out.push('\n');
        out.extend(std::iter::repeat_n("  ", depth));
    }
    let mut out = String::with_capacity(raw.len() * 2);
    let mut depth = 0usize;
    let (mut in_string, mut escaped) = (false, false);
    let mut chars = raw.trim().chars().peekable();
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                out.push(c);
                while chars.next_if(|c| c.is_whitespace()).is_some() {}
                if let Some(close) = chars.next_if(|c| matches!(c, '}' | ']')) {
                    out.push(close);
                } else {
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(c);
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            c if c.is_whitespace() => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_align_columns_and_trim_line_ends() {
        let mut t = Table::new(&["ID", "NAME", "X"]);
        t.row(vec!["1".into(), "web-frontend".into(), "".into()]);
        t.row(vec!["12345".into(), "api".into(), "*".into()]);
        assert_eq!(t.render(), "ID     NAME          X\n1      web-frontend\n12345  api           *\n");
    }

    #[test]
    fn timestamps_are_shown_to_the_second_in_utc() {
        assert_eq!(timestamp("2026-11-26T18:05:54.4Z"), "2026-11-26T18:05:54Z");
        assert_eq!(timestamp("2026-11-26T18:05:54+01:00"), "2026-11-26T17:05:54Z");
        assert_eq!(timestamp("soon"), "soon");
    }

    #[test]
    fn fields_align_values() {
        assert_eq!(fields(&[("id", "1".into()), ("created", "now".into())]), "id:       1\ncreated:  now\n");
    }

    #[test]
    fn pretty_json_matches_serde_json_and_keeps_key_order() {
        let v = json!([
            {"a": 1, "b": [], "c": {}, "d": [1, 2.5, null, true], "e": {"f": "x"}},
            "a \"quoted\" {string}, with: [brackets] \\",
            []
        ]);
        let compact = serde_json::to_string(&v).unwrap();
        assert_eq!(pretty_json(&compact), serde_json::to_string_pretty(&v).unwrap());
        assert_eq!(pretty_json("{ \"z\" : 1 , \"a\" : [ ] }"), "{\n  \"z\": 1,\n  \"a\": []\n}");
    }
}
