//! The guest: its code ([`GUEST_CODE`], source in `guest.S`), the exits it
//! makes and the script entries it reads, the system memslot's layout, and
//! the scripts and image the VMM writes there (see the module
//! documentation of [`vm`](super)).

use super::VmOptions;
use hugepunch::SUBPAGE_SIZE;
use hugepunch_workload::Op;

/// The guest's code: a script interpreter (source: `vm/guest.S`, assembled
/// with `as --64` and `objcopy -O binary`; a test re-assembles it where
/// binutils are installed and compares).
pub const GUEST_CODE: [u8; 130] = [
    0x48, 0x8b, 0x06, 0x48, 0x8b, 0x5e, 0x08, 0x48, 0x83, 0xc6, 0x10, 0x48, 0x83, 0xf8, 0x01, 0x74,
    0x2a, 0x48, 0x83, 0xf8, 0x02, 0x74, 0x3f, 0x48, 0x83, 0xf8, 0x03, 0x74, 0x45, 0x48, 0x83, 0xf8,
    0x04, 0x74, 0x0c, 0x48, 0x83, 0xf8, 0x05, 0x75, 0x0c, 0x41, 0x89, 0x46, 0x28, 0xeb, 0xd1, 0x41,
    0x89, 0x46, 0x20, 0xeb, 0xcb, 0x41, 0x89, 0x46, 0x18, 0xeb, 0xfa, 0x48, 0x89, 0xdf, 0xb9, 0x00,
    0x02, 0x00, 0x00, 0x48, 0x89, 0xf8, 0x4c, 0x31, 0xf8, 0x48, 0x89, 0x07, 0x48, 0x83, 0xc7, 0x08,
    0xff, 0xc9, 0x75, 0xef, 0xeb, 0xaa, 0x48, 0x89, 0xd8, 0x48, 0xc1, 0xe8, 0x0c, 0x41, 0x89, 0x06,
    0xeb, 0x9e, 0x48, 0x89, 0xd8, 0x48, 0xc1, 0xe8, 0x0c, 0x41, 0x89, 0x46, 0x08, 0x48, 0x89, 0xdf,
    0xb9, 0x00, 0x02, 0x00, 0x00, 0x31, 0xc0, 0xf3, 0x48, 0xaf, 0x74, 0xbf, 0x41, 0x89, 0x46, 0x10,
    0xeb, 0xb9,
];

/// Guest physical address of the system memslot (code, page tables,
/// scripts): 256 GiB, above any guest memory size `hugepunch vm` takes.
pub const SYSTEM_GPA: u64 = 256 << 30;
/// Largest guest memory: what the guest page tables map (64 GiB).
pub const MAX_SIZE: u64 = 64 << 30;

/// The guest's exits: MMIO writes to `MMIO_GPA + 8 * n` (no memslot backs
/// that page, so each write exits to the VMM with its address and data).
pub(super) const MMIO_GPA: u64 = SYSTEM_GPA + (768 << 20);
pub(super) const EXIT_GIVE: u64 = 0;
pub(super) const EXIT_TAKE: u64 = 1;
pub(super) const EXIT_NOT_ZERO: u64 = 2;
pub(super) const EXIT_DONE: u64 = 3;
pub(super) const EXIT_FILLED: u64 = 4;
pub(super) const EXIT_SYNC: u64 = 5;

pub(super) const OP_FILL: u64 = 1;
pub(super) const OP_GIVE: u64 = 2;
pub(super) const OP_TAKE: u64 = 3;
pub(super) const OP_FILLED: u64 = 4;
pub(super) const OP_SYNC: u64 = 5;
pub(super) const OP_DONE: u64 = 0;

// System memslot layout (offsets from SYSTEM_GPA).
pub(super) const PML4: u64 = 0;
pub(super) const PDPT: u64 = 0x1000;
pub(super) const PD_SYSTEM: u64 = 0x2000;
pub(super) const PD_GUEST: u64 = 0x3000;
pub(super) const CODE: u64 = 0x10_0000;
pub(super) const SCRIPTS: u64 = 0x20_0000;
pub(super) const HUGE: u64 = 2 << 20;

/// The key the guest XORs into each word it writes (the VMM checks with it).
pub(super) const KEY: u64 = 0x6875_6765_7075_6e63;
/// The guest writes one still-owned page after this many give-backs.
pub(super) const TOUCH_EVERY: usize = 8;
/// The guest takes back one in this many of the pages it gave back.
pub(super) const TAKE_BACK_EVERY: usize = 16;

