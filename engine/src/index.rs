//! Huge page number → its words. A dense index, allocated lazily in two
//! levels, so a file of a petabyte touched in a few places costs a few
//! chunks, not a word per huge page of the whole file.
//!
//! Each huge page is `1 + W` consecutive `AtomicU64`: the state word, then
//! its `W` bitmap words (72 bytes for 2 MiB at order 9). A **chunk** holds
//! the largest power of two of huge pages that fits in 32 KiB; a
//! **directory** holds up to 4096 chunk pointers. A directory or chunk that
//! was never touched stands for huge pages in the file's initial state; it
//! is installed with one CAS by the first operation that needs to change
//! one of them, and lives until the file is dropped (nothing is freed while
//! the file is shared, so no reclamation scheme is needed).
//!
//! Teardown **closes** every chunk slot that is still empty by installing
//! a shared sentinel chunk whose huge pages are all `ABSENT | TORN`: an operation
//! that was already in flight and reaches such a slot finds its huge pages
//! torn down, and teardown of a populated file never has to allocate the
//! chunks it never saw.

use crate::page::{Page, Snapshot, ABSENT, HUGE, TORN};
use crate::range::Geometry;
use crate::sync::{AtomicPtr, AtomicU64, Ordering};
use std::ptr;

const CHUNK_WORDS: usize = 4096;
const DIR_SHIFT: u32 = 12;
const DIR_CHUNKS: usize = 1 << DIR_SHIFT;

struct Chunk {
    words: Box<[AtomicU64]>,
}

struct Dir {
    chunks: Box<[AtomicPtr<Chunk>]>,
}

pub(crate) struct Index {
    full: u32,
    /// Words per huge page, state word included.
    stride: usize,
    chunk_pages: u64,
    chunk_shift: u32,
    initial: u64,
    huge_pages: u64,
    n_chunks: usize,
    dirs: Box<[AtomicPtr<Dir>]>,
    /// Teardown's sentinel chunk (null until the first teardown).
    torn_chunk: AtomicPtr<Chunk>,
}

/// What teardown found in one chunk slot.
pub(crate) enum Slot {
    /// The slot was empty and is now closed: its huge pages were in the
    /// initial state, and no operation can touch them any more.
    Closed(std::ops::Range<u64>),
    /// A chunk operations may be using: tear its huge pages down one by one.
    Live(std::ops::Range<u64>),
    /// Closed by an earlier teardown.
    Gone,
}

/// Is `p` a real chunk (neither null nor the sentinel)?
fn is_real<T>(p: *mut T, sentinel: *mut T) -> bool {
    !p.is_null() && p != sentinel
}

impl Index {
    pub fn new(geo: Geometry, populated: bool) -> Self {
        let full = geo.subpages_per_huge_page();
        let stride = 1 + (full as usize).div_ceil(64);
        // A power of two, so locating a huge page is a shift and a mask.
        let huge_pages = geo.huge_pages();
        // No larger than the file needs (a small file, or a loom model,
        // allocates only its own huge pages).
        let chunk_pages =
            (1u64 << (CHUNK_WORDS / stride).max(1).ilog2()).min(huge_pages.next_power_of_two());
        let n_chunks = huge_pages.div_ceil(chunk_pages) as usize;
        let n_dirs = n_chunks.div_ceil(DIR_CHUNKS);
        let initial = if populated { HUGE } else { ABSENT };
        let index = Index {
            full,
            stride,
            chunk_pages,
            chunk_shift: chunk_pages.ilog2(),
            initial,
            huge_pages,
            n_chunks,
            dirs: (0..n_dirs)
                .map(|_| AtomicPtr::new(ptr::null_mut()))
                .collect(),
            torn_chunk: AtomicPtr::new(ptr::null_mut()),
        };
        if n_chunks == 1 {
            // A file that fits in one chunk gains nothing from laziness (and
            // loom models explore fewer interleavings without it).
            index.chunk(0);
        }
        index
    }

    /// The state a never-touched huge page is in.
    pub fn initial(&self) -> Snapshot {
        Snapshot(self.initial)
    }

    fn chunk_of(&self, state: impl Fn(u64) -> u64) -> Box<Chunk> {
        let words = (0..self.chunk_pages as usize * self.stride)
            .map(|i| {
                AtomicU64::new(if i % self.stride == 0 {
                    state(i as u64)
                } else {
                    0
                })
            })
            .collect();
        Box::new(Chunk { words })
    }

