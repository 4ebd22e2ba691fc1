//! The trace format of SPEC.md §7: parsing only (no I/O), so the command
//! line tool, the tests and the benches read traces the same way.
//!
//! ```text
//! size 1G                 # header lines first; defaults: size 1G, order 9,
//! order 9                 # start populated, start private
//! start populated|empty
//! start private|shared
//! punch <offset> <len>
//! convert <offset> <len> private|shared
//! populate <offset> <len>
//! flush <offset> <len>
//! teardown
//! ```

use crate::host::Attribute;
use serde::{Deserialize, Serialize};

/// One operation of a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// `punch <offset> <len>`
    Punch {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// `convert <offset> <len> private|shared`
    Convert {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
        /// Target attribute.
        to: Attribute,
    },
    /// `populate <offset> <len>`
    Populate {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// `flush <offset> <len>`
    Flush {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// `teardown`
    Teardown,
}

/// A parsed trace: its header and its operations with their line numbers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trace {
    /// File size in bytes (default 1 GiB).
    pub size: u64,
    /// Huge page order (default 9).
    pub order: u8,
    /// Start populated (default) or empty.
    pub populated: bool,
    /// Initial attribute of every subpage (default private).
    pub start: Attribute,
    /// Operations, each with its 1-based line number.
    pub ops: Vec<(usize, Op)>,
}

impl Default for Trace {
    fn default() -> Self {
        Trace {
            size: 1 << 30,
            order: 9,
            populated: true,
            start: Attribute::Private,
            ops: Vec::new(),
        }
    }
}

/// A malformed line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub message: String,
}

/// Parse a number: decimal or `0x` hex, with an optional `K`, `M` or `G`
/// suffix (powers of 1024).
pub fn parse_number(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let v = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(hex, 16).ok()?,
        None => digits.parse::<u64>().ok()?,
    };
    v.checked_mul(1u64 << shift)
}

impl Trace {
    /// Parse a whole trace.
    pub fn parse(text: &str) -> Result<Trace, ParseError> {
        let mut t = Trace::default();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let err = |message: String| ParseError { line, message };
            let content = raw.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            let words: Vec<&str> = content.split_whitespace().collect();
            let num = |w: &str| parse_number(w).ok_or_else(|| err(format!("bad number {w:?}")));
            let arity = |n: usize| {
                if words.len() == n {
                    Ok(())
                } else {
                    Err(err(format!(
                        "`{}` takes {} argument(s), got {}",
                        words[0],
                        n - 1,
                        words.len() - 1
                    )))
                }
            };
            let header = matches!(words[0], "size" | "order" | "start");
            if header && !t.ops.is_empty() {
                return Err(err(format!(
                    "header line `{}` after the first operation",
                    words[0]
                )));
            }
            match words[0] {
                "size" => {
                    arity(2)?;
                    t.size = num(words[1])?;
                }
                "order" => {
                    arity(2)?;
                    t.order = num(words[1])?
                        .try_into()
                        .ok()
                        .filter(|o| (1..=crate::MAX_ORDER).contains(o))
                        .ok_or_else(|| {
                            err(format!("order must be between 1 and 18, got {}", words[1]))
                        })?;
                }
                "start" => {
                    arity(2)?;
                    match words[1] {
                        "populated" => t.populated = true,
                        "empty" => t.populated = false,
                        "private" => t.start = Attribute::Private,
                        "shared" => t.start = Attribute::Shared,
                        w => return Err(err(format!("unknown start state {w:?}"))),
                    }
                }
                "punch" | "populate" | "flush" => {
                    arity(3)?;
                    let (offset, len) = (num(words[1])?, num(words[2])?);
                    let op = match words[0] {
                        "punch" => Op::Punch { offset, len },
                        "populate" => Op::Populate { offset, len },
                        _ => Op::Flush { offset, len },
                    };
                    t.ops.push((line, op));
                }
                "convert" => {
                    arity(4)?;
                    let to = match words[3] {
                        "private" => Attribute::Private,
                        "shared" => Attribute::Shared,
                        w => return Err(err(format!("unknown attribute {w:?}"))),
                    };
                    t.ops.push((
                        line,
                        Op::Convert {
                            offset: num(words[1])?,
                            len: num(words[2])?,
                            to,
                        },
                    ));
                }
                "teardown" => {
                    arity(1)?;
                    t.ops.push((line, Op::Teardown));
                }
                w => return Err(err(format!("unknown operation {w:?}"))),
            }
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(parse_number("4K"), Some(4096));
        assert_eq!(parse_number("0x1000"), Some(4096));
        assert_eq!(parse_number("2M"), Some(2 << 20));
        assert_eq!(parse_number("1G"), Some(1 << 30));
        assert_eq!(parse_number("0x10K"), Some(16 << 10));
        assert_eq!(parse_number("12x"), None);
        assert_eq!(parse_number(""), None);
        assert_eq!(parse_number("99999999999999G"), None);
    }

    #[test]
    fn parses_header_and_ops() {
        let t = Trace::parse("size 4M\norder 9\nstart shared\n# c\n\npunch 0 4K # x\nconvert 0 2M private\nteardown\n").unwrap();
        assert_eq!(t.size, 4 << 20);
        assert_eq!(t.start, Attribute::Shared);
        assert_eq!(
            t.ops[0],
            (
                6,
                Op::Punch {
                    offset: 0,
                    len: 4096
                }
            )
        );
        assert_eq!(
            t.ops[1],
            (
                7,
                Op::Convert {
                    offset: 0,
                    len: 2 << 20,
                    to: Attribute::Private
                }
            )
        );
        assert_eq!(t.ops[2], (8, Op::Teardown));
    }

    #[test]
    fn malformed_lines_name_their_line() {
        assert_eq!(Trace::parse("punch 0\n").unwrap_err().line, 1);
        assert_eq!(Trace::parse("\n\npunch x 4K\n").unwrap_err().line, 3);
        assert_eq!(Trace::parse("punch 0 4K\nsize 1G\n").unwrap_err().line, 2);
        assert_eq!(Trace::parse("frobnicate 1 2\n").unwrap_err().line, 1);
        assert_eq!(Trace::parse("order 19\n").unwrap_err().line, 1);
        assert_eq!(Trace::parse("convert 0 4K public\n").unwrap_err().line, 1);
    }
}
