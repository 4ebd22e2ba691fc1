//! What the kernel says about huge pages: its own counters, read from
//! /proc, and a sampler that watches them while a run goes on.
//!
//! The counters are system wide — /proc/meminfo's `ShmemHugePages` (THP
//! shmem, tmpfs included), `HugePages_Total - HugePages_Free` (hugetlb) and
//! /proc/vmstat's `thp_split_page` — so a figure taken from them is the
//! run's only while nothing else on the machine makes, splits or frees
//! huge pages of the same kind. [`HugeCounters::read`] before and after a
//! run gives the deltas; a run's own tests serialise their THP runs.
//!
//! A before/after view cannot tell a split from a free: a huge page split
//! by a 4 KiB punch and then punched empty leaves the same counters as one
//! freed whole. `thp_split_page` counts every split as it happens; the
//! [`Sampler`] adds a view from inside the run, sampling `ShmemHugePages`
//! beside the file's own `st_blocks`: huge pages gone from the counter
//! beyond what the file's released bytes can account for were split.

use crate::host::HugeBacking;
use crate::sync::{AtomicBool, Ordering};
use serde::Serialize;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// One reading of the kernel's huge page counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct HugeCounters {
    /// `ShmemHugePages`, bytes: shmem (and tmpfs) memory in huge pages.
    pub shmem_huge_bytes: u64,
    /// `HugePages_Total - HugePages_Free`: hugetlb pages in use.
    pub hugetlb_in_use: u64,
    /// `Hugepagesize`, bytes: the default hugetlb page size.
    pub hugetlb_page_size: u64,
    /// /proc/vmstat `thp_split_page`: huge pages split so far.
    pub thp_split_page: u64,
}

fn field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?;
        let rest = rest.strip_prefix(':').unwrap_or(rest);
        rest.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

impl HugeCounters {
    /// Read /proc/meminfo and /proc/vmstat. `None` where either is missing.
    pub fn read() -> Option<Self> {
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
        let vmstat = std::fs::read_to_string("/proc/vmstat").ok()?;
        Self::parse(&meminfo, &vmstat)
    }

    fn parse(meminfo: &str, vmstat: &str) -> Option<Self> {
        let total = field(meminfo, "HugePages_Total")?;
        let free = field(meminfo, "HugePages_Free")?;
        Some(HugeCounters {
            shmem_huge_bytes: field(meminfo, "ShmemHugePages")? * 1024,
            hugetlb_in_use: total.saturating_sub(free),
            hugetlb_page_size: field(meminfo, "Hugepagesize")? * 1024,
            // Absent on kernels without THP: nothing can split there.
            thp_split_page: field(vmstat, "thp_split_page ").unwrap_or(0),
        })
    }

    /// Huge pages of `huge_page_size` the kernel holds of this backing's
    /// kind: THP shmem pages, or hugetlb pages in use (counted in the
    /// default hugetlb size; a file of another size is not counted).
    pub fn whole(&self, backing: &HugeBacking, huge_page_size: u64) -> Option<u64> {
        match backing {
            HugeBacking::None(_) => None,
            HugeBacking::Thp(_) => Some(self.shmem_huge_bytes / huge_page_size),
            HugeBacking::Hugetlb(_) => {
                (self.hugetlb_page_size == huge_page_size).then_some(self.hugetlb_in_use)
            }
        }
    }
}

/// What the kernel counted about one side's file over its run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct KernelHuge {
    /// Huge pages of the file whole when the run started (the counter's
    /// rise from before the file was made to after it was populated).
    pub whole_at_start: u64,
    /// Of those, huge pages still whole when the run ended.
    pub whole_at_end: u64,
    /// Huge pages the kernel split during the run (/proc/vmstat
    /// `thp_split_page`; always 0 for hugetlb, which never splits).
    pub split: u64,
    /// Huge pages freed whole: gone from the counter and never split.
    pub freed_whole: u64,
    /// The most huge pages split and not yet released at one sample: huge
    /// pages gone from `ShmemHugePages` beyond what the file's released
    /// bytes account for (a lower bound: a huge page split and then punched
    /// all but one subpage counts as released here, and splits between two
    /// samples may be missed).
    pub split_unreleased_peak: u64,
    /// Samples taken during the run.
    pub samples: u64,
}

impl KernelHuge {
    /// The figures from the counters before the file was made (`empty`),
    /// after it was populated (`start`), after the run (`end`), and the
    /// run's samples.
    pub fn from_counters(
        backing: &HugeBacking,
        huge_page_size: u64,
        empty: &HugeCounters,
        start: &HugeCounters,
        end: &HugeCounters,
        samples: &Samples,
    ) -> Option<Self> {
        let base = empty.whole(backing, huge_page_size)?;
        let whole_at_start = start.whole(backing, huge_page_size)?.saturating_sub(base);
        let whole_at_end = end
            .whole(backing, huge_page_size)?
            .saturating_sub(base)
            .min(whole_at_start);
        let split = end.thp_split_page.saturating_sub(start.thp_split_page);
        let gone = whole_at_start - whole_at_end;
        Some(KernelHuge {
            whole_at_start,
            whole_at_end,
            split,
            freed_whole: gone.saturating_sub(split),
            split_unreleased_peak: samples.split_unreleased_peak,
            samples: samples.count,
        })
    }
}