    fn dir_len(&self, d: usize) -> usize {
        (self.n_chunks - d * DIR_CHUNKS).min(DIR_CHUNKS)
    }

    /// Load `slot`, installing `make()` if it is null.
    fn get_or_install<T>(slot: &AtomicPtr<T>, make: impl FnOnce() -> Box<T>) -> &T {
        // ORDERING: Acquire pairs with the Release of the installing CAS:
        // the installed object's initial contents are seen.
        let p = slot.load(Ordering::Acquire);
        if !p.is_null() {
            // SAFETY: a non-null pointer was installed from Box::into_raw
            // (or is a sentinel) and is freed only in `drop`, which needs
            // `&mut self`.
            return unsafe { &*p };
        }
        let fresh = Box::into_raw(make());
        // ORDERING: AcqRel on success: Release publishes the contents.
        // Acquire on failure: we use the winner's object and must see it.
        match slot.compare_exchange(ptr::null_mut(), fresh, Ordering::AcqRel, Ordering::Acquire) {
            // SAFETY: we just installed `fresh`; it lives until `drop`.
            Ok(_) => unsafe { &*fresh },
            Err(winner) => {
                // SAFETY: `fresh` was never shared; we own it.
                drop(unsafe { Box::from_raw(fresh) });
                // SAFETY: as for `p` above.
                unsafe { &*winner }
            }
        }
    }

    fn dir(&self, d: usize) -> &Dir {
        let len = self.dir_len(d);
        Self::get_or_install(&self.dirs[d], || {
            Box::new(Dir {
                chunks: (0..len).map(|_| AtomicPtr::new(ptr::null_mut())).collect(),
            })
        })
    }

    /// The chunk `c`, installing it (and its directory) if needed.
    fn chunk(&self, c: usize) -> &Chunk {
        let dir = self.dir(c >> DIR_SHIFT);
        Self::get_or_install(&dir.chunks[c & (DIR_CHUNKS - 1)], || {
            self.chunk_of(|_| self.initial)
        })
    }

    fn locate(&self, h: u64) -> (usize, usize) {
        (
            (h >> self.chunk_shift) as usize,
            (h & (self.chunk_pages - 1)) as usize * self.stride,
        )
    }

