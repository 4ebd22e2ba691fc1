//! A map from `u64` points to values, stored as runs: what the model uses
//! for per-subpage attributes and per-huge-page flags, so that a conversion
//! or a teardown of a terabyte costs a few runs, not a word per subpage
//! (KVM keeps memory attributes in an xarray of ranges for the same reason).

use std::collections::BTreeMap;

/// Every point has `default` except those inside a stored run.
#[derive(Debug, Clone)]
pub struct RangeMap<V> {
    default: V,
    /// start -> (end, value); disjoint, never `default`, adjacent runs of
    /// equal value merged.
    runs: BTreeMap<u64, (u64, V)>,
}

impl<V: Copy + Eq> RangeMap<V> {
    /// A map where every point has `default`.
    pub fn new(default: V) -> Self {
        RangeMap {
            default,
            runs: BTreeMap::new(),
        }
    }

    /// The value every point has unless set.
    pub fn default_value(&self) -> V {
        self.default
    }

    /// The value at `x`.
    pub fn get(&self, x: u64) -> V {
        match self.runs.range(..=x).next_back() {
            Some((_, &(end, v))) if end > x => v,
            _ => self.default,
        }
    }

    /// Split the run straddling `x` (if any) so that a run starts at `x`.
    fn cut(&mut self, x: u64) {
        if let Some((&s, &(e, v))) = self.runs.range(..x).next_back() {
            if e > x {
                self.runs.insert(s, (x, v));
                self.runs.insert(x, (e, v));
            }
        }
    }

    /// Give every point of `[start, end)` the value `v`.
    pub fn set(&mut self, start: u64, end: u64, v: V) {
        if start >= end {
            return;
        }
        self.cut(start);
        self.cut(end);
        let inside: Vec<u64> = self.runs.range(start..end).map(|(&s, _)| s).collect();
        for s in inside {
            self.runs.remove(&s);
        }
        if v == self.default {
            return;
        }
        let (mut start, mut end) = (start, end);
        if let Some((&s, &(e, pv))) = self.runs.range(..start).next_back() {
            if e == start && pv == v {
                self.runs.remove(&s);
                start = s;
            }
        }
        if let Some(&(e, nv)) = self.runs.get(&end) {
            if nv == v {
                self.runs.remove(&end);
                end = e;
            }
        }
        self.runs.insert(start, (end, v));
    }

    /// The runs of `[start, end)` as `(start, end, value)`, clipped, in
    /// order, covering the whole interval (default runs included).
    pub fn segments(&self, start: u64, end: u64) -> Vec<(u64, u64, V)> {
        let mut out = Vec::new();
        let mut at = start;
        let first = self
            .runs
            .range(..start)
            .next_back()
            .filter(|(_, &(e, _))| e > start);
        for (&s, &(e, v)) in first.into_iter().chain(self.runs.range(start..end)) {
            let s = s.max(start);
            if s > at {
                out.push((at, s, self.default));
            }
            let e = e.min(end);
            out.push((s, e, v));
            at = e;
        }
        if at < end {
            out.push((at, end, self.default));
        }
        out
    }

    /// Does every point of `[start, end)` have the value `v`?
    pub fn all(&self, start: u64, end: u64, v: V) -> bool {
        self.segments(start, end).iter().all(|&(_, _, x)| x == v)
    }

    /// How many points of `[start, end)` have the value `v`.
    pub fn count(&self, start: u64, end: u64, v: V) -> u64 {
        self.segments(start, end)
            .iter()
            .filter(|&&(_, _, x)| x == v)
            .map(|&(s, e, _)| e - s)
            .sum()
    }

    /// How many points of `[start, end)` have the value `v`, looking at
    /// no more than `max_runs` stored runs: `None` if the interval holds
    /// more (for callers that must bound their own cost, and can fall
    /// back to an upper bound).
    pub fn count_bounded(&self, start: u64, end: u64, v: V, max_runs: usize) -> Option<u64> {
        if start >= end {
            return Some(0);
        }
        let first = self
            .runs
            .range(..start)
            .next_back()
            .filter(|(_, &(e, _))| e > start);
        let (mut covered, mut with_v) = (0, 0);
        for (i, (&s, &(e, x))) in first
            .into_iter()
            .chain(self.runs.range(start..end))
            .enumerate()
        {
            if i >= max_runs {
                return None;
            }
            let len = e.min(end) - s.max(start);
            covered += len;
            if x == v {
                with_v += len;
            }
        }
        Some(if v == self.default {
            with_v + (end - start - covered)
        } else {
            with_v
        })
    }

    /// Number of stored runs (a measure of the map's size).
    pub fn runs(&self) -> usize {
        self.runs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn set_merges_and_splits() {
        let mut m = RangeMap::new(false);
        m.set(10, 20, true);
        m.set(20, 30, true);
        assert_eq!(m.runs(), 1);
        m.set(15, 16, false);
        assert_eq!(m.runs(), 2);
        assert!(m.get(14) && !m.get(15) && m.get(16));
        assert!(m.all(16, 30, true));
        assert!(!m.all(9, 12, true));
        assert_eq!(m.count(0, 100, true), 19);
        m.set(0, 100, false);
        assert_eq!(m.runs(), 0);
    }

    proptest! {
        /// The run map agrees with a plain array after any sequence of sets.
        #[test]
        fn agrees_with_an_array(ops in proptest::collection::vec((0u64..64, 0u64..64, 0u8..3), 0..40)) {
            let mut m = RangeMap::new(0u8);
            let mut a = [0u8; 64];
            for (x, y, v) in ops {
                let (s, e) = (x.min(y), x.max(y));
                m.set(s, e, v);
                a[s as usize..e as usize].iter_mut().for_each(|p| *p = v);
            }
            for (i, &want) in a.iter().enumerate() {
                prop_assert_eq!(m.get(i as u64), want);
            }
            let segs = m.segments(5, 50);
            prop_assert_eq!(segs.first().map(|s| s.0), Some(5));
            prop_assert_eq!(segs.last().map(|s| s.1), Some(50));
            for v in 0..3u8 {
                let want = a[5..50].iter().filter(|&&x| x == v).count() as u64;
                prop_assert_eq!(m.count(5, 50, v), want);
                prop_assert_eq!(m.count_bounded(5, 50, v, usize::MAX), Some(want));
                let runs = m.segments(5, 50).iter().filter(|s| s.2 != m.default_value()).count();
                prop_assert_eq!(m.count_bounded(5, 50, v, runs), Some(want));
                if runs > 0 {
                    prop_assert_eq!(m.count_bounded(5, 50, v, runs - 1), None);
                }
            }
        }
    }
}
