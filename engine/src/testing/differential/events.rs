//! The host events of a step, made comparable.

use super::Mismatch;
use crate::testing::Event;
use crate::ByteRange;

/// Normalise the engine's events for comparison: `IsShared` dropped, every
/// `InvalidateBegin` checked to be closed by an `InvalidateEnd` of the same
/// range (with only frees in between) and the ends dropped, adjacent zeroed
/// ranges merged. Also checks invariant 4's sequential part: every free is
/// covered by an invalidation issued earlier in the same operation.
pub fn normalise(events: Vec<Event>) -> Result<Vec<Event>, Mismatch> {
    let mut out: Vec<Event> = Vec::new();
    let mut open: Option<ByteRange> = None;
    let mut invalidated: Vec<ByteRange> = Vec::new();
    for e in events {
        match e {
            Event::IsShared(_) => {}
            Event::InvalidateBegin(r, _) => {
                ensure!(
                    open.is_none(),
                    "nested invalidation {:?} inside {:?}",
                    r,
                    open
                );
                open = Some(r);
                invalidated.push(r);
                out.push(e);
            }
            Event::InvalidateEnd(r) => {
                ensure_eq!(open, Some(r), "invalidate_end without its begin");
                open = None;
            }
            Event::Free(r, _) | Event::FreeFailed(r, _) => {
                ensure!(
                    invalidated
                        .iter()
                        .any(|i| i.offset <= r.offset && r.end() <= i.end()),
                    "invariant 4: free of {:?} without an invalidation of it first",
                    r
                );
                out.push(e);
            }
            Event::Zero(r) => {
                ensure!(open.is_none(), "zero inside an invalidation");
                match out.last_mut() {
                    Some(Event::Zero(last)) if last.end() == r.offset => last.len += r.len,
                    _ => out.push(e),
                }
            }
            _ => {
                ensure!(open.is_none(), "{:?} inside an invalidation", e);
                out.push(e);
            }
        }
    }
    ensure!(open.is_none(), "invalidation {:?} never ended", open);
    Ok(out)
}

/// Merge adjacent zeroed ranges of the model's events, as [`normalise`]
/// does for the engine's.
pub fn merge_zeros(events: Vec<Event>) -> Vec<Event> {
    let mut out: Vec<Event> = Vec::new();
    for e in events {
        match (out.last_mut(), e) {
            (Some(Event::Zero(last)), Event::Zero(r)) if last.end() == r.offset => {
                last.len += r.len
            }
            _ => out.push(e),
        }
    }
    out
}
