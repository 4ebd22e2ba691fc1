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
//! Both levels are flat arrays of thin pointers: a directory
//! pointer leads straight to its chunk pointers, a chunk pointer straight to
//! the chunk's first word, so finding a huge page's words is two dependent
//! loads and no bounds-checked fat pointer.
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

/// A chunk: a thin pointer to the first of its `chunk_words()` words (from
/// `Box<[AtomicU64]>::into_raw`).
type ChunkPtr = *mut AtomicU64;

pub(crate) struct Index {
    full: u32,
    /// Words per huge page, state word included.
    stride: usize,
    chunk_pages: u64,
    chunk_shift: u32,
    /// log2 of a huge page's bytes, and of a chunk's: a byte offset
    /// shifted right by them is its huge page, and its chunk.
    page_bytes_shift: u32,
    chunk_bytes_shift: u32,
    initial: u64,
    huge_pages: u64,
    n_chunks: usize,
    dirs: Box<[AtomicPtr<AtomicPtr<AtomicU64>>]>,
    /// Directory 0, installed when the index is built (at most 32 KiB: the
    /// chunk pointers of the first 4096 chunks), so that finding a huge page
    /// of a file of up to 4096 chunks (2 TiB of 2 MiB huge pages) is one
    /// load of a chunk pointer.
    dir0: *const AtomicPtr<AtomicU64>,
    /// Chunks whose pointers are in `dir0`.
    dir0_len: usize,
    /// Teardown's sentinel chunk (null until the first teardown).
    torn_chunk: AtomicPtr<AtomicU64>,
}

// SAFETY: `dir0` points to directory 0's `AtomicPtr`s (which are Send +
// Sync), owned by `dirs[0]` for the index's whole life and freed only in
// `drop`; every other field is Send + Sync.
unsafe impl Send for Index {}
// SAFETY: as for `Send`: shared access goes through the atomics only.
unsafe impl Sync for Index {}

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

/// Leak a boxed slice as a thin pointer to its first element.
fn into_thin<T>(b: Box<[T]>) -> *mut T {
    Box::into_raw(b).cast::<T>()
}

