//! Sends the outbox to the host: handshake, pipelined frames, cumulative acks, go-back-N on a
//! gap or a stalled ack, heartbeats, and reconnect with backoff. Timing comes from
//! [`divergen_protocol::timing`] on embassy-time's clock.

use std::io::{self, BufWriter, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Duration as StdDuration;

use divergen_protocol::timing::{Backoff, LinkTiming, Liveness};
use divergen_protocol::{
    CategoryTable, DeviceMessage, FrameDecoder, FrameError, Hello, HostMessage, PROTOCOL_VERSION, Refusal, check_id,
    decode_message, encode_message,
};
use embassy_time::Instant;

use super::outbox::Outbox;
use super::transport::{Link, Transport};

#[derive(Clone, Debug)]
pub struct StreamConfig {
    pub device_id: String,
    pub run_id: String,
    pub categories: CategoryTable,
    pub timing: LinkTiming,
    /// Samples sent ahead of the host's last ack.
    pub window: u64,
}

impl StreamConfig {
    pub fn new(device_id: &str, run_id: &str, categories: CategoryTable) -> Self {
        StreamConfig {
            device_id: device_id.into(),
            run_id: run_id.into(),
            categories,
            timing: LinkTiming::default(),
            window: 64,
        }
    }
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    frames_sent: AtomicU64,
    bytes_sent: AtomicU64,
    rewinds: AtomicU64,
    bad_frames: AtomicU64,
}

#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct StreamStats {
    pub connections: u64,
    pub frames_sent: u64,
    pub bytes_sent: u64,
    /// Times the device went back to an earlier sample (host asked, or acks stalled).
    pub rewinds: u64,
    /// Frames from the host that failed their CRC or did not decode.
    pub bad_frames: u64,
}

pub struct Streamer {
    thread: Option<JoinHandle<io::Result<()>>>,
    stop: Arc<AtomicBool>,
    outbox: Arc<Outbox>,
    counters: Arc<Counters>,
}

enum End {
    /// The link broke; reconnect.
    Lost(String),
    /// The host refused us or the session is inconsistent; retrying cannot help.
    Fatal(io::Error),
}

impl Streamer {
    pub fn start(outbox: Arc<Outbox>, transport: Box<dyn Transport>, config: StreamConfig) -> io::Result<Self> {
        check_id("device id", &config.device_id).map_err(io::Error::other)?;
        check_id("run id", &config.run_id).map_err(io::Error::other)?;
        config.categories.validate().map_err(io::Error::other)?;
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let thread = {
            let (outbox, stop, counters) = (outbox.clone(), stop.clone(), counters.clone());
            std::thread::Builder::new()
                .name("divergen-stream".into())
                .spawn(move || run(outbox, transport, config, stop, counters))?
        };
        Ok(Streamer {
            thread: Some(thread),
            stop,
            outbox,
            counters,
        })
    }

    pub fn stats(&self) -> StreamStats {
        let c = &self.counters;
        StreamStats {
            connections: c.connections.load(Ordering::Relaxed),
            frames_sent: c.frames_sent.load(Ordering::Relaxed),
            bytes_sent: c.bytes_sent.load(Ordering::Relaxed),
            rewinds: c.rewinds.load(Ordering::Relaxed),
            bad_frames: c.bad_frames.load(Ordering::Relaxed),
        }
    }

    /// Waits until the host acknowledged everything pushed so far, then stops.
    pub fn finish(mut self, timeout: StdDuration) -> io::Result<StreamStats> {
        let done = self.outbox.wait_all_acked(timeout);
        let stats = self.stats();
        let result = self.shutdown();
        result?;
        if !done {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{} samples still unacknowledged after {timeout:?}; they stay in the outbox for the next run",
                    self.outbox.next_seq() - self.outbox.acked()
                ),
            ));
        }
        Ok(stats)
    }

    /// Stops now; unacknowledged samples stay in the outbox and are sent by the next streamer.
    pub fn stop(mut self) -> io::Result<StreamStats> {
        let stats = self.stats();
        self.shutdown().map(|()| stats)
    }

    fn shutdown(&mut self) -> io::Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        self.outbox.notify();
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(io::Error::other("the stream thread panicked")),
            None => Ok(()),
        }
    }
}

