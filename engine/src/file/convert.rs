//! `convert`: to shared always; to private refused over a pending punch
//! (`Reject`) or after un-punching it (`CancelAndZero`).

use super::*;

impl HugePunch {
    /// Change the attribute of `offset .. offset + len`. To private, a
    /// pending punch in the range refuses the whole conversion (`Reject`,
    /// [`Error::PendingPunch`]) or is un-punched and zeroed first
    /// (`CancelAndZero`).
    pub fn convert(&self, offset: u64, len: u64, to: Attribute) -> Result<(), Error> {
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
