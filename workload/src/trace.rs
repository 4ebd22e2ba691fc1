//! The trace format (`docs/CONTRACT.md` §7 in the repository): parsing
//! only (no I/O), so the command line tool, the tests and the benches read
//! traces the same way.
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

use hugepunch::Attribute;
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

impl Op {
    /// The range the operation acts on (`None` for `teardown`, which acts
    /// on the whole file).
    pub fn range(&self) -> Option<hugepunch::ByteRange> {
        match *self {
            Op::Punch { offset, len }
            | Op::Convert { offset, len, .. }
            | Op::Populate { offset, len }
            | Op::Flush { offset, len } => Some(hugepunch::ByteRange::new(offset, len)),
            Op::Teardown => None,
        }
    }
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

/// The longest line a trace may have, in bytes, its line ending excluded
/// (a longer one is an error, so that a reader never holds more than this
/// of a line that does not end, such as `/dev/zero`).
pub const MAX_LINE_BYTES: usize = 4096;

/// What the parser accepts at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest line in bytes, its line ending excluded.
    pub max_line_bytes: usize,
    /// Most operation lines.
    pub max_operations: usize,
}

impl Default for Limits {
    /// [`MAX_LINE_BYTES`], and no limit on the number of operations.
    fn default() -> Self {
        Limits {
            max_line_bytes: MAX_LINE_BYTES,
            max_operations: usize::MAX,
        }
    }
}

/// Why a word is not a number of the trace grammar (`docs/CONTRACT.md` §7.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NumberError {
    /// No digits (an empty word, a lone suffix, a lone `0x`).
    #[error("no digits")]
    NoDigits,
    /// A character that is not a digit of the number's base (a sign, a
    /// space of another kind, a second suffix, ...).
    #[error("{0:?} is not a {1} digit")]
    BadDigit(char, &'static str),
    /// The value (suffix applied) does not fit in 64 bits.
    #[error("does not fit in 64 bits")]
    TooLarge,
}

/// Parse a number of the trace grammar (`docs/CONTRACT.md` §7.2): decimal
/// digits, or `0x` (or `0X`) and hex digits, then optionally one suffix
/// `K`, `M` or `G` (either case; powers of 1024). No sign, no other
/// characters.
pub fn number(s: &str) -> Result<u64, NumberError> {
    let (body, shift) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let (digits, radix, base) = match body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        Some(hex) => (hex, 16, "hex"),
        None => (body, 10, "decimal"),
    };
    if digits.is_empty() {
        return Err(NumberError::NoDigits);
    }
    // `from_str_radix` alone would take a leading `+`.
    if let Some(c) = digits.chars().find(|c| !c.is_digit(radix)) {
        return Err(NumberError::BadDigit(c, base));
    }
    let v = u64::from_str_radix(digits, radix).map_err(|_| NumberError::TooLarge)?;
    v.checked_mul(1u64 << shift).ok_or(NumberError::TooLarge)
}

/// Parse a number: decimal or `0x` hex, with an optional `K`, `M` or `G`
/// suffix (powers of 1024); `None` if [`number`] refuses it.
pub fn parse_number(s: &str) -> Option<u64> {
    number(s).ok()
}

impl std::fmt::Display for Op {
    /// The operation as a trace line (offsets and lengths in hex).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let attr = |a: Attribute| match a {
            Attribute::Private => "private",
            Attribute::Shared => "shared",
        };
        match *self {
            Op::Punch { offset, len } => write!(f, "punch {offset:#x} {len:#x}"),
            Op::Convert { offset, len, to } => {
                write!(f, "convert {offset:#x} {len:#x} {}", attr(to))
            }
            Op::Populate { offset, len } => write!(f, "populate {offset:#x} {len:#x}"),
            Op::Flush { offset, len } => write!(f, "flush {offset:#x} {len:#x}"),
            Op::Teardown => f.write_str("teardown"),
        }
    }
}