impl Drop for Streamer {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

fn run(
    outbox: Arc<Outbox>,
    mut transport: Box<dyn Transport>,
    config: StreamConfig,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
) -> io::Result<()> {
    let seed = config.device_id.bytes().fold(std::process::id() as u64, |h, b| {
        h.wrapping_mul(31).wrapping_add(b as u64)
    });
    let mut backoff = Backoff::new(&config.timing, seed);
    while !stop.load(Ordering::SeqCst) {
        let end = match transport.connect() {
            Ok(link) => {
                counters.connections.fetch_add(1, Ordering::Relaxed);
                log::debug!("connected to {}", transport.describe());
                session(&outbox, link, &config, &stop, &counters, &mut backoff)
            }
            Err(e) if e.kind() == io::ErrorKind::Unsupported => End::Fatal(e),
            Err(e) => End::Lost(format!("cannot connect to {}: {e}", transport.describe())),
        };
        match end {
            End::Fatal(e) => {
                log::error!("stream to {}: {e}", transport.describe());
                outbox.close(&e.to_string());
                return Err(e);
            }
            End::Lost(why) if !stop.load(Ordering::SeqCst) => {
                let delay = backoff.next_delay();
                log::warn!(
                    "stream to {}: {why}; reconnecting in {} ms",
                    transport.describe(),
                    delay.as_millis()
                );
                let resume = Instant::now() + delay;
                while Instant::now() < resume && !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(StdDuration::from_millis(10));
                }
            }
            End::Lost(_) => {}
        }
    }
    Ok(())
}

enum Inbound {
    Message(HostMessage),
    BadFrame(FrameError),
    Closed(String),
}

