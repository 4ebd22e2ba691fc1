//! Huge page number → its words. A dense index, allocated lazily in chunks,
//! so a file of a terabyte that is touched in a few places costs a few
//! chunks, not a word per subpage of the whole file.
//!
//! Each huge page is `1 + W` consecutive `AtomicU64`: the state word, then
//! its `W` bitmap words (72 bytes for 2 MiB at order 9). A chunk holds the
//! largest power of two of huge pages that fits in 32 KiB. A chunk that was never touched
//! stands for huge pages in the file's initial state; it is installed with
//! one CAS by the first operation that needs to change one of them, and
//! lives until the file is dropped (chunks are never freed while the file
//! is shared, so no reclamation scheme is needed).

use crate::page::{Page, Snapshot, ABSENT, HUGE};
use crate::range::Geometry;
use crate::sync::{AtomicPtr, AtomicU64, Ordering};
use std::ptr;

const CHUNK_WORDS: usize = 4096;

struct Chunk {
    words: Box<[AtomicU64]>,
}

pub(crate) struct Index {
    full: u32,
    /// Words per huge page, state word included.
    stride: usize,
    chunk_pages: u64,
    chunk_shift: u32,
    initial: u64,
    chunks: Box<[AtomicPtr<Chunk>]>,
}

impl Index {
    pub fn new(geo: Geometry, populated: bool) -> Self {
        let full = geo.subpages_per_huge_page();
        let stride = 1 + (full as usize).div_ceil(64);
        // A power of two, so locating a huge page is a shift and a mask.
        let chunk_pages = 1u64 << (CHUNK_WORDS / stride).max(1).ilog2();
        let n_chunks = geo.huge_pages().div_ceil(chunk_pages) as usize;
        let initial = if populated { HUGE } else { ABSENT };
        let chunks = (0..n_chunks)
            .map(|_| AtomicPtr::new(ptr::null_mut()))
            .collect();
        let index = Index {
            full,
            stride,
            chunk_pages,
            chunk_shift: chunk_pages.ilog2(),
            initial,
            chunks,
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

    fn new_chunk(&self) -> Box<Chunk> {
        let words = (0..self.chunk_pages as usize * self.stride)
            .map(|i| {
                AtomicU64::new(if i % self.stride == 0 {
                    self.initial
                } else {
                    0
                })
            })
            .collect();
        Box::new(Chunk { words })
    }

    /// The chunk `c`, installing it if needed.
    fn chunk(&self, c: usize) -> &Chunk {
        // ORDERING: Acquire pairs with the Release of the installing CAS:
        // the chunk's initial words are seen.
        let p = self.chunks[c].load(Ordering::Acquire);
        if !p.is_null() {
            // SAFETY: a non-null pointer was installed from Box::into_raw
            // and is freed only in `drop`, which needs `&mut self`.
            return unsafe { &*p };
        }
        let fresh = Box::into_raw(self.new_chunk());
        // ORDERING: AcqRel on success: Release publishes the chunk's words,
        // Acquire is harmless. Acquire on failure: we use the winner's
        // chunk and must see its words.
        match self.chunks[c].compare_exchange(
            ptr::null_mut(),
            fresh,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
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

    fn locate(&self, h: u64) -> (usize, usize) {
        (
            (h >> self.chunk_shift) as usize,
            (h & (self.chunk_pages - 1)) as usize * self.stride,
        )
    }

    /// Huge page `h`, installing its chunk if needed.
    pub fn page(&self, h: u64) -> Page<'_> {
        let (c, at) = self.locate(h);
        let words = &self.chunk(c).words[at..at + self.stride];
        Page::new(&words[0], &words[1..], self.full)
    }

    /// Huge page `h` if its chunk exists (`None`: it is in the initial state).
    pub fn existing(&self, h: u64) -> Option<Page<'_>> {
        let (c, at) = self.locate(h);
        // ORDERING: Acquire, as in `chunk`.
        let p = self.chunks[c].load(Ordering::Acquire);
        if p.is_null() {
            return None;
        }
        // SAFETY: as in `chunk`.
        let chunk: &Chunk = unsafe { &*p };
        let words = &chunk.words[at..at + self.stride];
        Some(Page::new(&words[0], &words[1..], self.full))
    }

    /// The huge page numbers of every installed chunk, ascending.
    pub fn touched(&self, huge_pages: u64) -> impl Iterator<Item = u64> + '_ {
        (0..self.chunks.len()).flat_map(move |c| {
            // ORDERING: Relaxed: only deciding whether to visit; `existing`
            // re-loads with Acquire before reading words.
            let installed = !self.chunks[c].load(Ordering::Relaxed).is_null();
            let start = c as u64 * self.chunk_pages;
            let end = if installed {
                (start + self.chunk_pages).min(huge_pages)
            } else {
                start
            };
            start..end
        })
    }

    /// Bytes of tracking state allocated now (index and installed chunks).
    pub fn tracking_bytes(&self) -> usize {
        let per_chunk = std::mem::size_of::<Chunk>() + self.chunk_pages as usize * self.stride * 8;
        // ORDERING: Relaxed: a statistic.
        let installed = self
            .chunks
            .iter()
            .filter(|c| !c.load(Ordering::Relaxed).is_null())
            .count();
        std::mem::size_of_val(&*self.chunks) + installed * per_chunk
    }
}

impl Drop for Index {
    fn drop(&mut self) {
        for c in self.chunks.iter() {
            // ORDERING: Relaxed: `&mut self`, no other thread can touch it.
            let p = c.load(Ordering::Relaxed);
            if !p.is_null() {
                // SAFETY: installed from Box::into_raw once; dropped once here.
                drop(unsafe { Box::from_raw(p) });
            }
        }
    }
}
