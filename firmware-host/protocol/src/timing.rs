//! Link timing policy, on embassy-time's `Instant`/`Duration` so the same code runs on a board
//! with an embassy time driver and on std (the runtime enables embassy-time's `std` driver).
//! The caller passes `now`; nothing here reads a clock.

use embassy_time::{Duration, Instant};

#[derive(Clone, Copy, Debug)]
pub struct LinkTiming {
    /// Send a heartbeat after this long without sending anything.
    pub heartbeat: Duration,
    /// Drop the connection after this long without hearing from the peer.
    pub peer_timeout: Duration,
    /// Go back to the last acknowledged sample when acks stop advancing for this long while
    /// samples are in flight (a frame or its ack was lost with nothing after it to reveal the gap).
    pub ack_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for LinkTiming {
    fn default() -> Self {
        LinkTiming {
            heartbeat: Duration::from_millis(1000),
            peer_timeout: Duration::from_millis(5000),
            ack_timeout: Duration::from_millis(2000),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_millis(5000),
        }
    }
}

/// Exponential reconnect backoff with jitter in [delay/2, delay], so many devices restarting
/// together do not reconnect in lock-step.
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
    state: u64,
}

impl Backoff {
    pub fn new(timing: &LinkTiming, seed: u64) -> Self {
        Backoff {
            min: timing.backoff_min,
            max: timing.backoff_max,
            next: timing.backoff_min,
            state: seed | 1,
        }
    }

    /// The wait before the next connection attempt; doubles each call up to the maximum.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = Duration::from_ticks((delay.as_ticks() * 2).min(self.max.as_ticks()));
        // xorshift64: enough for jitter, no dependency.
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        let half = delay.as_ticks() / 2;
        Duration::from_ticks(half + self.state % (half + 1))
    }

    /// A session got through the handshake: the next failure starts from the minimum again.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// When to send heartbeats and when to give up on the peer.
#[derive(Clone, Debug)]
pub struct Liveness {
    timing: LinkTiming,
    last_sent: Instant,
    last_heard: Instant,
}

impl Liveness {
    pub fn new(timing: LinkTiming, now: Instant) -> Self {
        Liveness {
            timing,
            last_sent: now,
            last_heard: now,
        }
    }

    pub fn sent(&mut self, now: Instant) {
        self.last_sent = now;
    }

    pub fn heard(&mut self, now: Instant) {
        self.last_heard = now;
    }

    pub fn heartbeat_due(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_sent) >= self.timing.heartbeat
    }

    pub fn peer_lost(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_heard) >= self.timing.peer_timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_bounded_jitter_and_resets() {
        let timing = LinkTiming {
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_millis(800),
            ..LinkTiming::default()
        };
        let mut backoff = Backoff::new(&timing, 7);
        let nominal = [100u64, 200, 400, 800, 800];
        for n in nominal {
            let d = backoff.next_delay().as_millis();
            assert!(d >= n / 2 && d <= n, "{d} ms outside [{}, {n}]", n / 2);
        }
        backoff.reset();
        assert!(backoff.next_delay().as_millis() <= 100);
    }

    #[test]
    fn liveness_tracks_heartbeats_and_timeouts() {
        let timing = LinkTiming::default();
        let t0 = Instant::from_millis(10_000);
        let mut live = Liveness::new(timing, t0);
        assert!(!live.heartbeat_due(t0 + Duration::from_millis(999)));
        assert!(live.heartbeat_due(t0 + Duration::from_millis(1000)));
        live.sent(t0 + Duration::from_millis(1000));
        assert!(!live.heartbeat_due(t0 + Duration::from_millis(1500)));
        assert!(!live.peer_lost(t0 + Duration::from_millis(4999)));
        live.heard(t0 + Duration::from_millis(4000));
        assert!(!live.peer_lost(t0 + Duration::from_millis(8999)));
        assert!(live.peer_lost(t0 + Duration::from_millis(9000)));
    }
}
