//! Fetches the group's session-ticket keys from its key servers (`get-ticket-keys`,
//! PROTOCOL.md) into the group's [`SharedTicketer`], before the current key stops
//! sealing. A failed fetch is retried with back-off; the keys held are used until their
//! windows end, after which handshakes are full ones. A key server that does not know
//! the extension (reference protocol) leaves the ticketer empty: the edge then uses its
//! own local ticket key.

use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use keyless_shared::tickets::decode_ticket_keys;
use keyless_shared::{ErrorCode, Opcode, Operation};

use super::group::Group;
use super::ClientError;
use crate::tickets::SharedTicketer;

const MIN_WAIT: Duration = Duration::from_secs(1);
const MAX_WAIT: Duration = Duration::from_secs(60);

/// Keeps `ticketer` filled with `group`'s keys until the group is dropped.
pub(super) async fn run(group: Weak<Group>, ticketer: Arc<SharedTicketer>) {
    let mut retry = MIN_WAIT;
    loop {
        let Some(g) = group.upgrade() else { return };
        let op = Operation {
            opcode: Some(Opcode::GetTicketKeys),
            ..Operation::default()
        };
        let deadline = std::time::Instant::now() + g.request_timeout() * 2;
        let wait = match g.call(op, deadline).await {
            Ok(reply) => match decode_ticket_keys(reply.payload()) {
                Ok(keys) => {
                    let next = refresh_in(&keys, SystemTime::now());
                    if !ticketer.has_keys() {
                        tracing::info!(group = %g.name, keys = keys.len(), "session-ticket keys of the group in use");
                    }
                    ticketer.install(keys);
                    retry = MIN_WAIT;
                    next
                }
                Err(e) => {
                    tracing::warn!(group = %g.name, error = %e, "unusable ticket keys from the key server");
                    backoff(&mut retry)
                }
            },
            Err(ClientError::Remote(ErrorCode::BadOpcode | ErrorCode::UnexpectedOpcode)) => {
                tracing::info!(group = %g.name, "the group's key servers hand out no ticket keys; tickets use this edge's own key");
                return;
            }
            Err(e) => {
                tracing::warn!(group = %g.name, error = %e, retry = ?retry, "cannot fetch the group's ticket keys; keeping the ones held");
                backoff(&mut retry)
            }
        };
        drop(g);
        tokio::time::sleep(wait).await;
    }
}

fn backoff(retry: &mut Duration) -> Duration {
    let wait = *retry;
    *retry = (*retry * 2).min(Duration::from_secs(30));
    wait
}

/// When to fetch again: halfway to the end of the current sealing key's window (the
/// next key is then already held), between 1 s and 1 min.
fn refresh_in(keys: &[keyless_shared::tickets::TicketKey], now: SystemTime) -> Duration {
    keys.iter()
        .filter(|k| k.not_before <= now && now < k.encrypt_until)
        .map(|k| {
            k.encrypt_until
                .duration_since(now)
                .unwrap_or(Duration::ZERO)
                / 2
        })
        .min()
        .unwrap_or(MIN_WAIT)
        .clamp(MIN_WAIT, MAX_WAIT)
}
