//! [`FaultyHost`]: a wrapper that makes chosen frees fail, and a ledger that
//! catches a free of memory that is not allocated (a double free) or an
//! allocation of memory that already is.
//!
//! It wraps any [`Host`] (the Linux backend in the tests), so a failed free
//! leaves the real file untouched, exactly as a failing `fallocate` would.

use hugepunch::{Attribute, ByteRange, Hint, Host, HostError, SUBPAGE_SIZE};
use std::sync::{Arc, Mutex, PoisonError};

/// Which frees fail: `(call number from 0, range, order) -> Some(errno)`.
pub type FailRule = Box<dyn Fn(u64, ByteRange, u8) -> Option<i32> + Send + Sync>;

/// Something the ledger saw that must never happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// A free (that succeeded) covered a subpage that was not allocated.
    FreedUnallocated {
        /// The free's range.
        range: ByteRange,
        /// The first subpage that was not allocated.
        subpage: u64,
    },
    /// An allocation covered a subpage that was already allocated.
    AllocatedTwice {
        /// The allocation's range.
        range: ByteRange,
        /// The first subpage that was already allocated.
        subpage: u64,
    },
}

struct Ledger {
    /// One flag per subpage: allocated?
    allocated: Vec<bool>,
    free_calls: u64,
    injected: u64,
    violations: Vec<Violation>,
}

/// A host that fails the frees its rule chooses and checks every free
/// against a ledger of what is allocated.
pub struct FaultyHost<H: Host> {
    inner: Arc<H>,
    rule: FailRule,
    ledger: Mutex<Ledger>,
}

impl<H: Host> FaultyHost<H> {
    /// Wrap `inner`, a file of `size` bytes that starts fully allocated
    /// (`populated`) or empty. Frees for which `rule` answers `Some(errno)`
    /// fail with that errno and never reach `inner`.
    pub fn new(inner: Arc<H>, size: u64, populated: bool, rule: FailRule) -> Self {
        FaultyHost {
            inner,
            rule,
            ledger: Mutex::new(Ledger {
                allocated: vec![populated; (size / SUBPAGE_SIZE) as usize],
                free_calls: 0,
                injected: 0,
                violations: Vec::new(),
            }),
        }
    }

    /// Fail the free calls whose numbers (from 0) are in `calls`, with `EIO`.
    pub fn failing_calls(inner: Arc<H>, size: u64, populated: bool, calls: Vec<u64>) -> Self {
        Self::new(
            inner,
            size,
            populated,
            Box::new(move |n, _, _| calls.contains(&n).then_some(libc::EIO)),
        )
    }

    /// The wrapped host.
    pub fn inner(&self) -> &Arc<H> {
        &self.inner
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Frees the rule made fail.
    pub fn injected(&self) -> u64 {
        self.ledger().injected
    }

    /// Free calls seen (failed or not).
    pub fn free_calls(&self) -> u64 {
        self.ledger().free_calls
    }

    /// Everything the ledger caught (empty when all is well).
    pub fn violations(&self) -> Vec<Violation> {
        self.ledger().violations.clone()
    }

    /// Bytes allocated according to the ledger.
    pub fn allocated_bytes(&self) -> u64 {
        self.ledger().allocated.iter().filter(|&&a| a).count() as u64 * SUBPAGE_SIZE
    }

    fn subpages(r: ByteRange) -> std::ops::Range<usize> {
        r.first_subpage() as usize..(r.first_subpage() + r.subpages()) as usize
    }
}

impl<H: Host> Host for FaultyHost<H> {
    fn is_shared(&self, range: ByteRange) -> bool {
        self.inner.is_shared(range)
    }

    fn set_attributes(&self, range: ByteRange, to: Attribute) {
        self.inner.set_attributes(range, to)
    }

    fn invalidate_begin(&self, range: ByteRange, hint: Hint) {
        self.inner.invalidate_begin(range, hint)
    }

    fn invalidate_end(&self, range: ByteRange) {
        self.inner.invalidate_end(range)
    }

    fn allocate(&self, range: ByteRange, order: u8) -> Result<(), HostError> {
        self.inner.allocate(range, order)?;
        let mut l = self.ledger();
        let subs = Self::subpages(range);
        if let Some(s) = subs.clone().find(|&s| l.allocated[s]) {
            l.violations.push(Violation::AllocatedTwice {
                range,
                subpage: s as u64,
            });
        }
        l.allocated[subs].iter_mut().for_each(|a| *a = true);
        Ok(())
    }

    fn free(&self, range: ByteRange, order: u8) -> Result<(), HostError> {
        let n = {
            let mut l = self.ledger();
            l.free_calls += 1;
            l.free_calls - 1
        };
        if let Some(errno) = (self.rule)(n, range, order) {
            self.ledger().injected += 1;
            return Err(HostError { errno });
        }
        self.inner.free(range, order)?;
        let mut l = self.ledger();
        let subs = Self::subpages(range);
        if let Some(s) = subs.clone().find(|&s| !l.allocated[s]) {
            l.violations.push(Violation::FreedUnallocated {
                range,
                subpage: s as u64,
            });
        }
        l.allocated[subs].iter_mut().for_each(|a| *a = false);
        Ok(())
    }

    fn zero(&self, range: ByteRange) {
        self.inner.zero(range)
    }
}
