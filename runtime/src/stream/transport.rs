//! Byte links to the host behind one small trait: TCP, a serial device, or stdin/stdout.

use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use crate::Result;

/// One connected byte stream, split so a reader thread and a writer can use it at once.
pub struct Link {
    pub reader: Box<dyn Read + Send>,
    pub writer: Box<dyn Write + Send>,
    /// Unblocks the reader and ends the connection (a socket shutdown); None where the link
    /// cannot be interrupted (pipes end when the other side closes them).
    pub closer: Option<Box<dyn FnOnce() + Send>>,
}

pub trait Transport: Send {
    /// Opens a fresh connection. `ErrorKind::Unsupported` means the link cannot be reopened
    /// (a pipe), which ends the streamer instead of retrying.
    fn connect(&mut self) -> io::Result<Link>;
    fn describe(&self) -> String;
}

/// Parses `host:port`, `tcp:host:port`, `serial:/dev/ttyUSB0` or `stdio`.
pub fn parse(address: &str) -> Result<Box<dyn Transport>> {
    if address == "stdio" {
        return Ok(Box::new(Stdio { used: false }));
    }
    if let Some(path) = address.strip_prefix("serial:") {
        if path.is_empty() {
            return Err("serial: needs a device path, e.g. serial:/dev/ttyUSB0".into());
        }
        return Ok(Box::new(Serial {
            path: PathBuf::from(path),
        }));
    }
    let address = address.strip_prefix("tcp:").unwrap_or(address);
    if !address.contains(':') {
        return Err(format!("{address:?} is not host:port, tcp:host:port, serial:PATH or stdio").into());
    }
    Ok(Box::new(Tcp {
        address: address.to_string(),
    }))
}

pub struct Tcp {
    pub address: String,
}

impl Transport for Tcp {
    fn connect(&mut self) -> io::Result<Link> {
        let mut last = io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} resolves to no address", self.address),
        );
        for addr in self.address.to_socket_addrs()? {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                Ok(stream) => {
                    stream.set_nodelay(true)?;
                    let reader = stream.try_clone()?;
                    let closer = stream.try_clone()?;
                    return Ok(Link {
                        reader: Box::new(reader),
                        writer: Box::new(stream),
                        closer: Some(Box::new(move || {
                            let _ = closer.shutdown(Shutdown::Both);
                        })),
                    });
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn describe(&self) -> String {
        format!("tcp:{}", self.address)
    }
}

/// A serial port (or any character device) already configured, e.g. with `stty`.
pub struct Serial {
    pub path: PathBuf,
}

impl Transport for Serial {
    fn connect(&mut self) -> io::Result<Link> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.path.display())))?;
        Ok(Link {
            reader: Box::new(file.try_clone()?),
            writer: Box::new(file),
            closer: None,
        })
    }

    fn describe(&self) -> String {
        format!("serial:{}", self.path.display())
    }
}

/// stdin/stdout, for a device whose link is a pipe (ssh, socat, a UART bridge process).
pub struct Stdio {
    used: bool,
}

impl Transport for Stdio {
    fn connect(&mut self) -> io::Result<Link> {
        if std::mem::replace(&mut self.used, true) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the stdio link closed and cannot be reopened; restart the device process to resume",
            ));
        }
        Ok(Link {
            reader: Box::new(io::stdin()),
            writer: Box::new(io::stdout()),
            closer: None,
        })
    }

    fn describe(&self) -> String {
        "stdio".into()
    }
}

/// A link made from any reader and writer, e.g. a child process's pipes in a test.
pub struct Pipes {
    link: Option<Link>,
}

impl Pipes {
    pub fn new(reader: impl Read + Send + 'static, writer: impl Write + Send + 'static) -> Self {
        Pipes {
            link: Some(Link {
                reader: Box::new(reader),
                writer: Box::new(writer),
                closer: None,
            }),
        }
    }
}

impl Transport for Pipes {
    fn connect(&mut self) -> io::Result<Link> {
        self.link.take().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                "the pipe link closed and cannot be reopened",
            )
        })
    }

    fn describe(&self) -> String {
        "pipes".into()
    }
}
