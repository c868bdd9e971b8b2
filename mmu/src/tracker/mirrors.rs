//! The mirror list: subscribing and unsubscribing (copy, swap, wait for
//! what used the old list) and the two-pass fan-out of one invalidation.

use super::*;

impl Mmu {
    /// Subscribe a mirror. It receives every invalidation that starts after
    /// this returns. Never blocks an invalidation in flight: the list is
    /// copied and swapped.
    pub fn register_mirror(&self, mirror: Arc<dyn Mirror>) -> MirrorId {
        loop {
            let (current, id) = {
                let st = self.lock(Hold::Other);
                (st.mirrors.clone(), st.next_mirror)
            };
            let mut list: Vec<_> = current.iter().cloned().collect();
            list.push((MirrorId(id), mirror.role(), mirror.clone()));
            let list: MirrorList = list.into();
            let mut st = self.lock(Hold::Other);
            if Arc::ptr_eq(&st.mirrors, &current) {
                let old = std::mem::replace(&mut st.mirrors, list);
                st.next_mirror += 1;
                drop(st);
                drop(old);
                return MirrorId(id);
            }
        }
    }

    /// Unsubscribe a mirror. Returns once nothing that could still call
    /// it is running — no invalidation or teardown that started before,
    /// and no reclaim step that took the mirror list before — so the
    /// caller may free it. May sleep. Called from inside a mirror callback
    /// (which it could wait for) it changes nothing and returns
    /// `Err(Reentrant)`.
    pub fn unregister_mirror(&self, id: MirrorId) -> Result<(), Error> {
        not_in_callback("unregister_mirror")?;
        let me = thread_token();
        let (last, step) = loop {
            let current = self.lock(Hold::Other).mirrors.clone();
            if !current.iter().any(|(m, _, _)| *m == id) {
                return Err(Error::NoSuchMirror(id.0));
            }
            let list: MirrorList = current
                .iter()
                .filter(|(m, _, _)| *m != id)
                .cloned()
                .collect::<Vec<_>>()
                .into();
            let mut st = self.lock(Hold::Other);
            if st.reclaim_owner == Some(me) || st.seq.active_on(me) {
                return Err(Error::Reentrant("unregister_mirror"));
            }
            if Arc::ptr_eq(&st.mirrors, &current) {
                let old = std::mem::replace(&mut st.mirrors, list);
                let last = st.seq.current();
                // The step in flight (if any) took the list before this swap.
                let step = st.reclaim_owner.map(|_| st.reclaim_epoch);
                drop(st);
                drop(old);
                break (last, step);
            }
        };
        self.wait_until(|st| {
            st.seq.active_up_to(last).is_none()
                && step.is_none_or(|epoch| st.reclaim_owner.is_none() || st.reclaim_epoch != epoch)
        });
        Ok(())
    }

    pub fn mirror_count(&self) -> usize {
        self.lock(Hold::Other).mirrors.len()
    }

    /// Two passes over the mirrors: start every cache mirror, wait for
    /// each; then the same for backing mirrors (after every device has
    /// stopped using the memory).
    #[inline(always)]
    pub(super) fn fan_out(mirrors: &MirrorList, inv: &Invalidation) {
        let _inside = InCallback::enter();
        for role in [MirrorRole::Cache, MirrorRole::Backing] {
            let of_role = || mirrors.iter().filter(move |(_, r, _)| *r == role);
            for (_, _, m) in of_role() {
                m.invalidate_start(inv);
            }
            for (_, _, m) in of_role() {
                m.invalidate_wait(inv);
            }
        }
    }
}
