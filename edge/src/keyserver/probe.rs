//! The heartbeat: every server of a group is pinged over its connection when its
//! probe is due (every `probe_interval` while up; with back-off while down), on the
//! key-server runtime. The loop ends with its group.

use std::sync::Weak;
use std::time::{Duration, Instant};

use super::group::Group;

/// Pings the servers of `group` until it is dropped.
pub(super) async fn run(group: Weak<Group>, interval: Duration) {
    // Per-server schedules are checked a few times per interval.
    let tick = (interval / 4).max(Duration::from_millis(10));
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(group) = group.upgrade() else { return };
        let now = Instant::now();
        for server in group.servers().iter() {
            if server.probe_due(now) {
                let server = server.clone();
                tokio::spawn(async move { server.probe().await });
            }
        }
        group.update_gauge();
    }
}
