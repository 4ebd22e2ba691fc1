//! Human formatting: bytes, counts, tables and paragraphs, for a person
//! reading a terminal at most [`MAX_WIDTH`] columns wide.
//!
//! # Width
//!
//! Everything the tool prints for a person fits [`width`]: the terminal's
//! width when standard output is a terminal, at most [`MAX_WIDTH`]; 100
//! columns when it is not (a pipe, a file, a test). Tables ([`table`],
//! built with comfy-table) wrap their cells to it; paragraphs
//! ([`paragraph`], built with textwrap) wrap their words.
//!
//! # Bytes: one rounding rule
//!
//! A byte figure ([`bytes`]) is in binary units — B, KiB, MiB, GiB, TiB,
//! PiB — the largest unit it holds at least one of (bytesize chooses it).
//! An exact multiple of that unit is an integer: `4 KiB`, `2 MiB`,
//! `512 MiB`. Anything else has exactly one decimal, rounded to nearest:
//! `95.1 MiB`, `1.5 KiB`, and `2.0 MiB` for 2 MiB less 4 KiB. So `2 MiB`
//! always means exactly 2 MiB, and a `.0` says "not exactly". The demo,
//! replay, real, the pictures' captions and every verdict use this one
//! function.

use bytesize::ByteSize;
use comfy_table::{CellAlignment, ColumnConstraint, ContentArrangement, Table, Width};

/// The widest output the tool writes for a person, in columns.
pub const MAX_WIDTH: usize = 100;

/// The width to write to: the terminal's (at most [`MAX_WIDTH`]) when
/// standard output is a terminal, else [`MAX_WIDTH`].
pub fn width() -> usize {
    terminal_size::terminal_size_of(std::io::stdout())
        .map_or(MAX_WIDTH, |(w, _)| (w.0 as usize).clamp(40, MAX_WIDTH))
}

/// Bytes with a binary unit, by the rule of the module documentation:
/// `0 B`, `4 KiB`, `512 MiB`, `511.5 MiB`, `2.0 MiB` (2 MiB less 4 KiB).
pub fn bytes(n: u64) -> String {
    let shown = ByteSize::b(n).display().iec();
    // bytesize's unit: the largest power of 1024 not above n.
    let unit = if n < 1024 {
        1
    } else {
        1u64 << (10 * n.ilog(1024))
    };
    if n.is_multiple_of(unit) {
        format!("{shown:.0}")
    } else {
        format!("{shown:.1}")
    }
}

/// Seconds for people: `1.234 s`, `15.06 ms`, `26.6 us`.
pub fn seconds(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.3} s")
    } else if s >= 1e-3 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{:.1} us", s * 1e6)
    }
}

/// A count with thousands separators: `131,072`.
pub fn count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A plain-text table, [`width`] columns at most: the first column
/// left-aligned, the others right-aligned, a line of dashes under the
/// header. Cells wrap (headers first: their words break at spaces) when
/// the table would be wider.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    table_within(header, rows, width())
}

/// [`table`], at most `width` columns wide.
pub fn table_within(header: &[&str], rows: &[Vec<String>], width: usize) -> String {
    // Columns two spaces apart (a blank junction and one space of
    // padding), and under the header a line of dashes per column.
    let gap = comfy_table::ContentLineStyle::none().junction(' ');
    let style = comfy_table::TableStyle::new()
        .header_lines(gap)
        .content_lines(gap)
        .header_separator(comfy_table::LineStyle::none().fill('-').junction(' '));
    let mut t = Table::new();
    t.load_style(style)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_width(width.min(u16::MAX as usize) as u16)
        .set_header(header.to_vec())
        .add_rows(rows.iter().cloned());
    // No word is broken across lines, and no figure where the width allows:
    // each column is at least as wide as its longest word (of the header
    // and the cells) and, but the first (the labels), as its widest cell.
    // When those widths do not fit, the rightmost columns give up the
    // second rule first (their cells wrap at spaces).
    let longest_word = |c: &str| c.split(' ').map(|w| w.chars().count()).max().unwrap_or(0);
    let words: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| longest_word(c))
                .chain([longest_word(header[i])])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut least: Vec<usize> = (0..header.len())
        .map(|i| {
            let whole = rows
                .iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count());
            let whole = if i == 0 { 0 } else { whole.max().unwrap_or(0) };
            words[i].max(whole)
        })
        .collect();
    // Each column but the first has one space of padding, and a junction
    // before it.
    let total = |least: &[usize]| least.iter().sum::<usize>() + 2 * (least.len() - 1);
    for i in (1..least.len()).rev() {
        if total(&least) <= width {
            break;
        }
        least[i] = words[i];
    }
    for (i, col) in t.column_iter_mut().enumerate() {
        // The width of a constraint counts the padding.
        let (padding, least) = if i == 0 {
            ((0, 0), least[i])
        } else {
            col.set_cell_alignment(CellAlignment::Right);
            ((1, 0), least[i] + 1)
        };
        col.set_padding(padding);
        col.set_constraint(ColumnConstraint::LowerBoundary(Width::Fixed(
            least.min(u16::MAX as usize) as u16,
        )));
    }
    let mut out = String::new();
    for line in t.lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `text` wrapped to [`width`] columns, each line after the first indented
/// by `indent` spaces; ends with a newline.
pub fn paragraph(text: &str, indent: usize) -> String {
    paragraph_within(text, indent, width())
}

/// [`paragraph`], at most `width` columns wide.
pub fn paragraph_within(text: &str, indent: usize, width: usize) -> String {
    let pad = " ".repeat(indent);
    // Lines break at spaces only: not inside `6.18.44-fc` or `--strategy`.
    let opts = textwrap::Options::new(width)
        .subsequent_indent(&pad)
        .word_splitter(textwrap::WordSplitter::NoHyphenation);
    let mut out = textwrap::fill(text, opts);
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_follow_one_rounding_rule() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(4096), "4 KiB");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(512 << 20), "512 MiB");
        assert_eq!(bytes(2 << 20), "2 MiB");
        assert_eq!(bytes((2 << 20) - 4096), "2.0 MiB", "not exactly 2 MiB");
        assert_eq!(bytes((511 << 20) + (1 << 19)), "511.5 MiB");
        assert_eq!(bytes(1 << 40), "1 TiB");
        assert_eq!(bytes((1 << 50) * 4), "4 PiB");
        assert_eq!(bytes(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn counts() {
        assert_eq!(count(131072), "131,072");
        assert_eq!(count(12), "12");
        assert_eq!(count(0), "0");
    }

    #[test]
    fn a_small_table() {
        let t = table_within(&["a", "bb"], &[vec!["x".into(), "1".into()]], 100);
        assert_eq!(t, "a  bb\n- ---\nx   1\n");
    }

    #[test]
    fn a_wide_table_wraps_its_headers_not_its_figures() {
        let header = [
            "strategy",
            "a long header of many words",
            "another long header",
        ];
        let row = vec![
            "hugepunch, budget 64 MiB".to_string(),
            "2,048 / 2,048".to_string(),
            "131,072".to_string(),
        ];
        let t = table_within(&header, &[row], 40);
        assert!(t.lines().all(|l| l.chars().count() <= 40), "{t}");
        assert!(t.contains("2,048 / 2,048") && t.contains("131,072"), "{t}");
    }

    #[test]
    fn paragraphs_wrap() {
        let p = paragraph_within(&"word ".repeat(50), 2, 30);
        assert!(p.lines().all(|l| l.chars().count() <= 30), "{p}");
        assert!(p.lines().skip(1).all(|l| l.starts_with("  ")), "{p}");
    }
}
