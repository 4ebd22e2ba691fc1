//! `--svg FILE`: a picture of the file at the end of a run, one cell per
//! huge page (or per group of huge pages when there are too many to draw
//! one each), coloured by state, with a legend.

use hugepunch_cli::format::{bytes, count};
use hugepunch_model::{Kernel, PageView};
use std::fmt::Write as _;

/// Pictures are of files of at most this many huge pages (every huge page
/// is looked at once).
pub const MAX_PAGES: u64 = 1 << 22;

/// At most this many cells per panel.
pub const MAX_CELLS: u64 = 4096;
const COLS: u64 = 64;
const CELL: u64 = 10;
const GAP: u64 = 1;

/// One cell: a group of consecutive huge pages and their states.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cell {
    /// First huge page.
    pub first: u64,
    /// Huge pages in the group.
    pub pages: u64,
    /// Huge, nothing pending.
    pub intact: u64,
    /// Huge with punched subpages pending.
    pub pending: u64,
    /// Punched subpages pending, summed over the `pending` pages.
    pub pending_subpages: u64,
    /// Split into 4 KiB pages.
    pub split: u64,
    /// Nothing allocated.
    pub absent: u64,
}

/// One picture of one run.
#[derive(Debug, Clone)]
pub struct Panel {
    /// Its title.
    pub title: String,
    /// Its cells.
    pub cells: Vec<Cell>,
    /// Huge pages per cell.
    pub per_cell: u64,
    /// Subpages per huge page.
    pub full: u32,
    /// Huge page size in bytes.
    pub huge_page_size: u64,
}

/// The panel of a kernel's file now.
pub fn panel(kernel: &Kernel, title: String) -> Panel {
    let geo = kernel.geometry();
    let n = geo.huge_pages();
    let per_cell = n.div_ceil(MAX_CELLS).max(1);
    let mut cells = Vec::with_capacity(n.div_ceil(per_cell) as usize);
    let mut h = 0;
    while h < n {
        let mut c = Cell {
            first: h,
            ..Cell::default()
        };
        let end = (h + per_cell).min(n);
        for p in h..end {
            match kernel.page_view(p) {
                PageView::Intact => c.intact += 1,
                PageView::Pending(k) => {
                    c.pending += 1;
                    c.pending_subpages += k as u64;
                }
                PageView::Split => c.split += 1,
                PageView::Absent => c.absent += 1,
            }
        }
        c.pages = end - h;
        cells.push(c);
        h = end;
    }
    Panel {
        title,
        cells,
        per_cell,
        full: geo.subpages_per_huge_page(),
        huge_page_size: geo.huge_page_size(),
    }
}

const INTACT: &str = "#2e7d32";
const SPLIT: &str = "#c62828";
const ABSENT: &str = "#cfd8dc";

/// Pending colour: pale yellow (few punched) to deep orange (nearly all).
fn pending_colour(fraction: f64) -> String {
    let f = fraction.clamp(0.0, 1.0);
    let lerp = |a: f64, b: f64| (a + (b - a) * f).round() as u8;
    format!(
        "#{:02x}{:02x}{:02x}",
        lerp(255.0, 230.0),
        lerp(241.0, 81.0),
        lerp(118.0, 0.0)
    )
}