/// What a [`Sampler`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Samples {
    /// Samples taken.
    pub count: u64,
    /// The most huge pages split and not yet released at one sample (see
    /// [`KernelHuge::split_unreleased_peak`]).
    pub split_unreleased_peak: u64,
}

/// A thread sampling `ShmemHugePages` and the file's `st_blocks` about
/// every millisecond while a run goes on (see the module documentation).
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Samples>>,
}

impl Sampler {
    /// Start sampling. `start` is the reading after the file was populated,
    /// `file_bytes` reads the file's `st_blocks * 512` (0 for a file that
    /// has none, which makes the estimate count every lost huge page).
    pub fn start(
        start: HugeCounters,
        huge_page_size: u64,
        file_bytes: impl Fn() -> Option<u64> + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("hugepunch-sampler".into())
            .spawn(move || {
                let bytes0 = file_bytes().unwrap_or(0);
                let mut seen = Samples::default();
                // ORDERING: Relaxed: a stop request; nothing is published
                // through it (the samples come back through the join).
                while !flag.load(Ordering::Relaxed) {
                    if let (Some(now), Some(bytes)) = (HugeCounters::read(), file_bytes()) {
                        let lost = start.shmem_huge_bytes.saturating_sub(now.shmem_huge_bytes)
                            / huge_page_size;
                        let freed = bytes0.saturating_sub(bytes) / huge_page_size;
                        seen.count += 1;
                        seen.split_unreleased_peak =
                            seen.split_unreleased_peak.max(lost.saturating_sub(freed));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                seen
            })
            .expect("spawn the sampler thread");
        Sampler {
            stop,
            thread: Some(thread),
        }
    }

    /// Stop sampling and return what the samples saw.
    pub fn finish(mut self) -> Samples {
        self.halt()
    }

    fn halt(&mut self) -> Samples {
        // ORDERING: Relaxed: see the sampler loop.
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().unwrap_or_default())
            .unwrap_or_default()
    }
}

impl Drop for Sampler {
    /// A run that fails part-way still stops its sampler.
    fn drop(&mut self) {
        self.halt();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal: 24000000 kB\nShmemHugePages:     8192 kB\n\
        HugePages_Total:       4\nHugePages_Free:        1\nHugepagesize:       2048 kB\n";

    #[test]
    fn counters_parse() {
        let c = HugeCounters::parse(MEMINFO, "thp_split_pmd 3\nthp_split_page 7\n").unwrap();
        assert_eq!(c.shmem_huge_bytes, 8 << 20);
        assert_eq!(c.hugetlb_in_use, 3);
        assert_eq!(c.hugetlb_page_size, 2 << 20);
        assert_eq!(c.thp_split_page, 7);
        let thp = HugeBacking::Thp(String::new());
        assert_eq!(c.whole(&thp, 2 << 20), Some(4));
        assert_eq!(c.whole(&HugeBacking::None(String::new()), 2 << 20), None);
        let tlb = HugeBacking::Hugetlb(String::new());
        assert_eq!(c.whole(&tlb, 2 << 20), Some(3));
        assert_eq!(c.whole(&tlb, 1 << 30), None);
        assert_eq!(HugeCounters::parse("MemTotal: 1 kB\n", ""), None);
    }

    #[test]
    fn splits_and_whole_frees_are_told_apart() {
        let thp = HugeBacking::Thp(String::new());
        let hp = 2 << 20;
        let at = |huge: u64, split: u64| HugeCounters {
            shmem_huge_bytes: huge * hp,
            thp_split_page: split,
            ..Default::default()
        };
        // 10 huge pages before; the file adds 8; the run splits 3 and frees
        // 2 whole; 3 are left.
        let k = KernelHuge::from_counters(
            &thp,
            hp,
            &at(10, 100),
            &at(18, 100),
            &at(13, 103),
            &Samples::default(),
        )
        .unwrap();
        assert_eq!(
            (k.whole_at_start, k.whole_at_end, k.split, k.freed_whole),
            (8, 3, 3, 2)
        );
    }

    #[test]
    fn the_sampler_stops_and_counts() {
        let _watchdog = hugepunch::testing::watchdog::Watchdog::arm("the_sampler_stops_and_counts");
        let s = Sampler::start(HugeCounters::read().unwrap(), 2 << 20, || Some(0));
        std::thread::sleep(Duration::from_millis(20));
        assert!(s.finish().count > 0);
    }
}