fn spawn_reader(mut reader: Box<dyn Read + Send>, outbox: Arc<Outbox>) -> mpsc::Receiver<Inbound> {
    let (tx, rx) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("divergen-stream-rx".into())
        .spawn(move || {
            let mut decoder = FrameDecoder::with_limit(1 << 20);
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let event = match reader.read(&mut buf) {
                    Ok(0) => Some(Inbound::Closed("host closed the connection".into())),
                    Ok(n) => {
                        let mut events = Vec::new();
                        decoder.feed(&buf[..n], |frame| {
                            events.push(match frame.and_then(decode_message::<HostMessage>) {
                                Ok(message) => Inbound::Message(message),
                                Err(e) => Inbound::BadFrame(e),
                            })
                        });
                        for event in events {
                            if tx.send(event).is_err() {
                                return;
                            }
                        }
                        None
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => None,
                    Err(e) => Some(Inbound::Closed(format!("read failed: {e}"))),
                };
                outbox.notify();
                if let Some(event) = event {
                    let _ = tx.send(event);
                    outbox.notify();
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        let (tx, rx) = mpsc::channel();
        let _ = tx.send(Inbound::Closed(format!("cannot start the reader thread: {e}")));
        return rx;
    }
    rx
}

/// Shuts the socket when the session ends, so the reader thread wakes up and exits.
struct CloseOnDrop(Option<Box<dyn FnOnce() + Send>>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        if let Some(close) = self.0.take() {
            close();
        }
    }
}

fn session(
    outbox: &Arc<Outbox>,
    link: Link,
    config: &StreamConfig,
    stop: &AtomicBool,
    counters: &Counters,
    backoff: &mut Backoff,
) -> End {
    let Link { reader, writer, closer } = link;
    let _close = CloseOnDrop(closer);
    let inbound = spawn_reader(reader, outbox.clone());
    let mut writer = BufWriter::with_capacity(256 << 10, writer);
    let timing = config.timing;
    let lost = |e: io::Error| End::Lost(format!("write failed: {e}"));
    let fatal = |msg: String| End::Fatal(io::Error::other(msg));

    let hello = DeviceMessage::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        device_id: config.device_id.clone(),
        run_id: config.run_id.clone(),
        category_table: config.categories.fingerprint(),
    });
    if let Err(e) = writer.write_all(&encode_message(&hello)).and_then(|()| writer.flush()) {
        return lost(e);
    }
    let deadline = Instant::now() + timing.peer_timeout;
    let next_seq = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = match inbound.recv_timeout(StdDuration::from_micros(left.as_micros())) {
            Ok(event) => event,
            Err(_) => return End::Lost("the host did not answer the hello".into()),
        };
        match event {
            Inbound::Message(HostMessage::Welcome { next_seq }) => break next_seq,
            Inbound::Message(HostMessage::NeedCategories) => {
                let table = DeviceMessage::Categories(config.categories.clone());
                if let Err(e) = writer.write_all(&encode_message(&table)).and_then(|()| writer.flush()) {
                    return lost(e);
                }
            }
            Inbound::Message(HostMessage::Refused(Refusal::ShuttingDown)) => {
                return End::Lost("the host is shutting down".into());
            }
            Inbound::Message(HostMessage::Refused(refusal)) => return fatal(format!("host refused: {refusal}")),
            Inbound::Message(_) | Inbound::BadFrame(_) => {}
            Inbound::Closed(why) => return End::Lost(why),
        }
    };
    backoff.reset();

    let acked = outbox.acked();
    if next_seq < acked {
        return fatal(format!(
            "host asks to resume at sample {next_seq}, but it had acknowledged everything below {acked} and this \
             device has deleted those; the host's output folder lost data"
        ));
    }
    if next_seq > outbox.next_seq() {
        return fatal(format!(
            "host already holds samples up to {next_seq} for device {:?} run {:?}, but this device produced only {}: \
             is another device using the same ids?",
            config.device_id,
            config.run_id,
            outbox.next_seq()
        ));
    }
    if let Err(e) = outbox.ack(next_seq) {
        return End::Fatal(e);
    }
    log::info!(
        "stream: session open as {}/{}, resuming at sample {next_seq}",
        config.device_id,
        config.run_id
    );

    let mut cursor = next_seq;
    let mut live = Liveness::new(timing, Instant::now());
    let mut progress = (next_seq, Instant::now());
    loop {
        let epoch = outbox.epoch();
        if stop.load(Ordering::SeqCst) {
            let _ = writer.flush();
            return End::Lost("stopped".into());
        }
        while let Ok(event) = inbound.try_recv() {
            match event {
                Inbound::Message(message) => {
                    live.heard(Instant::now());
                    match message {
                        HostMessage::Ack { next_seq } => {
                            if let Err(e) = outbox.ack(next_seq) {
                                return End::Fatal(e);
                            }
                        }
                        HostMessage::Resend { from } => {
                            log::debug!("stream: host asks to resend from {from}");
                            cursor = from;
                            counters.rewinds.fetch_add(1, Ordering::Relaxed);
                        }
                        HostMessage::Refused(Refusal::ShuttingDown) => {
                            return End::Lost("the host is shutting down".into());
                        }
                        HostMessage::Refused(refusal) => return fatal(format!("host refused: {refusal}")),
                        HostMessage::Heartbeat | HostMessage::Welcome { .. } | HostMessage::NeedCategories => {}
                    }
                }
                Inbound::BadFrame(e) => {
                    log::debug!("stream: dropped a frame from the host: {e}");
                    counters.bad_frames.fetch_add(1, Ordering::Relaxed);
                }
                Inbound::Closed(why) => return End::Lost(why),
            }
        }
        let now = Instant::now();
        if live.peer_lost(now) {
            return End::Lost(format!(
                "no message from the host for {} ms",
                timing.peer_timeout.as_millis()
            ));
        }
        let acked = outbox.acked();
        if acked != progress.0 {
            progress = (acked, now);
        }
        cursor = cursor.max(acked);
        if cursor > acked && now.saturating_duration_since(progress.1) >= timing.ack_timeout {
            log::debug!("stream: no ack progress past {acked}; sending again from there");
            cursor = acked;
            progress.1 = now;
            counters.rewinds.fetch_add(1, Ordering::Relaxed);
        }
        let mut sent = false;
        while cursor < outbox.next_seq() && cursor - acked < config.window {
            let frame = match outbox.frame(cursor) {
                Ok(Some(frame)) => frame,
                Ok(None) => break, // acknowledged meanwhile
                Err(e) => return End::Fatal(e),
            };
            if let Err(e) = writer.write_all(&frame) {
                return lost(e);
            }
            counters.frames_sent.fetch_add(1, Ordering::Relaxed);
            counters.bytes_sent.fetch_add(frame.len() as u64, Ordering::Relaxed);
            cursor += 1;
            sent = true;
        }
        if live.heartbeat_due(now) {
            if let Err(e) = writer.write_all(&encode_message(&DeviceMessage::Heartbeat)) {
                return lost(e);
            }
            sent = true;
        }
        if sent {
            if let Err(e) = writer.flush() {
                return lost(e);
            }
            live.sent(now);
        }
        outbox.wait_changed(epoch, StdDuration::from_millis(50));
    }
}
