//! Where the guest's COM1 goes: ferry's stdout (and stdin), a file, or a unix socket that a
//! client may connect to (`socat - UNIX-CONNECT:PATH`).

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use ferry_devices::bus::lock;
use ferry_devices::serial::Serial;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::VmmError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialMode {
    Stdio,
    File(PathBuf),
    Unix(PathBuf),
}

impl std::str::FromStr for SerialMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            None if s == "stdio" => Ok(Self::Stdio),
            Some(("file", p)) if !p.is_empty() => Ok(Self::File(p.into())),
            Some(("unix", p)) if !p.is_empty() => Ok(Self::Unix(p.into())),
            _ => Err(format!(
                "'{s}' is not a serial target; use stdio, file:PATH or unix:PATH"
            )),
        }
    }
}

/// The connected client of a unix-socket console, shared by the output sink and the loop.
type Client = Arc<Mutex<Option<UnixStream>>>;

/// Console output for a unix socket: sent to the client if one is connected, dropped otherwise
/// (the guest must never block on a slow or absent reader).
struct ClientSink(Client);

impl Write for ClientSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut g = lock(&self.0);
        if let Some(s) = g.as_mut() {
            match s.write(buf) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => *g = None,
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The console's output sink and, where there is one, its input side.
pub struct Console {
    pub sink: Box<dyn Write + Send>,
    pub input: ConsoleInput,
}

pub enum ConsoleInput {
    None,
    Stdin,
    Socket(UnixListener, Client),
}

impl ConsoleInput {
    /// Another handle on the same input, for the next boot after a guest reboot.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Self::None => Self::None,
            Self::Stdin => Self::Stdin,
            Self::Socket(l, c) => Self::Socket(l.try_clone()?, c.clone()),
        })
    }
}

/// One console sink shared by the UARTs of successive boots (a guest reboot keeps its log).
/// Writes from vCPU threads are buffered; the first write after a flush wakes the event loop,
/// which flushes shortly after, so an idle guest costs no periodic wake-ups.
#[derive(Clone)]
pub struct SharedSink(Arc<SinkState>);

struct SinkState {
    out: Mutex<Box<dyn Write + Send>>,
    pending: AtomicBool,
    wake: EventFd,
}

impl SharedSink {
    pub fn new(out: Box<dyn Write + Send>) -> io::Result<Self> {
        Ok(Self(Arc::new(SinkState {
            out: Mutex::new(out),
            pending: AtomicBool::new(false),
            wake: EventFd::new(EFD_NONBLOCK)?,
        })))
    }

    /// Whether output waits in the buffer.
    pub fn pending(&self) -> bool {
        self.0.pending.load(Ordering::Acquire)
    }

    /// Pushes buffered output out.
    pub fn flush_pending(&self) {
        if self.0.pending.swap(false, Ordering::AcqRel) {
            let _ = lock(&self.0.out).flush();
        }
    }

    /// Readable when output became pending.
    pub fn wake_fd(&self) -> &EventFd {
        &self.0.wake
    }
}

impl Write for SharedSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = lock(&self.0.out).write(buf)?;
        if !self.0.pending.swap(true, Ordering::AcqRel) {
            let _ = self.0.wake.write(1);
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.flush_pending();
        Ok(())
    }
}

impl Console {
    pub fn open(mode: &SerialMode) -> Result<Self, VmmError> {
        match mode {
            SerialMode::Stdio => Ok(Self {
                sink: Box::new(io::stdout()),
                input: ConsoleInput::Stdin,
            }),
            SerialMode::File(p) => {
                let f = File::create(p).map_err(|e| {
                    VmmError::Console(format!("cannot create {}: {e}", p.display()))
                })?;
                Ok(Self {
                    sink: Box::new(BufWriter::new(f)),
                    input: ConsoleInput::None,
                })
            }
            SerialMode::Unix(p) => {
                // A socket left by an earlier run is replaced; any other file is not ours.
                if let Ok(meta) = std::fs::symlink_metadata(p) {
                    if meta.file_type().is_socket() {
                        let _ = std::fs::remove_file(p);
                    } else {
                        return Err(VmmError::Console(format!(
                            "{} exists and is not a socket; choose another path",
                            p.display()
                        )));
                    }
                }
                let l = UnixListener::bind(p).map_err(|e| {
                    VmmError::Console(format!("cannot listen on {}: {e}", p.display()))
                })?;
                l.set_nonblocking(true)
                    .map_err(|e| VmmError::Console(e.to_string()))?;
                let client: Client = Arc::new(Mutex::new(None));
                Ok(Self {
                    sink: Box::new(ClientSink(client.clone())),
                    input: ConsoleInput::Socket(l, client),
                })
            }
        }
    }
}

const LISTENER: u32 = 1;
const CLIENT: u32 = 2;
const STDIN: u32 = 3;

