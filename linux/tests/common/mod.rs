//! Shared by the real-kernel tests: file makers that skip with a reason,
//! and the checks every pattern test makes.
#![allow(dead_code)]

/// The workspace's test watchdog (`hugepunch::testing::watchdog`).
#[allow(unused_imports)] // not every test binary arms one
pub use hugepunch::testing::watchdog;

use hugepunch::{ByteRange, HugePunch, SubpageState, SUBPAGE_SIZE};
use hugepunch_linux::replay::engine_allocated_bytes;
use hugepunch_linux::{Backend, LinuxHost, MemfdOptions};

/// 8 MiB: four 2 MiB huge pages (small, so the suite stays quick).
pub const SIZE: u64 = 8 << 20;
pub const HP: u64 = 2 << 20;
pub const SUB: u64 = SUBPAGE_SIZE;
/// What the file is filled with before a replay, so zeros mean something.
pub const DATA: u8 = 0xa5;

/// A fresh, populated, data-filled host of `backend`. A test of
/// guest_memfd or THP runs only where the build-time probe found the
/// backend (`needs! { guest_memfd; ... }`, `needs! { mount; ... }`), so
/// here a backend that cannot be made is a failure.
pub fn host(backend: Backend, size: u64) -> LinuxHost {
    let host = match backend {
        // Plain 4 KiB shmem: the accounting checks count 4 KiB pages.
        Backend::Memfd => {
            LinuxHost::memfd(size, MemfdOptions::default()).expect("memfd_create works on Linux")
        }
        Backend::GuestMemfd => LinuxHost::guest_memfd(size).expect("guest_memfd"),
        Backend::Thp => LinuxHost::thp(size).expect("the THP backend"),
        Backend::File(ref dir) => LinuxHost::file(dir, size).expect("a file in the directory"),
    };
    host.populate_all().expect("populate");
    host.fill(ByteRange::new(0, size), DATA);
    host
}

/// The file really holds exactly what the engine says is allocated.
pub fn assert_accounting(host: &LinuxHost, engine: &HugePunch, when: &str) {
    let real = host.resident_bytes().expect("residency");
    let said = engine_allocated_bytes(engine);
    assert_eq!(
        real, said,
        "{when}: the file holds {real:#x} bytes, the engine says {said:#x}"
    );
    assert_eq!(
        host.invalidations_open(),
        0,
        "{when}: invalidations pair up"
    );
}

/// Read one subpage without allocating anything.
pub fn subpage(host: &LinuxHost, offset: u64) -> Vec<u8> {
    let mut buf = vec![0xffu8; SUB as usize];
    host.read(offset, &mut buf).expect("read");
    buf
}

/// Subpages the engine does not count as present data (punched or absent).
pub fn not_present(engine: &HugePunch, r: ByteRange) -> Vec<u64> {
    (r.offset / SUB..r.end() / SUB)
        .map(|s| s * SUB)
        .filter(|&o| engine.subpage_state(o).unwrap() != SubpageState::Present)
        .collect()
}

/// What each subpage must read as once present: its data, or zeros once
/// it has been punched or absent (invariant 5).
pub struct Expect {
    zero: Vec<bool>,
}

impl Expect {
    /// Every subpage holds [`DATA`].
    pub fn new(size: u64) -> Self {
        Expect {
            zero: vec![false; (size / SUB) as usize],
        }
    }

    /// The subpage at `offset` was punched and populated again.
    pub fn zero(&mut self, offset: u64) {
        self.zero[(offset / SUB) as usize] = true;
    }

    /// Every subpage that is punched or absent now must read zeros once
    /// populated again.
    pub fn observe(&mut self, engine: &HugePunch) {
        for o in not_present(engine, ByteRange::new(0, engine.size())) {
            self.zero[(o / SUB) as usize] = true;
        }
    }

    /// Every present subpage reads as expected. Returns how many read zeros.
    pub fn check(&self, host: &LinuxHost, engine: &HugePunch, when: &str) -> u64 {
        let mut zeroed = 0;
        for (i, &zero) in self.zero.iter().enumerate() {
            let o = i as u64 * SUB;
            if engine.subpage_state(o).unwrap() != SubpageState::Present {
                continue;
            }
            let data = subpage(host, o);
            if zero {
                assert!(
                    data.iter().all(|&b| b == 0),
                    "{when}: punched-then-populated subpage {o:#x} does not read as zeros"
                );
                zeroed += 1;
            } else {
                assert!(
                    data.iter().all(|&b| b == DATA),
                    "{when}: subpage {o:#x} lost its data"
                );
            }
        }
        zeroed
    }
}

/// Populate `ranges` and check every present subpage of the file (see
/// [`Expect`]). Returns how many read zeros.
pub fn populate_and_check_zeros(
    host: &LinuxHost,
    engine: &HugePunch,
    expect: &mut Expect,
    ranges: &[ByteRange],
    when: &str,
) -> u64 {
    expect.observe(engine);
    for &r in ranges {
        engine.populate(r.offset, r.len).expect("populate");
    }
    let zeroed = expect.check(host, engine, when);
    assert!(zeroed > 0, "{when}: nothing punched was populated again");
    zeroed
}

/// Ranges to populate after a replay (disjoint): subpages 1..4 of every
/// huge page, and a range straddling the first two huge pages (the last
/// two subpages of the first, the first of the second).
pub fn probe_ranges(size: u64) -> Vec<ByteRange> {
    let mut v = vec![ByteRange::new(HP - 2 * SUB, 3 * SUB)];
    v.extend((0..size / HP).map(|h| ByteRange::new(h * HP + SUB, 3 * SUB)));
    v
}