/// Take back a slice leaked by `into_thin` with its length.
///
/// # Safety
/// `p` came from `into_thin` of a slice of exactly `len` elements, and is
/// taken back once.
unsafe fn from_thin<T>(p: *mut T, len: usize) -> Box<[T]> {
    // SAFETY: per the contract, `p .. p + len` is the leaked slice.
    unsafe { Box::from_raw(ptr::slice_from_raw_parts_mut(p, len)) }
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
            page_bytes_shift: crate::range::SUBPAGE_SHIFT + geo.order() as u32,
            chunk_bytes_shift: crate::range::SUBPAGE_SHIFT
                + geo.order() as u32
                + chunk_pages.ilog2(),
            initial,
            huge_pages,
            n_chunks,
            dirs: (0..n_dirs)
                .map(|_| AtomicPtr::new(ptr::null_mut()))
                .collect(),
            dir0: ptr::null(),
            dir0_len: n_chunks.min(DIR_CHUNKS),
            torn_chunk: AtomicPtr::new(ptr::null_mut()),
        };
        let mut index = index;
        index.dir0 = index.dir(0).as_ptr();
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

    fn chunk_words(&self) -> usize {
        self.chunk_pages as usize * self.stride
    }

    fn chunk_of(&self, state: impl Fn(u64) -> u64) -> ChunkPtr {
        let words: Box<[AtomicU64]> = (0..self.chunk_words())
            .map(|i| {
                AtomicU64::new(if i % self.stride == 0 {
                    state(i as u64)
                } else {
                    0
                })
            })
            .collect();
        into_thin(words)
    }

    fn dir_len(&self, d: usize) -> usize {
        (self.n_chunks - d * DIR_CHUNKS).min(DIR_CHUNKS)
    }

    /// Load `slot`, installing `make()` if it is null; `free` drops an
    /// unpublished `make()` when another thread installed first.
    fn get_or_install<T>(
        slot: &AtomicPtr<T>,
        make: impl FnOnce() -> *mut T,
        free: impl FnOnce(*mut T),
    ) -> *mut T {
        // ORDERING: Acquire pairs with the Release of the installing CAS:
        // the installed object's initial contents are seen.
        let p = slot.load(Ordering::Acquire);
        if !p.is_null() {
            return p;
        }
        let fresh = make();
        // ORDERING: AcqRel on success: Release publishes the contents.
        // Acquire on failure: we use the winner's object and must see it.
        match slot.compare_exchange(ptr::null_mut(), fresh, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => fresh,
            Err(winner) => {
                free(fresh);
                winner
            }
        }
    }

    /// Directory `d`'s chunk pointers, installing the directory if needed.
    fn dir(&self, d: usize) -> &[AtomicPtr<AtomicU64>] {
        let len = self.dir_len(d);
        let p = Self::get_or_install(
            &self.dirs[d],
            || into_thin((0..len).map(|_| AtomicPtr::new(ptr::null_mut())).collect()),
            // SAFETY: `fresh` was never shared; it has `len` pointers.
            |fresh| drop(unsafe { from_thin(fresh, len) }),
        );
        // SAFETY: a directory is installed from a slice of `dir_len(d)`
        // pointers and freed only in `drop`, which needs `&mut self`.
        unsafe { std::slice::from_raw_parts(p, len) }
    }

    /// The chunk slot `c`, its directory installed if needed.
    fn chunk_slot(&self, c: usize) -> &AtomicPtr<AtomicU64> {
        &self.dir(c >> DIR_SHIFT)[c & (DIR_CHUNKS - 1)]
    }

    /// The chunk `c`, installing it (and its directory) if needed.
    fn chunk(&self, c: usize) -> ChunkPtr {
        let words = self.chunk_words();
        Self::get_or_install(
            self.chunk_slot(c),
            || self.chunk_of(|_| self.initial),
            // SAFETY: `fresh` was never shared; it has `words` words.
            |fresh| drop(unsafe { from_thin(fresh, words) }),
        )
    }

    fn locate(&self, h: u64) -> (usize, usize) {
        (
            (h >> self.chunk_shift) as usize,
            (h & (self.chunk_pages - 1)) as usize * self.stride,
        )
    }

    /// The huge page whose words start `at` words into `chunk`.
    ///
    /// # Safety
    /// `chunk` is a real chunk or a sentinel of this index (it has
    /// `chunk_words()` words, and lives until the index is dropped), and
    /// `at + stride <= chunk_words()`.
    #[inline]
    unsafe fn page_in(&self, chunk: ChunkPtr, at: usize) -> Page<'_> {
        // SAFETY: per the contract, words `at .. at + stride` of the chunk
        // exist and live as long as `&self`.
        unsafe {
            Page::new(
                &*chunk.add(at),
                std::slice::from_raw_parts(chunk.add(at + 1), self.stride - 1),
                self.full,
            )
        }
    }

    /// Huge page `h` (< the number of huge pages), installing its chunk if
    /// needed.
    pub fn page(&self, h: u64) -> Page<'_> {
        assert!(h < self.huge_pages, "huge page {h} out of range");
        let (c, at) = self.locate(h);
        // SAFETY: `chunk` returns a real chunk or the sentinel; `at` is
        // below `chunk_pages * stride` by `locate`.
        unsafe { self.page_in(self.chunk(c), at) }
    }

    /// The installed chunk `c`, if any (a sentinel counts).
    #[inline]
    fn existing_chunk(&self, c: usize) -> Option<ChunkPtr> {
        let slot = if c < self.dir0_len {
            // SAFETY: `dir0` is directory 0, installed in `new`, with
            // `dir0_len` chunk pointers; it lives until `drop`.
            unsafe { &*self.dir0.add(c) }
        } else {
            self.far_slot(c)?
        };
        // ORDERING: Acquire, as in `get_or_install`.
        let p = slot.load(Ordering::Acquire);
        (!p.is_null()).then_some(p)
    }

    /// The slot of chunk `c` beyond directory 0, if its directory exists.
    #[cold]
    fn far_slot(&self, c: usize) -> Option<&AtomicPtr<AtomicU64>> {
        if c >= self.n_chunks {
            return None;
        }
        // ORDERING: Acquire, as in `get_or_install`.
        let d = self.dirs[c >> DIR_SHIFT].load(Ordering::Acquire);
        if d.is_null() {
            return None;
        }
        // SAFETY: a directory has `dir_len` pointers, and `c < n_chunks`
        // puts `c & (DIR_CHUNKS - 1)` below it; it lives until `drop`.
        Some(unsafe { &*d.add(c & (DIR_CHUNKS - 1)) })
    }

    /// The huge page holding byte `offset` (inside the file) if its chunk
    /// is in directory 0 and exists: `existing` for the 4 KiB fast paths,
    /// straight from the byte offset (two shifts, one chunk-pointer load).
    /// `None` also for a chunk beyond directory 0: the caller's general
    /// path finds it.
    #[inline(always)]
    pub fn existing_at(&self, offset: u64) -> Option<Page<'_>> {
        let c = (offset >> self.chunk_bytes_shift) as usize;
        if c >= self.dir0_len {
            return None;
        }
        // SAFETY: `dir0` is directory 0, installed in `new`, with
        // `dir0_len` chunk pointers; it lives until `drop`.
        let slot = unsafe { &*self.dir0.add(c) };
        // ORDERING: Acquire, as in `get_or_install`.
        let chunk = slot.load(Ordering::Acquire);
        if chunk.is_null() {
            return None;
        }
        let at =
            ((offset >> self.page_bytes_shift) & (self.chunk_pages - 1)) as usize * self.stride;
        // SAFETY: an installed chunk (or sentinel) of this index; `at` is
        // below `chunk_pages * stride`.
        Some(unsafe { self.page_in(chunk, at) })
    }

    /// Huge page `h` if its chunk exists (`None`: it is in the initial
    /// state, or `h` is out of range).
    #[inline]
    pub fn existing(&self, h: u64) -> Option<Page<'_>> {
        let (c, at) = self.locate(h);
        let chunk = self.existing_chunk(c)?;
        // SAFETY: an installed chunk (or sentinel) of this index; `at` is
        // below `chunk_pages * stride` by `locate`.
        Some(unsafe { self.page_in(chunk, at) })
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
            .filter(move |&c| self.existing_chunk(c).is_some_and(|p| p != sentinel))
            .flat_map(|c| self.pages_of(c))
    }

    /// The sentinel chunk, installed by the first teardown.
    fn torn(&self) -> ChunkPtr {
        let words = self.chunk_words();
        Self::get_or_install(
            &self.torn_chunk,
            || self.chunk_of(|_| ABSENT | TORN),
            // SAFETY: `fresh` was never shared; it has `words` words.
            |fresh| drop(unsafe { from_thin(fresh, words) }),
        )
    }

    /// Teardown, under the file's slow-path lock: close chunk slot `c` if
    /// it is empty, and say what it held.
    pub fn close(&self, c: usize) -> Slot {
        let torn_chunk = self.torn();
        // ORDERING: AcqRel on success publishes the sentinel (whose words
        // were published by its own install); Acquire on failure: we then
        // read the chunk that is there.
        match self.chunk_slot(c).compare_exchange(
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
        let chunk = self.chunk_of(|i| {
            if still_huge.contains(&(first + i / stride)) {
                HUGE | TORN
            } else {
                ABSENT | TORN
            }
        });
        // ORDERING: Release publishes the chunk's words to readers' Acquire
        // loads; the sentinel it replaces is shared and stays alive.
        self.chunk_slot(c).store(chunk, Ordering::Release);
    }

    /// Number of chunks.
    pub fn chunks(&self) -> usize {
        self.n_chunks
    }

    /// Bytes of tracking state allocated now (index, directories, chunks;
    /// teardown's sentinels excluded).
    pub fn tracking_bytes(&self) -> usize {
        let per_chunk = self.chunk_words() * 8;
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
            let len = self.dir_len(d);
            bytes += len * 8;
            // SAFETY: as in `dir`.
            let dir = unsafe { std::slice::from_raw_parts(p, len) };
            // ORDERING: Relaxed: a statistic.
            bytes += dir
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
        let words = self.chunk_words();
        // ORDERING: Relaxed everywhere: `&mut self`, no other thread.
        let tc = self.torn_chunk.load(Ordering::Relaxed);
        for (d, slot) in self.dirs.iter().enumerate() {
            let p = slot.load(Ordering::Relaxed);
            if p.is_null() {
                continue;
            }
            // SAFETY: installed by `dir` from `dir_len(d)` pointers, once;
            // taken back once, here.
            let dir = unsafe { from_thin(p, self.dir_len(d)) };
            for c in dir.iter() {
                let p = c.load(Ordering::Relaxed);
                if is_real(p, tc) {
                    // SAFETY: installed from a slice of `words` words once
                    // (by `chunk` or `reopen`); taken back once, here.
                    drop(unsafe { from_thin(p, words) });
                }
            }
        }
        if !tc.is_null() {
            // SAFETY: the sentinel chunk, installed once, taken back once.
            drop(unsafe { from_thin(tc, words) });
        }
    }
}
