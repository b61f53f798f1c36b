//! Escaping of values that come from the network before they go into a log line.
//!
//! An SNI, a Host header or a path is chosen by whoever is on the other end. Written
//! as is, a newline in it would start a forged log line, and a space followed by
//! `result=ok` would forge a field. [`log_safe`] leaves ordinary names as they are
//! and renders anything else as one quoted token with Rust string escapes.

use std::fmt;

/// Wraps `value` so that displaying it cannot break a log line (see [`LogSafe`]).
pub fn log_safe(value: &str) -> LogSafe<'_> {
    LogSafe(value)
}

/// Display adapter: the value as is when every character is an ASCII letter, digit or
/// one of `-._:*@/[]%+~,`, otherwise `"…"` with control characters, quotes,
/// backslashes and non-ASCII characters escaped (`\n`, `\"`, `\\`, `\u{…}`).
/// An empty value shows as `""`.
#[derive(Clone, Copy, Debug)]
pub struct LogSafe<'a>(pub &'a str);

fn plain(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._:*@/[]%+~,".contains(c)
}

impl fmt::Display for LogSafe<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        if !s.is_empty() && s.chars().all(plain) {
            return f.write_str(s);
        }
        f.write_str("\"")?;
        for c in s.chars() {
            match c {
                ' ' => f.write_str(" ")?,
                c if c.is_ascii_graphic() && c != '"' && c != '\\' => fmt::Write::write_char(f, c)?,
                '"' => f.write_str("\\\"")?,
                '\\' => f.write_str("\\\\")?,
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                c => write!(f, "\\u{{{:x}}}", u32::from(c))?,
            }
        }
        f.write_str("\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_names_are_unchanged() {
        for s in [
            "www.example.com",
            "edge-1",
            "*.x.org",
            "[::1]:443",
            "/a/b.png",
        ] {
            assert_eq!(log_safe(s).to_string(), s);
        }
    }

    #[test]
    fn anything_else_is_one_quoted_line() {
        let cases = [
            ("", "\"\""),
            ("a\nb", "\"a\\nb\""),
            ("x result=ok", "\"x result=ok\""),
            ("q\"\\", "\"q\\\"\\\\\""),
            ("\u{1b}[31m", "\"\\u{1b}[31m\""),
            ("caf\u{e9}", "\"caf\\u{e9}\""),
            ("a\u{2028}b", "\"a\\u{2028}b\""),
        ];
        for (input, want) in cases {
            let got = log_safe(input).to_string();
            assert_eq!(got, want, "{input:?}");
            assert!(!got.contains('\n') && !got.contains('\r'));
        }
    }
}
