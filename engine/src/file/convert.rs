//! `convert`: to shared always; to private refused over a pending punch
//! (`Reject`) or after un-punching it (`CancelAndZero`).

use super::*;

impl HugePunch {
    /// Change the attribute of `offset .. offset + len`. To private, a
    /// pending punch in the range refuses the whole conversion (`Reject`,
    /// [`Error::PendingPunch`]) or is un-punched and zeroed first
    /// (`CancelAndZero`).
    pub fn convert(&self, offset: u64, len: u64, to: Attribute) -> Result<(), Error> {
        if let Some(res) = self.convert_fast(offset, len, to) {
            return res;
        }
        self.convert_general(offset, len, to)
    }

    /// The fast path: a valid range of a live file, converted to
    /// shared, or to private under `Reject` inside one huge page whose
    /// chunk exists; the same steps as the general path (the mark, the bit
    /// check, the host call, the unmark) without the per-operation `Delta`,
    /// the counts going straight to this thread's statistics shard. `None`:
    /// nothing was done, the general path runs.
    #[inline(always)]
    fn convert_fast(&self, offset: u64, len: u64, to: Attribute) -> Option<Result<(), Error>> {
        let r = self.geo.validate(offset, len)?;
        self.live().ok()?;
        let cb = self.callbacks.load();
        let mut caught = Caught::default();
        let res = match (to, cb.policy) {
            (Attribute::Shared, _) => {
                let _ = caught.call(|| cb.host().set_attributes(r, Attribute::Shared));
                Ok(())
            }
            (Attribute::Private, Policy::Reject) => {
                let h = self.geo.huge_page_of(offset);
                if self.geo.huge_page_of(r.end() - 1) != h {
                    return None;
                }
                let page = self.index.existing(h)?;
                let first = (r.first_subpage() & (page.full() as u64 - 1)) as u32;
                let count = r.subpages() as u32;
                let before = page.mark_converting();
                let pending = if before.mode() != HUGE {
                    None
                } else if before.is(COMPLETING) {
                    Some(first)
                } else {
                    page.first_set_bit(first, count)
                };
                if pending.is_none() {
                    let _ = caught.call(|| cb.host().set_attributes(r, Attribute::Private));
                }
                page.unmark_converting();
                match pending {
                    Some(sub) => Err(Error::PendingPunch {
                        offset: self.geo.part_range(h, sub, 1).offset,
                    }),
                    None => Ok(()),
                }
            }
            (Attribute::Private, Policy::CancelAndZero) => return None,
        };
        let verdict = if res.is_ok() {
            C::ConversionsOk
        } else {
            C::ConversionsRejected
        };
        if caught.any() || self.counters.count2(C::ConvertCalls, verdict).is_none() {
            let mut d = Delta::default();
            d.caught = caught;
            d.add(C::ConvertCalls, 1);
            d.add(verdict, 1);
            self.finish(cb, &mut d, false);
        }
        Some(res)
    }

    /// Every other conversion.
    #[inline(never)]
    fn convert_general(&self, offset: u64, len: u64, to: Attribute) -> Result<(), Error> {
        let r = self.check(offset, len)?;
        let cb = self.callbacks.load();
        let mut d = Delta::default();
        d.add(C::ConvertCalls, 1);
        let res = match (to, cb.policy) {
            (Attribute::Shared, _) => {
                let _ = d
                    .caught
                    .call(|| cb.host().set_attributes(r, Attribute::Shared));
                Ok(())
            }
            (Attribute::Private, Policy::Reject) => self.convert_reject(cb, r, &mut d),
            (Attribute::Private, Policy::CancelAndZero) => self.convert_cancel(cb, r, &mut d),
        };
        d.add(
            if res.is_ok() {
                C::ConversionsOk
            } else {
                C::ConversionsRejected
            },
            1,
        );
        self.finish(cb, &mut d, false);
        res
    }

    pub(super) fn convert_reject(
        &self,
        cb: &Callbacks,
        r: ByteRange,
        d: &mut Delta,
    ) -> Result<(), Error> {
        let mut marked: SmallVec<[Page<'_>; 4]> = SmallVec::new();
        let mut refused = None;
        for part in self.geo.parts(r) {
            let page = self.index.page(part.huge_page);
            let before = page.mark_converting();
            marked.push(page);
            let pending = if before.mode() != HUGE {
                None
            } else if before.is(COMPLETING) {
                Some(part.first)
            } else {
                page.first_set_bit(part.first, part.count)
            };
            if let Some(sub) = pending {
                refused = Some(self.geo.part_range(part.huge_page, sub, 1).offset);
                break;
            }
        }
        if refused.is_none() {
            let _ = d
                .caught
                .call(|| cb.host().set_attributes(r, Attribute::Private));
        }
        marked.iter().for_each(|p| p.unmark_converting());
        match refused {
            Some(offset) => Err(Error::PendingPunch { offset }),
            None => Ok(()),
        }
    }

    pub(super) fn convert_cancel(
        &self,
        cb: &Callbacks,
        r: ByteRange,
        d: &mut Delta,
    ) -> Result<(), Error> {
        // Every huge page of the range stays registered (or marked) until
        // the attribute has changed: (huge page, page, `Some(k)` if
        // registered with `k` subpages un-punched, `None` if only marked).
        let mut held: SmallVec<[(u64, Page<'_>, Option<u32>); 4]> = SmallVec::new();
        for part in self.geo.parts(r) {
            let h = part.huge_page;
            let page = self.index.page(h);
            loop {
                match page.enter(CANCEL_ONE) {
                    Entry::Registered => {
                        let k = self.unpunch(cb, h, page, part, d);
                        held.push((h, page, Some(k)));
                        break;
                    }
                    Entry::Completing => page.wait_completion(),
                    Entry::NotHuge(_) => {
                        // Not `HUGE` when we looked: a plain mark suffices,
                        // unless it became `HUGE` meanwhile.
                        let before = page.mark_converting();
                        if before.mode() == HUGE && !before.is(TORN) {
                            page.unmark_converting();
                            continue;
                        }
                        held.push((h, page, None));
                        break;
                    }
                }
            }
        }
        // A `zero` that panicked left its subpages punched: converting
        // them to private now would break invariant 3, so the conversion
        // does not go ahead (counted as refused; the panic goes on).
        let refused = d.caught.any();
        if !refused {
            let _ = d
                .caught
                .call(|| cb.host().set_attributes(r, Attribute::Private));
        }
        while let Some((h, page, k)) = held.pop() {
            match k {
                Some(k) => {
                    let exit = page.exit(CANCEL_ONE, -(k as i64));
                    d.shrink_wanted |= exit.shrink_wanted;
                    if exit.claimed_completion {
                        self.complete(cb, h, page, d);
                    }
                }
                None => page.unmark_converting(),
            }
        }
        match refused {
            true => Err(Error::PendingPunch { offset: r.offset }),
            false => Ok(()),
        }
    }
}

/// A `CancelAndZero` conversion's registration: an un-punch and a mark.
pub(super) const CANCEL_ONE: u64 = UNPUNCH_ONE + CONVERT_ONE;
