//! An authenticated control channel as both roles run it: heartbeats each way,
//! a peer silent for three intervals is dropped, and each side's own messages go
//! out in between. Any frame proves the peer is alive. Each heartbeat's `ping`
//! is echoed at once, and each echo gives this side a round trip (see
//! [`Heartbeat`]).

use std::time::Duration;

use tokio::time::Instant;

use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::frame::{self, ProtocolError};
use super::message::Heartbeat;
use crate::telemetry::RoundTrips;

/// Heartbeat intervals a peer may stay silent before the session is dropped.
const SILENT_INTERVALS: u32 = 3;

/// How a control channel ended without a protocol error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// This side's token was cancelled (shutdown, replacement, removal).
    Cancelled,
    /// The peer closed the connection.
    PeerClosed,
    /// Nothing arrived for three heartbeat intervals.
    PeerSilent,
}

/// Runs the control channel on `stream` until `cancel`, the peer closes or falls
/// silent, or a frame fails. Each frame from the peer is handed to `on_message`;
/// messages from `outgoing` (when given) are sent as they come; `on_tick` runs
/// once per heartbeat interval, before this side's heartbeat goes out. Round
/// trips go to `rtt`.
pub(crate) async fn run<S, In, Out>(
    stream: S,
    heartbeat: Duration,
    rtt: &RoundTrips,
    cancel: &CancellationToken,
    mut outgoing: Option<&mut mpsc::Receiver<Out>>,
    mut on_message: impl FnMut(In),
    mut on_tick: impl FnMut(),
) -> Result<Ended, ProtocolError>
where
    S: AsyncRead + AsyncWrite,
    In: DeserializeOwned + Heartbeat,
    Out: Serialize + Heartbeat,
{
    let (mut frames, mut writer) = frame::control_channel(stream);
    // This side's clock for `ping`: microseconds since the channel opened.
    let epoch = Instant::now();
    let clock = || epoch.elapsed().as_micros() as u64;
    let mut tick = tokio::time::interval(heartbeat);
    let mut last_heard = Instant::now();
    loop {
        let next_outgoing = async {
            match outgoing.as_mut() {
                Some(queue) => queue.recv().await,
                None => std::future::pending().await,
            }
        };
        // Silence is judged against its own deadline, not at the next tick: a
        // cut link is noticed three intervals after the last frame, not up to four.
        let silent_from = last_heard + heartbeat * SILENT_INTERVALS;
        tokio::select! {
            _ = cancel.cancelled() => return Ok(Ended::Cancelled),
            _ = tokio::time::sleep_until(silent_from) => return Ok(Ended::PeerSilent),
            frame = frames.next() => match frame {
                Some(Ok(bytes)) => {
                    last_heard = Instant::now();
                    let message: In = frame::decode(&bytes)?;
                    if let Some((ping, pong)) = message.probe() {
                        // An echo of a ping from the future is no round trip.
                        if let Some(sent) = pong.filter(|sent| *sent <= clock()) {
                            rtt.record(Duration::from_micros(clock() - sent));
                        }
                        if let Some(ping) = ping {
                            frame::write_frame(&mut writer, &Out::heartbeat(None, Some(ping))).await?;
                        }
                    }
                    on_message(message);
                }
                Some(Err(e)) => return Err(ProtocolError::Io(e)),
                None => return Ok(Ended::PeerClosed),
            },
            Some(msg) = next_outgoing => {
                frame::write_frame(&mut writer, &msg).await?;
            }
            _ = tick.tick() => {
                on_tick();
                frame::write_frame(&mut writer, &Out::heartbeat(Some(clock()), None)).await?;
            }
        }
    }
}
