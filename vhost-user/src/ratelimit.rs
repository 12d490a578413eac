// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Rate-limited logging for errors a peer can cause over and over (a
//! guest's malformed requests, a client's bad frames): at most one line
//! per interval, with a count of what was left out, so a hostile peer
//! cannot flood the log.

use std::{
    fmt,
    sync::Mutex,
    time::{Duration, Instant},
};

use log::warn;

use crate::hub::lock;

/// One rate limit shared by a family of messages.
pub(crate) struct RateLimited {
    interval: Duration,
    /// When the last line was logged, and how many were left out since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLimited {
    pub(crate) fn new(interval: Duration) -> Self {
        RateLimited {
            interval,
            state: Mutex::new((None, 0)),
        }
    }

    /// Logs `message` at WARN unless a line was logged less than an
    /// interval ago.
    pub(crate) fn warn(&self, message: fmt::Arguments<'_>) {
        let now = Instant::now();
        let mut st = lock(&self.state);
        if st
            .0
            .is_some_and(|last| now.duration_since(last) < self.interval)
        {
            st.1 += 1;
            return;
        }
        let suppressed = std::mem::take(&mut st.1);
        st.0 = Some(now);
        drop(st);
        if suppressed > 0 {
            warn!("{message} ({suppressed} similar messages suppressed)");
        } else {
            warn!("{message}");
        }
    }

    /// Messages left out since the last line.
    #[cfg(test)]
    pub(crate) fn suppressed(&self) -> u64 {
        lock(&self.state).1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_logs_one_line_and_counts_the_rest() {
        let r = RateLimited::new(Duration::from_secs(3600));
        for i in 0..1000 {
            r.warn(format_args!("bad request {i}"));
        }
        assert_eq!(r.suppressed(), 999);
    }
}