    fn page_in<'a>(&self, chunk: &'a Chunk, at: usize) -> Page<'a> {
        let words = &chunk.words[at..at + self.stride];
        Page::new(&words[0], &words[1..], self.full)
    }

    /// Huge page `h`, installing its chunk if needed.
    pub fn page(&self, h: u64) -> Page<'_> {
        let (c, at) = self.locate(h);
        self.page_in(self.chunk(c), at)
    }

    /// The installed chunk `c`, if any (a sentinel counts).
    fn existing_chunk(&self, c: usize) -> Option<&Chunk> {
        // ORDERING: Acquire, as in `get_or_install`.
        let d = self.dirs[c >> DIR_SHIFT].load(Ordering::Acquire);
        if d.is_null() {
            return None;
        }
        // SAFETY: as in `get_or_install`.
        let dir: &Dir = unsafe { &*d };
        // ORDERING: Acquire, as in `get_or_install`.
        let p = dir.chunks[c & (DIR_CHUNKS - 1)].load(Ordering::Acquire);
        // SAFETY: as in `get_or_install`.
        (!p.is_null()).then(|| unsafe { &*p })
    }

    /// Huge page `h` if its chunk exists (`None`: it is in the initial state).
    pub fn existing(&self, h: u64) -> Option<Page<'_>> {
        let (c, at) = self.locate(h);
        self.existing_chunk(c).map(|chunk| self.page_in(chunk, at))
    }

    fn pages_of(&self, c: usize) -> std::ops::Range<u64> {
        let start = c as u64 * self.chunk_pages;
        start..(start + self.chunk_pages).min(self.huge_pages)
    }

    /// The huge page numbers of every installed (not closed) chunk.
    pub fn touched(&self) -> impl Iterator<Item = u64> + '_ {
        // ORDERING: Relaxed: only deciding whether to visit; `existing`
        // re-loads with Acquire before reading words.
        let sentinel = self.torn_chunk.load(Ordering::Relaxed);
        (0..self.n_chunks)
            .filter(move |&c| {
                self.existing_chunk(c)
                    .is_some_and(|p| !ptr::eq(p, sentinel))
            })
            .flat_map(|c| self.pages_of(c))
    }

    /// Teardown, under the file's slow-path lock: close chunk slot `c` if
    /// it is empty, and say what it held.
    pub fn close(&self, c: usize) -> Slot {
        let torn_chunk = Self::get_or_install(&self.torn_chunk, || self.chunk_of(|_| ABSENT | TORN))
            as *const Chunk as *mut Chunk;
        let dir = self.dir(c >> DIR_SHIFT);
        // ORDERING: AcqRel on success publishes the sentinel (whose words
        // were published by its own install); Acquire on failure: we then
        // read the chunk that is there.
        match dir.chunks[c & (DIR_CHUNKS - 1)].compare_exchange(
            ptr::null_mut(),
            torn_chunk,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => Slot::Closed(self.pages_of(c)),
            Err(p) if p == torn_chunk => Slot::Gone,
            Err(_) => Slot::Live(self.pages_of(c)),
        }
    }

    /// Teardown could not free some huge pages of a chunk it closed: put a
    /// real chunk in its place recording them (`HUGE | TORN`, the others
    /// `ABSENT | TORN`), so a later teardown retries them. Only teardown
    /// writes closed slots.
    pub fn reopen(&self, c: usize, still_huge: &[u64]) {
        let first = c as u64 * self.chunk_pages;
        let stride = self.stride as u64;
        let chunk = Box::into_raw(self.chunk_of(|i| {
            if still_huge.contains(&(first + i / stride)) {
                HUGE | TORN
            } else {
                ABSENT | TORN
            }
        }));
        let dir = self.dir(c >> DIR_SHIFT);
        // ORDERING: Release publishes the chunk's words to readers' Acquire
        // loads; the sentinel it replaces is shared and stays alive.
        dir.chunks[c & (DIR_CHUNKS - 1)].store(chunk, Ordering::Release);
    }

    /// Number of chunks.
    pub fn chunks(&self) -> usize {
        self.n_chunks
    }

    /// Bytes of tracking state allocated now (index, directories, chunks;
    /// teardown's sentinels excluded).
    pub fn tracking_bytes(&self) -> usize {
        let per_chunk = std::mem::size_of::<Chunk>() + self.chunk_pages as usize * self.stride * 8;
        // ORDERING: Relaxed: a statistic.
        let tc = self.torn_chunk.load(Ordering::Relaxed);
        let mut bytes = std::mem::size_of_val(&*self.dirs);
        for (d, slot) in self.dirs.iter().enumerate() {
            // ORDERING: Acquire, as in `get_or_install`: we read the
            // directory's pointers.
            let p = slot.load(Ordering::Acquire);
            if p.is_null() {
                continue;
            }
            bytes += std::mem::size_of::<Dir>() + self.dir_len(d) * 8;
            // SAFETY: as in `get_or_install`.
            let dir: &Dir = unsafe { &*p };
            // ORDERING: Relaxed: a statistic.
            bytes += dir
                .chunks
                .iter()
                .filter(|c| is_real(c.load(Ordering::Relaxed), tc))
                .count()
                * per_chunk;
        }
        bytes
    }
}

impl Drop for Index {
    fn drop(&mut self) {
        // ORDERING: Relaxed everywhere: `&mut self`, no other thread.
        let tc = self.torn_chunk.load(Ordering::Relaxed);
        for slot in self.dirs.iter() {
            let d = slot.load(Ordering::Relaxed);
            if d.is_null() {
                continue;
            }
            // SAFETY: installed from Box::into_raw once; dropped once here.
            let dir = unsafe { Box::from_raw(d) };
            for c in dir.chunks.iter() {
                let p = c.load(Ordering::Relaxed);
                if is_real(p, tc) {
                    // SAFETY: installed from Box::into_raw once; dropped once.
                    drop(unsafe { Box::from_raw(p) });
                }
            }
        }
        if !tc.is_null() {
            // SAFETY: the sentinel chunk, installed once, dropped once.
            drop(unsafe { Box::from_raw(tc) });
        }
    }
}
