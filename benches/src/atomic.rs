//! The atomic peers: vm-memory's atomic bitmap, and one counter per huge
//! page (the floor).

use crate::maps::{parts, refuse_pending};
use crate::Tracker;
use hugepunch::{Attribute, Error};
use hugepunch_workload::Target;
use std::sync::atomic::{AtomicU64, Ordering};

/// vm-memory's `AtomicBitmap` shape: one bit per 4 KiB page, set with one
/// `fetch_or(SeqCst)` per page, which cannot say that a huge page became
/// full; the full check it then needs (every word of the huge page loaded)
/// runs after each punch, and a per-huge-page flag claims the completion.
/// No registration, no generation: a populate racing a completion can lose
/// its un-punch (the price of the shortcut the engine does not take).
pub struct AtomicBitmapPeer {
    words: Vec<AtomicU64>,
    claimed: Vec<std::sync::atomic::AtomicBool>,
    completions: AtomicU64,
}

impl AtomicBitmapPeer {
    /// A file of `huge_pages` 2 MiB huge pages.
    pub fn new(huge_pages: u64) -> Self {
        AtomicBitmapPeer {
            words: (0..huge_pages * 8).map(|_| AtomicU64::new(0)).collect(),
            claimed: (0..huge_pages)
                .map(|_| std::sync::atomic::AtomicBool::new(false))
                .collect(),
            completions: AtomicU64::new(0),
        }
    }
}

impl Target for AtomicBitmapPeer {
    type Error = Error;
    fn punch(&self, o: u64, l: u64) -> Result<(), Error> {
        for (h, first, count) in parts(o, l) {
            for sub in first..first + count {
                let w = &self.words[h as usize * 8 + sub / 64];
                // ORDERING: SeqCst, as vm-memory's bitmap (its choice, no
                // reason given): the peer as it is.
                w.fetch_or(1 << (sub % 64), Ordering::SeqCst);
            }
            let page = &self.words[h as usize * 8..h as usize * 8 + 8];
            // ORDERING: SeqCst, as above: the full check.
            if page.iter().all(|w| w.load(Ordering::SeqCst) == u64::MAX)
                && !self.claimed[h as usize].swap(true, Ordering::SeqCst)
            {
                self.completions.fetch_add(1, Ordering::Relaxed);
                for w in page {
                    // ORDERING: SeqCst, as above.
                    w.store(0, Ordering::SeqCst);
                }
                // ORDERING: SeqCst, as above.
                self.claimed[h as usize].store(false, Ordering::SeqCst);
            }
        }
        Ok(())
    }
    fn populate(&self, o: u64, l: u64) -> Result<(), Error> {
        for (h, first, count) in parts(o, l) {
            for sub in first..first + count {
                // ORDERING: SeqCst, as above.
                self.words[h as usize * 8 + sub / 64]
                    .fetch_and(!(1 << (sub % 64)), Ordering::SeqCst);
            }
        }
        Ok(())
    }
    fn convert(&self, o: u64, l: u64, to: Attribute) -> Result<(), Error> {
        if to == Attribute::Shared {
            return Ok(());
        }
        refuse_pending(o, l, |h, f, c| {
            (f..f + c).position(|sub| {
                // ORDERING: SeqCst, as above.
                self.words[h as usize * 8 + sub / 64].load(Ordering::SeqCst) >> (sub % 64) & 1 == 1
            })
        })
    }
    /// Forgets the range's pending punches (freed in pieces: no completion).
    fn flush(&self, o: u64, l: u64) -> Result<(), Error> {
        self.populate(o, l)
    }
    fn teardown(&self) -> Result<(), Error> {
        Ok(())
    }
}

impl Tracker for AtomicBitmapPeer {
    fn completions(&self) -> u64 {
        self.completions.load(Ordering::Relaxed)
    }
}

/// The out-of-tree HugeTLB guest_memfd's "pages waiting to be merged": one
/// counter per huge page, one `fetch_add` per punched subpage, no bitmap.
/// A second punch of the same subpage is counted twice and frees the huge
/// page early (the floor: the price of the bitmap's safety); a populate
/// cannot tell which subpages were punched, and a conversion cannot see a
/// pending punch.
pub struct CounterOnly {
    counts: Vec<AtomicU64>,
    completions: AtomicU64,
}

impl CounterOnly {
    /// A file of `huge_pages` 2 MiB huge pages.
    pub fn new(huge_pages: u64) -> Self {
        CounterOnly {
            counts: (0..huge_pages).map(|_| AtomicU64::new(0)).collect(),
            completions: AtomicU64::new(0),
        }
    }
}

impl Target for CounterOnly {
    type Error = Error;
    fn punch(&self, o: u64, l: u64) -> Result<(), Error> {
        for (h, _, count) in parts(o, l) {
            for _ in 0..count {
                // ORDERING: Relaxed: a count, as the peer keeps it.
                if self.counts[h as usize].fetch_add(1, Ordering::Relaxed) + 1 == 512 {
                    // ORDERING: Relaxed, as above.
                    self.counts[h as usize].store(0, Ordering::Relaxed);
                    self.completions.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }
    /// Knows nothing of which subpages were punched.
    fn populate(&self, _: u64, _: u64) -> Result<(), Error> {
        Ok(())
    }
    /// Cannot see a pending punch.
    fn convert(&self, _: u64, _: u64, _: Attribute) -> Result<(), Error> {
        Ok(())
    }
    fn flush(&self, _: u64, _: u64) -> Result<(), Error> {
        Ok(())
    }
    fn teardown(&self) -> Result<(), Error> {
        Ok(())
    }
}

impl Tracker for CounterOnly {
    fn completions(&self) -> u64 {
        self.completions.load(Ordering::Relaxed)
    }
}
