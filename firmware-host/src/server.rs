//! Accepts device connections (TCP, or one byte-stream link) and feeds their samples to the
//! [`Store`]. Each connection: hello → category check → welcome with the resume point → samples,
//! committed in batches and acknowledged only after the journal fsync.

use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use divergen_protocol::{
    CategoryTable, DeviceMessage, FrameDecoder, FrameError, Hello, HostMessage, PROTOCOL_VERSION, Refusal, Sample,
    decode_message, encode_message,
};

use crate::store::{SessionKey, Store, StoreConfig, StoreStats};

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub store: StoreConfig,
    /// Close a connection that sent nothing (not even a heartbeat) for this long.
    pub peer_timeout: Duration,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    bad_frames: AtomicU64,
    refused: AtomicU64,
}

#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct ServerStats {
    pub connections: u64,
    /// Frames dropped for a CRC, COBS or length error (the device sends them again).
    pub bad_frames: u64,
    pub refused: u64,
    pub store: StoreStats,
}

pub struct Server {
    store: Mutex<Store>,
    config: ServerConfig,
    shutdown: Arc<AtomicBool>,
    counters: Counters,
}

impl Server {
    pub fn open(config: ServerConfig) -> io::Result<Arc<Self>> {
        let store = Store::open(config.store.clone())?;
        Ok(Arc::new(Server {
            store: Mutex::new(store),
            config,
            shutdown: Arc::new(AtomicBool::new(false)),
            counters: Counters::default(),
        }))
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pins the category table before any device connects (`--categories`).
    pub fn pin_categories(&self, table: CategoryTable) -> io::Result<()> {
        let mut store = self.store();
        match store.categories() {
            Some(existing) if existing.fingerprint() != table.fingerprint() => Err(io::Error::other(format!(
                "{} already holds a dataset for a different category table",
                self.config.store.out.display()
            ))),
            Some(_) => Ok(()),
            None => store.pin_categories(table),
        }
    }

    /// Samples as they are committed; see [`Store::subscribe`].
    pub fn subscribe(&self, capacity: usize) -> Receiver<Arc<Sample>> {
        self.store().subscribe(capacity)
    }

    /// Set it (a signal handler does) to stop accepting, finish the batch in hand and return.
    pub fn shutdown_flag(&self) -> Arc<AtomicBool> {
        self.shutdown.clone()
    }

    pub fn stats(&self) -> ServerStats {
        ServerStats {
            connections: self.counters.connections.load(Ordering::Relaxed),
            bad_frames: self.counters.bad_frames.load(Ordering::Relaxed),
            refused: self.counters.refused.load(Ordering::Relaxed),
            store: self.store().stats(),
        }
    }

    /// Serves TCP devices, each on its own thread, until the shutdown flag is set; then waits for
    /// the connections to finish and seals the open shard.
    pub fn serve_tcp(self: &Arc<Self>, listener: TcpListener) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        let mut workers = Vec::new();
        while !self.shutdown.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((stream, peer)) => {
                    stream.set_nonblocking(false)?;
                    stream.set_nodelay(true)?;
                    let server = self.clone();
                    let reader = stream.try_clone()?;
                    let closer = stream.try_clone()?;
                    workers.push(std::thread::spawn(move || {
                        let result = server.serve_link(reader, stream, &peer.to_string());
                        if let Err(e) = result {
                            log::warn!("{peer}: {e}");
                        }
                        // Wakes the connection's reader thread, which holds its own handle.
                        let _ = closer.shutdown(std::net::Shutdown::Both);
                    }));
                    workers.retain(|w| !w.is_finished());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => log::warn!("accept failed: {e}"),
            }
        }
        for worker in workers {
            let _ = worker.join();
        }
        self.close()
    }

    /// Seals the partly filled shard so the folder is a complete dataset.
    pub fn close(&self) -> io::Result<()> {
        self.store().seal()
    }

    /// Runs one device connection over any byte stream until it ends or shutdown.
    pub fn serve_link(&self, reader: impl Read + Send + 'static, mut writer: impl Write, peer: &str) -> io::Result<()> {
        self.counters.connections.fetch_add(1, Ordering::Relaxed);
        let chunks = spawn_reader(reader);
        let mut decoder = FrameDecoder::default();
        let mut session: Option<(SessionKey, Hello)> = None;
        let mut pending_hello: Option<Hello> = None;
        let mut last_heard = Instant::now();
        let mut resend_asked: Option<u64> = None;
        let send = |w: &mut dyn Write, m: &HostMessage| w.write_all(&encode_message(m)).and_then(|()| w.flush());
        loop {
            if self.shutdown.load(Ordering::SeqCst) {
                let _ = send(&mut writer, &HostMessage::Refused(Refusal::ShuttingDown));
                return Ok(());
            }
            // Everything that has arrived, so one commit (one fsync) covers as much as possible.
            let mut received = Vec::new();
            match chunks.recv_timeout(Duration::from_millis(100)) {
                Ok(Some(chunk)) => received.push(chunk),
                Ok(None) => return Ok(()),
                Err(RecvTimeoutError::Timeout) => {
                    if last_heard.elapsed() >= self.config.peer_timeout {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "device silent; connection closed",
                        ));
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
            let mut closed = false;
            while let Ok(chunk) = chunks.try_recv() {
                match chunk {
                    Some(chunk) => received.push(chunk),
                    None => closed = true,
                }
                if received.len() >= 64 {
                    break;
                }
            }
            last_heard = Instant::now();
            let mut messages = Vec::new();
            for chunk in &received {
                decoder.feed(chunk, |frame| match frame.and_then(decode_message::<DeviceMessage>) {
                    Ok(m) => messages.push(Ok(m)),
                    Err(FrameError::Deserialize | FrameError::TrailingBytes) => messages.push(Err(())),
                    Err(e) => {
                        log::debug!("{peer}: dropped a frame: {e}");
                        self.counters.bad_frames.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
            let mut batch: Vec<Sample> = Vec::new();
            let mut heartbeat = false;
            for message in messages {
                let refuse = |w: &mut dyn Write, r: Refusal| {
                    self.counters.refused.fetch_add(1, Ordering::Relaxed);
                    let text = r.to_string();
                    let _ = send(w, &HostMessage::Refused(r));
                    Err(io::Error::other(format!("refused: {text}")))
                };
                let Ok(message) = message else {
                    let problem = "a frame passed its CRC but is not a message of this protocol version".to_string();
                    return refuse(&mut writer, Refusal::Invalid { seq: None, problem });
                };
                match (message, &session) {
                    (DeviceMessage::Hello(hello), _) => {
                        // A new hello restarts the session on this connection.
                        session = None;
                        if hello.protocol_version != PROTOCOL_VERSION {
                            let r = Refusal::ProtocolVersion {
                                host: PROTOCOL_VERSION,
                                device: hello.protocol_version,
                            };
                            return refuse(&mut writer, r);
                        }
                        if let Err(problem) = hello.validate() {
                            return refuse(&mut writer, Refusal::Invalid { seq: None, problem });
                        }
                        let known = self.store().categories().map(|t| t.fingerprint());
                        match known {
                            None => {
                                pending_hello = Some(hello);
                                send(&mut writer, &HostMessage::NeedCategories)?;
                            }
                            Some(host) if host != hello.category_table => {
                                return refuse(
                                    &mut writer,
                                    Refusal::CategoryTable {
                                        host,
                                        device: hello.category_table,
                                    },
                                );
                            }
                            Some(_) => session = Some(self.welcome(hello, &mut writer, peer)?),
                        }
                    }
                    (DeviceMessage::Categories(table), None) => {
                        let Some(hello) = pending_hello.take() else {
                            let problem = "category table sent before a hello".to_string();
                            return refuse(&mut writer, Refusal::Invalid { seq: None, problem });
                        };
                        if let Err(problem) = table.validate() {
                            return refuse(&mut writer, Refusal::Invalid { seq: None, problem });
                        }
                        let device = table.fingerprint();
                        if device != hello.category_table {
                            let problem = "the category table sent does not match the hello's fingerprint".to_string();
                            return refuse(&mut writer, Refusal::Invalid { seq: None, problem });
                        }
                        {
                            let mut store = self.store();
                            match store.categories().map(|t| t.fingerprint()) {
                                None => store.pin_categories(table)?,
                                Some(host) if host != device => {
                                    drop(store);
                                    return refuse(&mut writer, Refusal::CategoryTable { host, device });
                                }
                                Some(_) => {}
                            }
                        }
                        session = Some(self.welcome(hello, &mut writer, peer)?);
                    }
                    (DeviceMessage::Sample(sample), Some((key, _))) => {
                        let seq = sample.provenance.seq;
                        if (&sample.provenance.device_id, &sample.provenance.run_id) != (&key.0, &key.1) {
                            let problem = format!(
                                "sample from {}/{} on a session opened as {}/{}",
                                sample.provenance.device_id, sample.provenance.run_id, key.0, key.1
                            );
                            return refuse(
                                &mut writer,
                                Refusal::Invalid {
                                    seq: Some(seq),
                                    problem,
                                },
                            );
                        }
                        let check = sample.validate(self.store().categories());
                        if let Err(problem) = check {
                            return refuse(
                                &mut writer,
                                Refusal::Invalid {
                                    seq: Some(seq),
                                    problem,
                                },
                            );
                        }
                        batch.push(sample);
                    }
                    (DeviceMessage::Heartbeat, _) => heartbeat = true,
                    (DeviceMessage::Categories(_) | DeviceMessage::Sample(_), _) => {
                        let problem = "message before the session was welcomed".to_string();
                        return refuse(&mut writer, Refusal::Invalid { seq: None, problem });
                    }
                }
            }
            if let Some((key, _)) = &session {
                if !batch.is_empty() {
                    let committed = self.store().commit(key, batch)?;
                    send(
                        &mut writer,
                        &HostMessage::Ack {
                            next_seq: committed.next_seq,
                        },
                    )?;
                    if committed.gap && resend_asked != Some(committed.next_seq) {
                        send(
                            &mut writer,
                            &HostMessage::Resend {
                                from: committed.next_seq,
                            },
                        )?;
                        resend_asked = Some(committed.next_seq);
                    }
                } else if heartbeat {
                    let next_seq = self.store().next_seq(key);
                    send(&mut writer, &HostMessage::Ack { next_seq })?;
                }
            } else if heartbeat {
                send(&mut writer, &HostMessage::Heartbeat)?;
            }
            if closed {
                return Ok(());
            }
        }
    }

    fn welcome(&self, hello: Hello, writer: &mut dyn Write, peer: &str) -> io::Result<(SessionKey, Hello)> {
        let key = (hello.device_id.clone(), hello.run_id.clone());
        let next_seq = self.store().next_seq(&key);
        log::info!("{peer}: device {} run {} resumes at sample {next_seq}", key.0, key.1);
        writer.write_all(&encode_message(&HostMessage::Welcome { next_seq }))?;
        writer.flush()?;
        Ok((key, hello))
    }
}

/// Reads the link on its own thread so the connection loop can watch the clock and the shutdown
/// flag. `None` marks the end of the stream.
fn spawn_reader(mut reader: impl Read + Send + 'static) -> Receiver<Option<Vec<u8>>> {
    let (tx, rx) = mpsc::sync_channel(64);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 << 10];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => {
                    let _ = tx.send(None);
                    return;
                }
                Ok(n) => {
                    if tx.send(Some(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("link read failed: {e}");
                    let _ = tx.send(None);
                    return;
                }
            }
        }
    });
    rx
}
