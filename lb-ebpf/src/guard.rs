//! The new-flow rate guard (see `lb_common::guard`): whether this CPU may record one more new
//! flow in the flow table this tick. Only packets that may record a flow ask: two array lookups,
//! which the verifier inlines, and no helper call.

use lb_common::GuardState;

use crate::{
    knockout,
    maps::{LB_GUARD_LIMIT, LB_GUARD_STATE},
};

/// This CPU's guard, as one packet sees it.
#[derive(Clone, Copy)]
pub struct Guard {
    /// `None` when there is no limit.
    state: Option<*mut GuardState>,
    room: bool,
}

impl Guard {
    /// The guard at `tick`: a new tick starts a new count.
    #[inline(always)]
    pub fn at(tick: u32) -> Self {
        if knockout::GUARD {
            return Self {
                state: None,
                room: true,
            };
        }
        let limit = LB_GUARD_LIMIT.get(0).copied().unwrap_or(0);
        let state = if limit == 0 {
            None
        } else {
            LB_GUARD_STATE.get_ptr_mut(0)
        };
        let Some(state) = state else {
            return Self {
                state: None,
                room: true,
            };
        };
        // SAFETY: this CPU's element of a per-CPU array, valid for the program run; only this
        // CPU writes it, one program run at a time.
        let room = unsafe {
            if (*state).tick != tick {
                (*state).tick = tick;
                (*state).recorded = 0;
            }
            (*state).recorded < limit
        };
        Self {
            state: Some(state),
            room,
        }
    }

    /// Whether one more flow may be recorded.
    #[inline(always)]
    pub fn room(self) -> bool {
        self.room
    }

    /// Counts a flow recorded.
    #[inline(always)]
    pub fn recorded(self) {
        if let Some(state) = self.state {
            // SAFETY: as in `at`.
            unsafe { (*state).recorded += 1 };
        }
    }

    /// Counts a new flow forwarded without a record because there was no room.
    #[inline(always)]
    pub fn unrecorded(self) {
        if let Some(state) = self.state {
            // SAFETY: as in `at`.
            unsafe { (*state).unrecorded += 1 };
        }
    }
}