fn cell_colour(c: &Cell, full: u32) -> String {
    let max = c.intact.max(c.pending).max(c.split).max(c.absent);
    if c.split == max {
        SPLIT.to_string()
    } else if c.pending == max {
        pending_colour(c.pending_subpages as f64 / (c.pending * full as u64) as f64)
    } else if c.intact == max {
        INTACT.to_string()
    } else {
        ABSENT.to_string()
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Render panels, one under the other, with one legend.
pub fn render(panels: &[Panel], caption: &str) -> String {
    let width = 2 * 10 + COLS * (CELL + GAP);
    let mut body = String::new();
    let mut y = 24;
    let _ = writeln!(
        body,
        r#"<text x="10" y="16" font-size="13" font-weight="bold">{}</text>"#,
        escape(caption)
    );
    for p in panels {
        let what = if p.per_cell == 1 {
            format!("one cell per {} huge page", bytes(p.huge_page_size))
        } else {
            format!("one cell per {} huge pages (colour: the most common state; a dot: some split or pending)", count(p.per_cell))
        };
        y += 14;
        let _ = writeln!(
            body,
            r#"<text x="10" y="{y}" font-size="12">{} — {}</text>"#,
            escape(&p.title),
            escape(&what)
        );
        y += 6;
        for (i, c) in p.cells.iter().enumerate() {
            let (col, row) = (i as u64 % COLS, i as u64 / COLS);
            let (cx, cy) = (10 + col * (CELL + GAP), y + row * (CELL + GAP));
            let last = c.first + c.pages - 1;
            let mut tip = if c.pages == 1 {
                format!("huge page {}: ", c.first)
            } else {
                format!("huge pages {}-{}: ", c.first, last)
            };
            let mut parts = Vec::new();
            if c.intact > 0 {
                parts.push(format!("{} intact", c.intact));
            }
            if c.pending > 0 {
                parts.push(format!(
                    "{} pending ({} of {} punched{})",
                    c.pending,
                    c.pending_subpages / c.pending,
                    p.full,
                    if c.pending > 1 { " on average" } else { "" }
                ));
            }
            if c.split > 0 {
                parts.push(format!("{} split", c.split));
            }
            if c.absent > 0 {
                parts.push(format!("{} freed or absent", c.absent));
            }
            tip.push_str(&parts.join(", "));
            let fill = cell_colour(c, p.full);
            let _ = writeln!(
                body,
                r#"<rect x="{cx}" y="{cy}" width="{CELL}" height="{CELL}" fill="{fill}"><title>{}</title></rect>"#,
                escape(&tip)
            );
            // An aggregated cell that holds a split or pending huge page
            // its colour does not show gets a marker of that colour.
            let marker = if c.split > 0 && fill != SPLIT {
                Some(SPLIT.to_string())
            } else if c.pending > 0
                && c.split == 0
                && c.pending < c.pages
                && fill != pending_colour(0.0)
            {
                Some(pending_colour(
                    c.pending_subpages as f64 / (c.pending * p.full as u64) as f64,
                ))
            } else {
                None
            };
            if let Some(m) = marker.filter(|m| *m != fill) {
                let _ = writeln!(
                    body,
                    r#"<rect x="{}" y="{}" width="4" height="4" fill="{m}"/>"#,
                    cx + 3,
                    cy + 3
                );
            }
        }
        let rows = (p.cells.len() as u64).div_ceil(COLS);
        y += rows * (CELL + GAP) + 8;
    }
    // Legend.
    y += 6;
    let full = panels.first().map_or(512, |p| p.full);
    let items: Vec<(String, String)> = vec![
        (
            INTACT.to_string(),
            "intact (huge, nothing pending)".to_string(),
        ),
        (
            pending_colour(0.1),
            format!("pending: few of {full} punched"),
        ),
        (
            pending_colour(1.0),
            format!("pending: nearly all of {full} punched"),
        ),
        (SPLIT.to_string(), "split into 4 KiB pages".to_string()),
        (ABSENT.to_string(), "freed (or never allocated)".to_string()),
    ];
    for (i, (colour, label)) in items.iter().enumerate() {
        let (lx, ly) = (10 + (i as u64 % 2) * 330, y + (i as u64 / 2) * 18);
        let _ = writeln!(
            body,
            r#"<rect x="{lx}" y="{ly}" width="12" height="12" fill="{colour}"/><text x="{}" y="{}" font-size="12">{}</text>"#,
            lx + 18,
            ly + 10,
            escape(label)
        );
    }
    y += items.len().div_ceil(2) as u64 * 18 + 6;
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{y}\" viewBox=\"0 0 {width} {y}\" font-family=\"sans-serif\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{body}</svg>\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use hugepunch_model::{ModelConfig, StrategyKind};

    #[test]
    fn one_cell_per_huge_page_when_few() {
        let k = Kernel::new(ModelConfig::new(8 << 20), StrategyKind::HugePunch).unwrap();
        k.punch(0, 4096).unwrap();
        k.punch(2 << 20, 2 << 20).unwrap();
        let p = panel(&k, "t".into());
        assert_eq!(p.per_cell, 1);
        assert_eq!(p.cells.len(), 4);
        assert_eq!((p.cells[0].pending, p.cells[0].pending_subpages), (1, 1));
        assert_eq!(p.cells[1].absent, 1);
        assert_eq!(p.cells[2].intact, 1);
        let svg = render(&[p], "caption");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<rect x=").count(), 4 + 5);
        assert!(svg.contains("1 pending (1 of 512 punched)"));
    }

    #[test]
    fn aggregates_when_many() {
        let k = Kernel::new(ModelConfig::new(1 << 40), StrategyKind::Eager).unwrap();
        k.punch(0, 4096).unwrap();
        let p = panel(&k, "t".into());
        assert_eq!(p.per_cell, 128);
        assert_eq!(p.cells.len(), 4096);
        assert_eq!(p.cells[0].split, 1);
        assert_eq!(p.cells[0].intact, 127);
        let svg = render(std::slice::from_ref(&p), "caption");
        assert_eq!(
            svg.matches(r#"width="4""#).count(),
            1,
            "one marker: the cell with the split huge page"
        );
        assert_eq!(p.cells.iter().map(|c| c.pages).sum::<u64>(), 1 << 19);
    }
}