/// The pages of each vCPU's script, in order, and the script's entries.
pub(super) fn scripts(opts: &VmOptions, ops: &[Op]) -> Vec<Vec<(u64, u64)>> {
    let n = opts.vcpus as u64;
    let pages = opts.size / SUBPAGE_SIZE;
    let mut scripts: Vec<Vec<(u64, u64)>> = vec![Vec::new(); opts.vcpus];
    // Setup: every vCPU fills its own pages, then says so.
    for p in 0..pages {
        scripts[(p % n) as usize].push((OP_FILL, p * SUBPAGE_SIZE));
    }
    for s in &mut scripts {
        s.push((OP_FILLED, 0));
    }
    let mut given: Vec<Vec<u64>> = vec![Vec::new(); opts.vcpus];
    let mut out = vec![false; pages as usize];
    // The keep-running cursor of each vCPU, over its own pages.
    let mut cursor: Vec<u64> = (0..n).collect();
    for op in ops {
        let (offset, len, give) = match *op {
            Op::Punch { offset, len } => (offset, len, true),
            Op::Populate { offset, len } => (offset, len, false),
            _ => continue,
        };
        for p in offset / SUBPAGE_SIZE..(offset + len) / SUBPAGE_SIZE {
            let v = (p % n) as usize;
            if give && !out[p as usize] {
                out[p as usize] = true;
                scripts[v].push((OP_GIVE, p * SUBPAGE_SIZE));
                given[v].push(p);
                if given[v].len().is_multiple_of(TOUCH_EVERY) {
                    // Keep running on the rest: write the next page it
                    // still owns (if any).
                    for _ in 0..pages / n + 1 {
                        let c = cursor[v];
                        cursor[v] = if c + n < pages { c + n } else { v as u64 };
                        if !out[c as usize] {
                            scripts[v].push((OP_FILL, c * SUBPAGE_SIZE));
                            break;
                        }
                    }
                }
            } else if !give && out[p as usize] {
                out[p as usize] = false;
                scripts[v].push((OP_TAKE, p * SUBPAGE_SIZE));
            }
        }
    }
    // Once every vCPU has given its pages back, take some back, as a
    // balloon deflates: the most recently given back first, a sixteenth of
    // what each vCPU gave.
    for (v, pages) in given.iter().enumerate() {
        scripts[v].push((OP_SYNC, 0));
        let mut left = pages.len().div_ceil(TAKE_BACK_EVERY);
        for &p in pages.iter().rev() {
            if left == 0 {
                break;
            }
            if out[p as usize] {
                out[p as usize] = false;
                scripts[v].push((OP_TAKE, p * SUBPAGE_SIZE));
                left -= 1;
            }
        }
    }
    for s in &mut scripts {
        s.push((OP_DONE, 0));
    }
    scripts
}

/// Words to write at an offset of the system memslot.
pub(super) type Writes = Vec<(u64, Vec<u64>)>;

