//! [`Mapping`]: a shared mapping of a whole file (guest memory), made
//! 2 MiB aligned, reached only by volatile accesses, unmapped on drop.
//!
//! # Guest memory is accessed only with volatile accesses
//!
//! [`Mapping`] is a shared mapping of guest memory: the guest (through a
//! KVM memslot), the kernel (a punch turns a page into a hole under our
//! feet) and any other process mapping the file may change it at any
//! moment, so the compiler may assume nothing about it (STYLE.md rule 13,
//! after rust-vmm vm-memory's `VolatileSlice`). No `&`/`&mut` reference to
//! it is ever made; every byte is read or written with
//! `ptr::read_volatile` / `ptr::write_volatile`: 8-byte words where the
//! address is 8-byte aligned, single bytes at the unaligned edges. Memory
//! that no Rust allocation owns, reached only by volatile accesses, is the
//! second case of `read_volatile`'s documentation (I/O memory): a
//! concurrent change by another agent is not a data race of the Rust
//! abstract machine, and no access is elided, merged or torn into
//! something wider. (Volatile accesses are not atomic: two threads of this
//! process writing the same bytes at once still get whichever bytes land
//! last, which the engine's protocol rules out for the ranges it zeroes.)

use super::errno;
use super::fd::SizedFile;
use hugepunch::ByteRange;
use rustix::fd::AsFd;
use rustix::mm::{Advice, MapFlags, ProtFlags};
use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::Arc;

/// Where every [`Mapping`] starts: a multiple of 2 MiB.
pub const MAPPING_ALIGN: usize = 2 << 20;

/// A `MAP_SHARED` read-write mapping of a whole file, unmapped on drop.
/// Guest memory: every access is volatile (see the module documentation)
/// and no reference into it is ever handed out.
pub struct Mapping {
    ptr: NonNull<c_void>,
    len: usize,
}

// SAFETY: the mapping is memory outside every Rust allocation with no
// thread affinity; `Mapping` owns it (unmapped once, in `drop`) and hands
// out no reference into it, only copies made by the volatile accesses
// below, which are sound from any thread (the kernel keeps a MAP_SHARED
// mapping coherent between threads, processes and the guest).
unsafe impl Send for Mapping {}
// SAFETY: as for `Send`: a shared `&Mapping` allows only the methods below,
// none of which relies on being the only user of the memory.
unsafe impl Sync for Mapping {}

/// Write `byte` to `len` bytes at `dst` with volatile stores: one byte at a
/// time up to 8-byte alignment, 8-byte words, then the tail a byte at a
/// time (the access pattern of vm-memory's `VolatileSlice`).
///
/// # Safety
///
/// `dst .. dst + len` lies inside one live, writable mapping that no Rust
/// allocation owns and no reference points into.
unsafe fn volatile_fill(dst: *mut u8, byte: u8, len: usize) {
    let word = u64::from_ne_bytes([byte; 8]);
    let head = (dst as usize).wrapping_neg() % 8;
    let head = head.min(len);
    let words = (len - head) / 8;
    // SAFETY: each access below is at an offset below `len`, or is an
    // 8-byte word that ends at most at `len`, so inside the range the caller
    // vouches for; the words start at `dst + head`, which is 8-byte aligned.
    unsafe {
        for i in 0..head {
            std::ptr::write_volatile(dst.add(i), byte);
        }
        let aligned = dst.add(head).cast::<u64>();
        for w in 0..words {
            std::ptr::write_volatile(aligned.add(w), word);
        }
        for i in head + words * 8..len {
            std::ptr::write_volatile(dst.add(i), byte);
        }
    }
}

/// Copy `buf.len()` bytes at `src` into `buf` with volatile loads, in the
/// same pattern as [`volatile_fill`]; `buf`, ordinary Rust memory, is
/// written with plain stores.
///
/// # Safety
///
/// `src .. src + buf.len()` lies inside one live, readable mapping that no
/// Rust allocation owns (so it cannot overlap `buf`).
unsafe fn volatile_read(src: *const u8, buf: &mut [u8]) {
    let len = buf.len();
    let head = ((src as usize).wrapping_neg() % 8).min(len);
    let (edge, rest) = buf.split_at_mut(head);
    // SAFETY: each access below is at an offset below `len`, or is an
    // 8-byte word that ends at most at `len`, so inside the range the caller
    // vouches for; the words start at `src + head`, which is 8-byte aligned.
    unsafe {
        for (i, b) in edge.iter_mut().enumerate() {
            *b = std::ptr::read_volatile(src.add(i));
        }
        let aligned = src.add(head).cast::<u64>();
        let mut words = rest.chunks_exact_mut(8);
        for (w, out) in (&mut words).enumerate() {
            out.copy_from_slice(&std::ptr::read_volatile(aligned.add(w)).to_ne_bytes());
        }
        let tail = words.into_remainder();
        let at = len - tail.len();
        for (i, b) in tail.iter_mut().enumerate() {
            *b = std::ptr::read_volatile(src.add(at + i));
        }
    }
}