/// A trace read one line at a time, for readers that stream (a file, a
/// pipe) and must never hold more than one line; [`Trace::parse`] is this
/// over a whole text.
#[derive(Debug, Clone)]
pub struct Parser {
    trace: Trace,
    limits: Limits,
    /// Lines seen so far.
    line: usize,
    /// The line of the `size` header, if any.
    size_line: Option<usize>,
    /// Still in the header (no operation yet, header not yet checked).
    in_header: bool,
}

impl Parser {
    /// A parser with these limits.
    pub fn new(limits: Limits) -> Self {
        Parser {
            trace: Trace::default(),
            limits,
            line: 0,
            size_line: None,
            in_header: true,
        }
    }

    /// Lines seen so far (the number of the last line given to [`Parser::line`]).
    pub fn lines(&self) -> usize {
        self.line
    }

    /// The line of the `size` header line, if there was one.
    pub fn size_line(&self) -> Option<usize> {
        self.size_line
    }

    /// The trace so far.
    pub fn trace(&self) -> &Trace {
        &self.trace
    }

    /// Parse the next line: its bytes without the LF (a CR before the LF,
    /// or at the end of the text, is the line ending and is dropped).
    pub fn line(&mut self, raw: &[u8]) -> Result<(), ParseError> {
        self.line += 1;
        let line = self.line;
        let err = |message: String| ParseError { line, message };
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.len() > self.limits.max_line_bytes {
            return Err(err(format!(
                "longer than {} bytes",
                self.limits.max_line_bytes
            )));
        }
        let text = std::str::from_utf8(raw).map_err(|_| err("not UTF-8 text".into()))?;
        let content = match raw.iter().position(|&b| b == b'#') {
            Some(i) => &text[..i],
            None => text,
        };
        let bytes = content.as_bytes();
        let space = |b: u8| b == b' ' || b == b'\t';
        if let Some(i) = bytes
            .iter()
            .position(|&b| !(space(b) || b.is_ascii_graphic()))
        {
            let c = content[i..].chars().next().unwrap_or('?');
            return Err(err(format!(
                "unexpected character {:?} (U+{:04X}): fields are separated by spaces or tabs",
                c, c as u32
            )));
        }
        // At most five words are kept (no line takes more than four
        // arguments); `n` counts them all. Plain byte loops: the content
        // is ASCII by now, and this is the hot loop of a long trace.
        let mut words = [""; 5];
        let mut n = 0;
        let mut i = 0;
        while i < bytes.len() {
            if space(bytes[i]) {
                i += 1;
                continue;
            }
            let start = i;
            while i < bytes.len() && !space(bytes[i]) {
                i += 1;
            }
            if n < words.len() {
                words[n] = &content[start..i];
            }
            n += 1;
        }
        if n == 0 {
            return Ok(());
        }
        let first = words[0];
        let num = |w: &str| number(w).map_err(|e| err(format!("bad number {w:?}: {e}")));
        let arity = |want: usize| {
            if n == want {
                Ok(())
            } else {
                Err(err(format!(
                    "`{}` takes {} argument(s), got {}",
                    first,
                    want - 1,
                    n - 1
                )))
            }
        };
        let header = matches!(first, "size" | "order" | "start");
        if header && !self.in_header {
            return Err(err(format!(
                "header line `{first}` after the first operation"
            )));
        }
        if !header {
            if self.trace.ops.len() >= self.limits.max_operations {
                return Err(err(format!(
                    "more than {} operations",
                    self.limits.max_operations
                )));
            }
            self.end_header()?;
        }
        let t = &mut self.trace;
        match first {
            "size" => {
                arity(2)?;
                t.size = num(words[1])?;
                self.size_line = Some(line);
            }
            "order" => {
                arity(2)?;
                t.order = number(words[1])
                    .ok()
                    .and_then(|o| u8::try_from(o).ok())
                    .filter(|o| (1..=hugepunch::MAX_ORDER).contains(o))
                    .ok_or_else(|| {
                        err(format!(
                            "order must be between 1 and {}, got {}",
                            hugepunch::MAX_ORDER,
                            words[1]
                        ))
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
                let op = match first {
                    "punch" => Op::Punch { offset, len },
                    "populate" => Op::Populate { offset, len },
                    _ => Op::Flush { offset, len },
                };
                t.ops.push((line, op));
            }
            "convert" => {
                arity(4)?;
                let (offset, len) = (num(words[1])?, num(words[2])?);
                let to = match words[3] {
                    "private" => Attribute::Private,
                    "shared" => Attribute::Shared,
                    w => return Err(err(format!("unknown attribute {w:?}"))),
                };
                t.ops.push((line, Op::Convert { offset, len, to }));
            }
            "teardown" => {
                arity(1)?;
                t.ops.push((line, Op::Teardown));
            }
            w => return Err(err(format!("unknown operation {w:?}"))),
        }
        Ok(())
    }

    /// The header is complete (at the first operation, or at the end):
    /// the file must be a positive multiple of the huge page size. The
    /// error names the `size` line (or the current one, without it).
    fn end_header(&mut self) -> Result<(), ParseError> {
        if !self.in_header {
            return Ok(());
        }
        self.in_header = false;
        let t = &self.trace;
        let huge_page = 4096u64 << t.order;
        if t.size == 0 || !t.size.is_multiple_of(huge_page) {
            return Err(ParseError {
                line: self.size_line.unwrap_or(self.line),
                message: format!(
                    "size {:#x} is not a positive multiple of the huge page size ({:#x} bytes at order {})",
                    t.size, huge_page, t.order
                ),
            });
        }
        Ok(())
    }

    /// The trace, once every line is in.
    pub fn finish(mut self) -> Result<Trace, ParseError> {
        self.end_header()?;
        Ok(self.trace)
    }
}

impl Trace {
    /// Parse a whole trace, with the default [`Limits`].
    pub fn parse(text: &str) -> Result<Trace, ParseError> {
        Self::parse_bytes(text.as_bytes(), Limits::default())
    }

    /// Parse a whole trace given as bytes (each line must be UTF-8).
    pub fn parse_bytes(text: &[u8], limits: Limits) -> Result<Trace, ParseError> {
        let mut p = Parser::new(limits);
        let mut rest = text;
        while !rest.is_empty() {
            let (line, next) = match rest.iter().position(|&b| b == b'\n') {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, &rest[rest.len()..]),
            };
            p.line(line)?;
            rest = next;
        }
        p.finish()
    }

    /// The trace as text that [`Trace::parse`] reads back to the same
    /// trace (line numbers aside): the header in full, then one operation
    /// a line.
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(s, "size {:#x}", self.size);
        let _ = writeln!(s, "order {}", self.order);
        let _ = writeln!(
            s,
            "start {}",
            if self.populated { "populated" } else { "empty" }
        );
        let _ = writeln!(
            s,
            "start {}",
            match self.start {
                Attribute::Private => "private",
                Attribute::Shared => "shared",
            }
        );
        for (_, op) in &self.ops {
            let _ = writeln!(s, "{op}");
        }
        s
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
        assert_eq!(parse_number("0X1fK"), Some(31 << 10));
        assert_eq!(parse_number("4k"), Some(4096));
        assert_eq!(parse_number("18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_number("0x000000000000000000000000001000"), Some(4096));
    }

    /// CONTRACT.md §7.2: digits, or 0x and hex digits, then one optional suffix;
    /// no sign, no other characters.
    #[test]
    fn the_number_grammar_refuses_everything_else() {
        for bad in [
            "+4K",
            "-4K",
            "0x+1000",
            "0x-1",
            "+0x1000",
            " 4K",
            "4K ",
            "4\u{a0}K",
            "4KK",
            "4KB",
            "0x",
            "0xK",
            "K",
            "x10",
            "0b101",
            "1_000",
            "1.5M",
            "4 K",
            "0x1g0",
            "1e3",
            "٣",
            "4\u{ff2b}",
            "18446744073709551616",
            "0x10000000000000000",
            "17179869184G",
        ] {
            assert_eq!(parse_number(bad), None, "{bad:?} must be refused");
        }
        assert_eq!(number("+4K"), Err(NumberError::BadDigit('+', "decimal")));
        assert_eq!(number("0x+1000"), Err(NumberError::BadDigit('+', "hex")));
        assert_eq!(number("0x"), Err(NumberError::NoDigits));
        assert_eq!(number("17179869184G"), Err(NumberError::TooLarge));
    }

    #[test]
    fn fields_are_separated_by_spaces_or_tabs_only() {
        let t = Trace::parse("size 4M\r\npunch\t0 \t 4K\r\n").unwrap();
        assert_eq!(
            t.ops,
            vec![(
                2,
                Op::Punch {
                    offset: 0,
                    len: 4096
                }
            )]
        );
        for bad in [
            "punch 0\u{a0}4K\n",
            "punch 0 4K\u{a0}\n",
            "punch\u{3000}0 4K\n",
            "punch 0 4K\x0b\n",
            "punch 0\r4K\n",
            "punch 0 4K\x00\n",
        ] {
            let e = Trace::parse(bad).unwrap_err();
            assert_eq!(e.line, 1, "{bad:?}");
            assert!(e.message.contains("unexpected character"), "{bad:?}: {e}");
        }
        // Anything goes in a comment.
        assert!(Trace::parse("punch 0 4K # \u{a0} \x0b ok\n").is_ok());
        let e = Trace::parse_bytes(b"# fine\npunch 0 \xff\n", Limits::default()).unwrap_err();
        assert_eq!((e.line, e.message.as_str()), (2, "not UTF-8 text"));
    }

    #[test]
    fn lines_and_operations_are_capped() {
        let long = format!("# {}\n", "x".repeat(MAX_LINE_BYTES - 2));
        assert!(Trace::parse(&long).is_ok(), "exactly the limit");
        assert!(
            Trace::parse(&long.replace('\n', "\r\n")).is_ok(),
            "CRLF is not counted"
        );
        let e = Trace::parse(&format!("\n{}", long.replace("# ", "#  "))).unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("longer than 4096 bytes"), "{e}");
        let limits = Limits {
            max_operations: 2,
            ..Limits::default()
        };
        let e =
            Trace::parse_bytes(b"punch 0 4K\n\npunch 0 4K\n# c\nteardown\n", limits).unwrap_err();
        assert_eq!(e.line, 5);
        assert!(e.message.contains("more than 2 operations"), "{e}");
    }

    #[test]
    fn the_size_must_be_a_multiple_of_the_huge_page() {
        let e = Trace::parse("# c\nsize 3M\norder 9\npunch 0 4K\n").unwrap_err();
        assert_eq!(e.line, 2, "the size line");
        assert!(e.message.contains("multiple of the huge page size"), "{e}");
        assert_eq!(Trace::parse("size 0\n").unwrap_err().line, 1);
        assert_eq!(Trace::parse("size 4M\norder 18\n").unwrap_err().line, 1);
        assert!(Trace::parse("size 64K\norder 3\n").is_ok());
    }

    #[test]
    fn written_traces_read_back() {
        let text = "size 0x800000\norder 9\nstart empty\nstart shared\npopulate 0 4M\nconvert 0x1000 4K private\npunch 0 8K\nflush 0 2M\nteardown\n";
        let t = Trace::parse(text).unwrap();
        let again = Trace::parse(&t.to_text()).unwrap();
        assert_eq!(
            (again.size, again.order, again.populated, again.start),
            (t.size, t.order, t.populated, t.start)
        );
        let ops = |t: &Trace| t.ops.iter().map(|&(_, op)| op).collect::<Vec<_>>();
        assert_eq!(ops(&again), ops(&t));
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
