//! Shared by the sample-stream tests: the real `divergen-host` process and a fault-injecting
//! TCP proxy between device and host.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The `divergen-host` binary next to this test's profile folder, built on demand when the
/// test runs alone (`cargo test -p divergen-integration-tests`).
pub fn host_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let bin = profile_dir.join("divergen-host");
    static BUILD: Mutex<()> = Mutex::new(());
    let _guard = BUILD.lock().unwrap();
    if !bin.exists() {
        let mut cargo = Command::new(env!("CARGO"));
        cargo.args(["build", "-p", "divergen-host", "--bin", "divergen-host"]);
        if profile_dir.ends_with("release") {
            cargo.arg("--release");
        }
        assert!(
            cargo.status().expect("run cargo").success(),
            "building divergen-host failed"
        );
    }
    bin
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub struct Host {
    pub child: Child,
}

impl Host {
    pub fn start(out: &Path, port: u16, extra: &[&str]) -> Host {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(out.with_extension("host.log"))
            .unwrap();
        let child = Command::new(host_binary())
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--out"])
            .arg(out)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start divergen-host");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "divergen-host did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        Host { child }
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then wait: the graceful path.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        self.child.wait().unwrap()
    }
}

#[derive(Default)]
pub struct FaultCounts {
    pub frames: AtomicU64,
    pub bit_flips: AtomicU64,
    pub truncations: AtomicU64,
    pub duplicates: AtomicU64,
    pub reorders: AtomicU64,
    pub cuts: AtomicU64,
    pub ack_flips: AtomicU64,
    pub connections: AtomicU64,
}

#[derive(Clone, Copy)]
pub struct FaultPlan {
    /// Every n-th device frame gets the fault (0: never).
    pub flip: u64,
    pub truncate: u64,
    pub duplicate: u64,
    pub reorder: u64,
    pub cut: u64,
    /// Every n-th chunk from the host gets a bit flipped.
    pub ack_flip: u64,
    /// Delay before forwarding each device frame (a slow host).
    pub delay: Duration,
}

impl FaultPlan {
    pub fn none() -> Self {
        FaultPlan {
            flip: 0,
            truncate: 0,
            duplicate: 0,
            reorder: 0,
            cut: 0,
            ack_flip: 0,
            delay: Duration::ZERO,
        }
    }
}

/// Forwards device connections to the host port, breaking frames as planned. Frames are found
/// by their zero delimiters, as the real receiver does.
pub struct Proxy {
    pub port: u16,
    pub counts: Arc<FaultCounts>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    pub fn start(host_port: u16, plan: FaultPlan) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let counts = Arc::new(FaultCounts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (counts.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((device, _)) => {
                        device.set_nonblocking(false).unwrap();
                        let Ok(host) = TcpStream::connect(("127.0.0.1", host_port)) else {
                            continue; // host down: the device sees the connection close
                        };
                        c.connections.fetch_add(1, Ordering::Relaxed);
                        let _ = (device.set_nodelay(true), host.set_nodelay(true));
                        let (d2, h2) = (device.try_clone().unwrap(), host.try_clone().unwrap());
                        let c1 = c.clone();
                        std::thread::spawn(move || device_to_host(device, host, plan, &c1));
                        let c2 = c.clone();
                        std::thread::spawn(move || host_to_device(h2, d2, plan, &c2));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Proxy { port, counts, stop }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn close(a: &TcpStream, b: &TcpStream) {
    let _ = a.shutdown(Shutdown::Both);
    let _ = b.shutdown(Shutdown::Both);
}

fn device_to_host(mut device: TcpStream, mut host: TcpStream, plan: FaultPlan, counts: &FaultCounts) {
    let hit = |every: u64, n: u64| every != 0 && n % every == every / 2;
    let mut buf = vec![0u8; 256 << 10];
    let mut partial = Vec::new();
    let mut held: Option<Vec<u8>> = None;
    loop {
        let n = match device.read(&mut buf) {
            Ok(0) | Err(_) => return close(&device, &host),
            Ok(n) => n,
        };
        for &b in &buf[..n] {
            partial.push(b);
            if b != 0 {
                continue;
            }
            let mut frame = std::mem::take(&mut partial);
            let i = counts.frames.fetch_add(1, Ordering::Relaxed) + 1;
            if !plan.delay.is_zero() {
                std::thread::sleep(plan.delay);
            }
            let mut out: Vec<Vec<u8>> = Vec::new();
            if hit(plan.cut, i) {
                counts.cuts.fetch_add(1, Ordering::Relaxed);
                let _ = host.write_all(&frame[..frame.len() / 2]);
                return close(&device, &host);
            } else if hit(plan.flip, i) {
                counts.bit_flips.fetch_add(1, Ordering::Relaxed);
                let bit = (i as usize * 7919) % ((frame.len() - 1) * 8);
                frame[bit / 8] ^= 1 << (bit % 8);
                out.push(frame);
            } else if hit(plan.truncate, i) {
                counts.truncations.fetch_add(1, Ordering::Relaxed);
                let keep = frame.len() / 3;
                frame.truncate(keep);
                frame.push(0);
                out.push(frame);
            } else if hit(plan.duplicate, i) {
                counts.duplicates.fetch_add(1, Ordering::Relaxed);
                out.push(frame.clone());
                out.push(frame);
            } else if hit(plan.reorder, i) && held.is_none() {
                counts.reorders.fetch_add(1, Ordering::Relaxed);
                held = Some(frame);
            } else {
                out.push(frame);
                if let Some(h) = held.take() {
                    out.push(h);
                }
            }
            for f in out {
                if host.write_all(&f).is_err() {
                    return close(&device, &host);
                }
            }
        }
    }
}

fn host_to_device(mut host: TcpStream, mut device: TcpStream, plan: FaultPlan, counts: &FaultCounts) {
    let mut buf = vec![0u8; 64 << 10];
    let mut chunks = 0u64;
    loop {
        let n = match host.read(&mut buf) {
            Ok(0) | Err(_) => return close(&device, &host),
            Ok(n) => n,
        };
        chunks += 1;
        if plan.ack_flip != 0 && chunks.is_multiple_of(plan.ack_flip) {
            counts.ack_flips.fetch_add(1, Ordering::Relaxed);
            buf[n / 2] ^= 0x10;
        }
        if device.write_all(&buf[..n]).is_err() {
            return close(&device, &host);
        }
    }
}