impl Mapping {
    /// Map `len` bytes of `fd` from offset 0, shared, read-write.
    ///
    /// # Safety
    ///
    /// The file must hold at least `len` bytes for as long as the mapping
    /// exists, and be one whose pages any access may fault in (a memfd, or
    /// a guest_memfd created `MMAP | INIT_SHARED`): an access to a page past
    /// the end of a truncated file, or to guest_memfd memory that is not
    /// shared, raises SIGBUS, and a volatile access to memory outside every
    /// Rust allocation must not trap (`ptr::read_volatile`).
    ///
    /// The mapping starts on a 2 MiB boundary ([`MAPPING_ALIGN`]): a huge
    /// page of the file can then be mapped by one page-table entry (a PMD),
    /// and KVM maps guest memory with 2 MiB pages only where the VMM's
    /// mapping does. (The kernel chooses such an address for a file of a
    /// `huge=` tmpfs by itself, but not for every file; QEMU's mapping of a
    /// tmpfs file is 4 KiB aligned, and a guest faulting it in gets no huge
    /// page.) Made by reserving `len + 2 MiB` of address space
    /// (`PROT_NONE`, anonymous), mapping the file over its first aligned
    /// address (`MAP_FIXED`), and unmapping the rest of the reservation.
    pub unsafe fn new(fd: impl AsFd, len: usize) -> Result<Self, i32> {
        let align = MAPPING_ALIGN;
        let span = len.checked_add(align).ok_or(libc::ENOMEM)?;
        // SAFETY: a fresh anonymous reservation at an address the kernel
        // chooses (null hint, no MAP_FIXED): nothing existing is aliased
        // or replaced, and no Rust object lives in it; it is inaccessible
        // (PROT_NONE) until the file is mapped over part of it.
        let base = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                span,
                ProtFlags::empty(),
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        }
        .map_err(errno)?;
        let head = (base as usize).wrapping_neg() % align;
        let at = base.cast::<u8>().wrapping_add(head).cast::<c_void>();
        // SAFETY: `at .. at + len` lies inside the reservation just made
        // (head < align, so head + len <= span), which this function owns
        // and no Rust object lives in: MAP_FIXED replaces only that
        // reservation. The file is mapped shared, read-write, from offset 0.
        let mapped = unsafe {
            rustix::mm::mmap(
                at,
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::FIXED,
                fd.as_fd(),
                0,
            )
        };
        let tail = span - head - len;
        // SAFETY: the head and tail of the reservation (outside the file's
        // mapping, inside the reservation) are unmapped; nothing uses them.
        // On failure the whole reservation goes.
        unsafe {
            match &mapped {
                Ok(_) => {
                    if head > 0 {
                        let _ = rustix::mm::munmap(base, head);
                    }
                    if tail > 0 {
                        let _ = rustix::mm::munmap(at.cast::<u8>().add(len).cast(), tail);
                    }
                }
                Err(_) => {
                    let _ = rustix::mm::munmap(base, span);
                }
            }
        }
        let ptr = mapped.map_err(errno)?;
        let ptr = NonNull::new(ptr).ok_or(libc::ENOMEM)?;
        Ok(Mapping { ptr, len })
    }

    /// Map the whole of `file`, shared, read-write ([`Mapping::new`]'s
    /// mapping, without its precondition to prove: a [`SizedFile`] is one).
    pub fn of(file: &SizedFile) -> Result<Self, i32> {
        let len = usize::try_from(file.size()).map_err(|_| libc::EFBIG)?;
        // SAFETY: a `SizedFile` holds `file.size()` bytes from when it is
        // made, and no code of this crate changes its length (it has no
        // method that would, and its descriptor is owned inside it); a
        // truncation by an outside holder of the file raises SIGBUS and
        // ends the process (`SizedFile`'s documentation). Its pages fault
        // in on any access: memfds and regular files do, and the only
        // guest_memfd a `SizedFile` holds is created `MMAP | INIT_SHARED`
        // (`Kvm::shared_guest_memfd`). One trap remains, on hugetlb backing
        // only: a hole touched before an `fallocate` allocates it needs a
        // free huge page, and raises SIGBUS (ending the process, corrupting
        // nothing) if the reserved pool is empty; the host's callbacks
        // touch only memory they allocated first.
        unsafe { Mapping::new(file, len) }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Is it empty? (Never: a mapping has at least one page.)
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Start address.
    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// Panics unless `r` lies inside the mapping.
    fn check(&self, r: ByteRange) {
        assert!(
            r.offset
                .checked_add(r.len)
                .is_some_and(|end| end <= self.len as u64),
            "range {r:?} outside the mapping"
        );
    }

    /// The address of byte `offset` (inside the mapping: checked by the
    /// caller).
    fn at(&self, offset: u64) -> *mut u8 {
        self.ptr.as_ptr().cast::<u8>().wrapping_add(offset as usize)
    }

    /// Zero `r` through the mapping, with volatile stores. The pages stay
    /// what they were (a resident huge folio stays whole); a hole would be
    /// allocated.
    pub fn zero(&self, r: ByteRange) {
        self.fill(r, 0);
    }

    /// Fill `r` with `byte` through the mapping, with volatile stores
    /// (tests: make data visible).
    pub fn fill(&self, r: ByteRange, byte: u8) {
        self.check(r);
        // SAFETY: `r` lies inside the live, writable mapping (checked
        // above), memory no Rust allocation owns and no reference points
        // into (`Mapping` hands none out).
        unsafe { volatile_fill(self.at(r.offset), byte, r.len as usize) }
    }

    /// Copy `buf.len()` bytes at `offset` out of the mapping, with volatile
    /// loads. Touching a hole through a shared mapping allocates it: read
    /// only resident memory.
    pub fn read(&self, offset: u64, buf: &mut [u8]) {
        self.check(ByteRange::new(offset, buf.len() as u64));
        // SAFETY: the source lies inside the live, readable mapping (checked
        // above), memory no Rust allocation owns, so it cannot overlap
        // `buf`, an exclusively borrowed Rust buffer.
        unsafe { volatile_read(self.at(offset), buf) }
    }

    /// Write `words` at `offset` (8-byte aligned) with volatile stores.
    pub fn write_u64s(&self, offset: u64, words: &[u64]) {
        assert!(offset.is_multiple_of(8), "unaligned offset {offset:#x}");
        self.check(ByteRange::new(offset, words.len() as u64 * 8));
        let dst = self.at(offset).cast::<u64>();
        for (i, w) in words.iter().enumerate() {
            // SAFETY: `dst + i` is an 8-byte-aligned word inside the live,
            // writable mapping (offset aligned and the range checked above;
            // the mapping starts page-aligned), memory no Rust allocation
            // owns and no reference points into.
            unsafe { std::ptr::write_volatile(dst.add(i), *w) };
        }
    }

    /// Write `bytes` at `offset` with volatile stores.
    pub fn write_bytes(&self, offset: u64, bytes: &[u8]) {
        self.check(ByteRange::new(offset, bytes.len() as u64));
        for (i, b) in bytes.iter().enumerate() {
            // SAFETY: inside the live, writable mapping (checked above).
            unsafe { std::ptr::write_volatile(self.at(offset + i as u64), *b) };
        }
    }

    /// Fault in every 4 KiB page of `r` through the mapping, for reading:
    /// one `madvise(MADV_POPULATE_READ)` (Linux 5.14), or, where the kernel
    /// refuses it, one volatile byte read per page (guest_memfd clears a
    /// folio and marks it up to date at its first fault).
    pub fn touch(&self, r: ByteRange) {
        self.check(r);
        let start = self.at(r.offset & !4095);
        let len = (r.end() - (r.offset & !4095)) as usize;
        // SAFETY: the range lies inside our own live mapping (checked above,
        // rounded down to its page); MADV_POPULATE_READ only faults pages in
        // for reading, as the reads below would, and never changes contents.
        let populated =
            unsafe { rustix::mm::madvise(start.cast(), len, Advice::LinuxPopulateRead) };
        if populated.is_ok() {
            return;
        }
        for off in (r.offset..r.end()).step_by(4096) {
            // SAFETY: `off` lies inside the live, readable mapping (checked
            // above); a volatile read of one byte of it needs no aliasing
            // guarantee and keeps the fault from being optimised away.
            unsafe { std::ptr::read_volatile(self.at(off)) };
        }
    }

    /// `madvise(MADV_HUGEPAGE)` over the whole mapping.
    pub fn advise_hugepage(&self) -> Result<(), i32> {
        // SAFETY: the range is exactly our own live mapping; MADV_HUGEPAGE
        // only changes how later faults allocate, never the contents.
        unsafe { rustix::mm::madvise(self.ptr.as_ptr(), self.len, Advice::LinuxHugepage) }
            .map_err(errno)
    }

    /// How many 4 KiB pages of `r` are resident in the file's page cache
    /// (`mincore`; for a shared file mapping it reports the file's pages,
    /// mapped or not). `r.offset` must be page aligned (`EINVAL`
    /// otherwise).
    pub fn resident_pages(&self, r: ByteRange) -> Result<u64, i32> {
        self.check(r);
        let pages = r.len.div_ceil(4096) as usize;
        let mut vec = vec![0u8; pages];
        // SAFETY: the address range is inside our live mapping (checked
        // above). mincore refuses an address that is not page aligned
        // (EINVAL, writing nothing); for an aligned one it writes one byte
        // per page of `len` rounded up to the page size, at most
        // `len.div_ceil(4096)` bytes since pages are at least 4 KiB: `vec`
        // holds that many.
        let ret =
            unsafe { libc::mincore(self.at(r.offset).cast(), r.len as usize, vec.as_mut_ptr()) };
        if ret != 0 {
            return Err(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO));
        }
        Ok(vec.iter().filter(|&&b| b & 1 != 0).count() as u64)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr .. ptr + len` is the mapping `new` created, unmapped
        // exactly once, here. No Rust reference into it exists (every method
        // copies in or out), and no memslot points into it any more: a
        // memslot holds an `Arc<Mapping>` until it is deleted (see `Kvm`).
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr(), self.len) };
    }
}

/// A fresh private memfd of `size` bytes, mapped: ordinary memory for a
/// VM's own memslot (the guest's code and page tables). Returns the file
/// and its mapping.
pub fn private_memory(name: &str, size: u64) -> Result<(SizedFile, Arc<Mapping>), i32> {
    let file = SizedFile::memfd(name, size, false)?;
    let map = Mapping::of(&file)?;
    Ok((file, Arc::new(map)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::{pread_exact, punch_hole};

    /// A fresh memfd of `len` bytes and a mapping of it.
    fn mapped(len: usize) -> (SizedFile, Arc<Mapping>) {
        private_memory("sys-test", len as u64).expect("memfd_create + mmap")
    }

    /// The volatile fill and read against a plain byte-by-byte oracle, at
    /// every alignment of start and end around a word.
    #[test]
    fn volatile_fill_and_read_match_the_naive_oracle() {
        const LEN: usize = 4096;
        let (_fd, map) = mapped(LEN);
        assert_eq!(
            map.addr() % MAPPING_ALIGN,
            0,
            "mappings start 2 MiB aligned"
        );
        let mut oracle = vec![0u8; LEN];
        let mut step = 0u8;
        for offset in 0..24usize {
            for len in 0..40usize {
                step = step.wrapping_add(1).max(1);
                let at = 1000 + offset;
                map.fill(ByteRange::new(at as u64, len as u64), step);
                oracle[at..at + len].fill(step);
                let mut whole = vec![0u8; LEN];
                map.read(0, &mut whole);
                assert_eq!(whole, oracle, "fill of {len} bytes at {at}");
                let mut part = vec![0u8; len + 3];
                map.read((at - 1) as u64, &mut part);
                assert_eq!(part[..], oracle[at - 1..at + len + 2], "read at {at}");
            }
        }
        map.zero(ByteRange::new(0, LEN as u64));
        let mut whole = vec![1u8; LEN];
        map.read(0, &mut whole);
        assert!(whole.iter().all(|&b| b == 0));
    }

    #[test]
    #[should_panic(expected = "outside the mapping")]
    fn access_past_the_end_panics() {
        let (_fd, map) = mapped(4096);
        map.fill(ByteRange::new(4090, 7), 1);
    }

    /// What is written through the mapping is what the file holds (pread),
    /// and the other way round.
    #[test]
    fn the_mapping_and_the_file_agree() {
        let (fd, map) = mapped(8192);
        map.fill(ByteRange::new(4093, 6), 0x5a);
        let mut buf = [0u8; 8];
        pread_exact(&fd, &mut buf, 4092).unwrap();
        assert_eq!(buf, [0, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0]);
        punch_hole(&fd, 4096, 4096).unwrap();
        let mut back = [0xffu8; 8];
        map.read(4092, &mut back);
        assert_eq!(
            back,
            [0, 0x5a, 0x5a, 0x5a, 0, 0, 0, 0],
            "a hole reads as zeros"
        );
    }
}