/// The system memslot's size and contents (page tables, code, scripts), and
/// where each script starts (guest virtual = guest physical).
pub(super) fn system_image(size: u64, scripts: &[Vec<(u64, u64)>]) -> (u64, Writes, Vec<u64>) {
    let script_bytes: u64 = scripts.iter().map(|s| s.len() as u64 * 16).sum();
    let sys_size = (SCRIPTS + script_bytes).div_ceil(HUGE) * HUGE;
    let gib = size.div_ceil(1 << 30);
    let mut writes: Vec<(u64, Vec<u64>)> = Vec::new();
    const TABLE: u64 = 0x7; // present, writable, user
    const LEAF: u64 = 0x87; // present, writable, user, 2 MiB page
    writes.push((PML4, vec![(SYSTEM_GPA + PDPT) | TABLE]));
    let mut pdpt = vec![0u64; 512];
    for g in 0..gib {
        pdpt[g as usize] = (SYSTEM_GPA + PD_GUEST + g * 0x1000) | TABLE;
        let pd: Vec<u64> = (0..512)
            .map(|i| {
                let addr = (g << 30) + i * HUGE;
                if addr < size {
                    addr | LEAF
                } else {
                    0
                }
            })
            .collect();
        writes.push((PD_GUEST + g * 0x1000, pd));
    }
    pdpt[(SYSTEM_GPA >> 30) as usize] = (SYSTEM_GPA + PD_SYSTEM) | TABLE;
    writes.push((PDPT, pdpt));
    let mut pd_system: Vec<u64> = (0..sys_size / HUGE)
        .map(|i| (SYSTEM_GPA + i * HUGE) | LEAF)
        .collect();
    // The exit page: mapped in the guest's page tables, backed by no
    // memslot.
    let mmio = ((MMIO_GPA - SYSTEM_GPA) / HUGE) as usize;
    pd_system.resize(mmio + 1, 0);
    pd_system[mmio] = MMIO_GPA | LEAF;
    writes.push((PD_SYSTEM, pd_system));
    let mut starts = Vec::new();
    let mut at = SCRIPTS;
    for s in scripts {
        starts.push(SYSTEM_GPA + at);
        writes.push((at, s.iter().flat_map(|&(op, arg)| [op, arg]).collect()));
        at += s.len() as u64 * 16;
    }
    (sys_size, writes, starts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::Backend;

    hugepunch_probe::include_needs!();

    fn opts(vcpus: usize, pattern: &str) -> VmOptions {
        VmOptions {
            backend: Backend::Memfd,
            size: 4 << 20,
            vcpus,
            pattern: pattern.parse().unwrap(),
            seed: 1,
        }
    }

    #[test]
    fn scripts_give_every_page_back_once_and_take_some_back() {
        for vcpus in [1, 2, 3] {
            let o = opts(vcpus, "random");
            let ops = crate::replay::ops(o.pattern, o.size, o.seed).unwrap();
            let s = scripts(&o, &ops);
            assert_eq!(s.len(), vcpus);
            let mut gave = vec![0u32; 1024];
            let mut took = 0;
            for (v, script) in s.iter().enumerate() {
                assert_eq!(script.last(), Some(&(OP_DONE, 0)));
                let filled = script.iter().position(|e| e.0 == OP_FILLED).unwrap();
                for &(op, addr) in &script[filled..] {
                    let p = addr / SUBPAGE_SIZE;
                    if matches!(op, OP_FILL | OP_GIVE | OP_TAKE) {
                        assert_eq!(p as usize % vcpus, v, "pages dealt round-robin");
                    }
                    match op {
                        OP_GIVE => gave[p as usize] += 1,
                        OP_TAKE => took += 1,
                        _ => {}
                    }
                }
            }
            assert!(gave.iter().all(|&g| g == 1), "{vcpus}");
            // A sixteenth of what each vCPU gave, rounded up.
            let want: usize = (0..vcpus)
                .map(|v| (1024 - v).div_ceil(vcpus).div_ceil(TAKE_BACK_EVERY))
                .sum();
            assert_eq!(took, want, "{vcpus}");
            for script in &s {
                let sync = script.iter().position(|e| e.0 == OP_SYNC).unwrap();
                assert!(
                    script[..sync].iter().all(|e| e.0 != OP_TAKE),
                    "take-backs only after every vCPU gave back"
                );
            }
        }
    }

    #[test]
    fn a_fill_never_touches_a_page_that_is_given_back() {
        let o = opts(2, "strided");
        let ops = crate::replay::ops(o.pattern, o.size, o.seed).unwrap();
        for script in scripts(&o, &ops) {
            let mut out = std::collections::HashSet::new();
            for (op, addr) in script {
                match op {
                    OP_GIVE => assert!(out.insert(addr)),
                    OP_TAKE => assert!(out.remove(&addr)),
                    OP_FILL => assert!(!out.contains(&addr), "{addr:#x}"),
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn page_tables_map_guest_memory_and_the_system_slot() {
        let (sys_size, writes, starts) = system_image(3 << 30, &[vec![(OP_DONE, 0)]]);
        assert_eq!(sys_size, 2 * HUGE, "the scripts start at 2 MiB");
        assert_eq!(starts, vec![SYSTEM_GPA + SCRIPTS]);
        let at = |o: u64| writes.iter().find(|(w, _)| *w == o).unwrap().1.clone();
        assert_eq!(at(PML4)[0], (SYSTEM_GPA + PDPT) | 7);
        let pdpt = at(PDPT);
        assert_eq!(pdpt[2], (SYSTEM_GPA + PD_GUEST + 0x2000) | 7);
        assert_eq!(pdpt[256], (SYSTEM_GPA + PD_SYSTEM) | 7);
        assert_eq!(at(PD_GUEST + 0x1000)[1], ((1 << 30) + HUGE) | 0x87);
        let pd = at(PD_SYSTEM);
        assert_eq!(pd[..2], [SYSTEM_GPA | 0x87, (SYSTEM_GPA + HUGE) | 0x87]);
        assert_eq!(
            pd[2..384],
            [0; 382],
            "nothing else mapped but the exit page"
        );
        assert_eq!(pd[384], MMIO_GPA | 0x87);
    }

    needs! { binutils;
        /// The bytes above are what `guest.S` assembles to (ignored where
        /// binutils are not installed).
        #[test]
        fn guest_code_matches_its_source() {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/vm");
            let out = std::env::temp_dir().join(format!("hugepunch-guest-{}", std::process::id()));
            let obj = out.with_extension("o");
            let bin = out.with_extension("bin");
            let assembled = std::process::Command::new("as")
                .args(["--64", "-o"])
                .arg(&obj)
                .arg(dir.join("guest.S"))
                .status()
                .is_ok_and(|s| s.success())
                && std::process::Command::new("objcopy")
                    .args(["-O", "binary", "-j", ".text"])
                    .arg(&obj)
                    .arg(&bin)
                    .status()
                    .is_ok_and(|s| s.success());
            assert!(assembled, "`as` and `objcopy` assemble guest.S");
            let bytes = std::fs::read(&bin).unwrap();
            let _ = std::fs::remove_file(&obj);
            let _ = std::fs::remove_file(&bin);
            assert_eq!(
                bytes, GUEST_CODE,
                "re-assemble guest.S and update GUEST_CODE"
            );
        }
    }
}