/// Feeds what the user types (stdin or the socket client) into the UART.
pub struct ConsoleInputHandler {
    input: ConsoleInput,
    serial: Arc<Mutex<Serial>>,
}

impl ConsoleInputHandler {
    pub fn new(input: ConsoleInput, serial: Arc<Mutex<Serial>>) -> Self {
        Self { input, serial }
    }

    fn feed(&self, bytes: &[u8]) {
        let mut s = lock(&self.serial);
        let n = s.enqueue_input(bytes);
        if n < bytes.len() {
            tracing::debug!(
                "console input: {} bytes dropped (FIFO full)",
                bytes.len() - n
            );
        }
    }

    fn remove(ops: &mut EventOps, fd: RawFd) {
        let _ = ops.remove(Events::empty_raw(fd));
    }
}

impl MutEventSubscriber for ConsoleInputHandler {
    fn init(&mut self, ops: &mut EventOps) {
        match &self.input {
            ConsoleInput::None => {}
            ConsoleInput::Stdin => {
                // Regular files and /dev/null cannot be polled: no interactive input then.
                if let Err(e) = ops.add(Events::with_data_raw(0, STDIN, EventSet::IN)) {
                    tracing::debug!("stdin is not pollable ({e}); console input disabled");
                }
            }
            ConsoleInput::Socket(l, _) => {
                if let Err(e) = ops.add(Events::with_data(l, LISTENER, EventSet::IN)) {
                    tracing::warn!("serial socket: {e}");
                }
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        match events.data() {
            STDIN => match io::stdin().lock().read(&mut buf) {
                Ok(0) | Err(_) => Self::remove(ops, 0),
                Ok(n) => self.feed(&buf[..n]),
            },
            LISTENER => {
                if let ConsoleInput::Socket(l, client) = &self.input {
                    if let Ok((s, _)) = l.accept() {
                        let _ = s.set_nonblocking(true);
                        let mut g = lock(client);
                        if let Some(old) = g.take() {
                            Self::remove(ops, old.as_raw_fd());
                        }
                        if ops.add(Events::with_data(&s, CLIENT, EventSet::IN)).is_ok() {
                            *g = Some(s);
                        }
                    }
                }
            }
            CLIENT => {
                if let ConsoleInput::Socket(_, client) = &self.input {
                    let mut g = lock(client);
                    let r = match g.as_mut() {
                        Some(s) => s.read(&mut buf),
                        None => return,
                    };
                    match r {
                        Ok(n) if n > 0 => {
                            drop(g);
                            self.feed(&buf[..n]);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        _ => {
                            Self::remove(ops, events.fd());
                            *g = None;
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_socket_console_carries_both_ways() {
        use event_manager::{EventManager, SubscriberOps};
        use ferry_devices::{BusDevice, EdgeInterrupt};

        struct NoIrq;
        impl EdgeInterrupt for NoIrq {
            fn trigger(&self) {}
        }

        let path = std::env::temp_dir().join(format!("ferry-console-{}.sock", std::process::id()));
        let console = Console::open(&SerialMode::Unix(path.clone())).unwrap();
        let serial = Arc::new(Mutex::new(Serial::new(Arc::new(NoIrq), console.sink)));
        let mut em: EventManager<Box<dyn MutEventSubscriber + Send>> = EventManager::new().unwrap();
        em.add_subscriber(Box::new(ConsoleInputHandler::new(
            console.input,
            serial.clone(),
        )));

        // Output before anyone connects is dropped, never blocking the guest.
        lock(&serial).write(0, b"x");
        let mut client = UnixStream::connect(&path).unwrap();
        em.run_with_timeout(1000).unwrap();
        for b in b"hi\n" {
            lock(&serial).write(0, &[*b]);
        }
        let mut got = [0u8; 3];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi\n");

        client.write_all(b"k").unwrap();
        em.run_with_timeout(1000).unwrap();
        let mut rbr = [0u8];
        lock(&serial).read(0, &mut rbr);
        assert_eq!(rbr[0], b'k');
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn refuses_to_replace_a_regular_file() {
        let path = std::env::temp_dir().join(format!("ferry-console-{}.txt", std::process::id()));
        std::fs::write(&path, "keep me").unwrap();
        assert!(Console::open(&SerialMode::Unix(path.clone())).is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn parses_serial_modes() {
        assert_eq!("stdio".parse::<SerialMode>(), Ok(SerialMode::Stdio));
        assert_eq!(
            "file:/tmp/x".parse::<SerialMode>(),
            Ok(SerialMode::File("/tmp/x".into()))
        );
        assert_eq!(
            "unix:/tmp/s".parse::<SerialMode>(),
            Ok(SerialMode::Unix("/tmp/s".into()))
        );
        assert!("file:".parse::<SerialMode>().is_err());
        assert!("tcp:1234".parse::<SerialMode>().is_err());
    }
}
