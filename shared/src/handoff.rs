//! Zero-downtime upgrades: the running server hands its listening sockets to a new
//! process over a Unix socket (`SCM_RIGHTS`); the new process serves on them, then the
//! old one stops accepting, drains its connections and exits. No connection attempt is
//! refused: the listening sockets never close, both processes accept on them until the
//! old one stops, and what waits in their backlog is accepted by the new one.
//!
//! (Not systemd socket activation: that hands sockets from systemd to a service it
//! starts, not from a running process to its successor, and it needs systemd; this works
//! under any supervisor, hands over the admin and metrics listeners too, and is what
//! Pingora and nginx do.)
//!
//! The exchange, one per connection on the upgrade socket (a path in a directory only
//! the service's user can enter; the socket is mode 0600 and the peer must run as the
//! same user):
//!
//! 1. new → old: `KEYLESS-UPGRADE 1\n`;
//! 2. old → new: the sockets' names, one per line, and the sockets (`SCM_RIGHTS`);
//! 3. new → old: `READY\n` once it serves on them; the old process then drains.
//!
//! A new process that fails before step 3 changes nothing: the old one keeps serving
//! and waits for the next.

use std::io::{self, IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

const HELLO: &[u8] = b"KEYLESS-UPGRADE 1\n";
const READY: &[u8] = b"READY\n";
/// Most sockets one handoff carries.
const MAX_SOCKETS: usize = 8;
/// Longest wait for each step of the exchange but the last.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a process that handed over its sockets lives at least after the handoff
/// (after its drain): the service manager has received its successor's `MAINPID` by
/// then, so the old main process exiting does not look like the service ending.
pub const LINGER_AFTER_HANDOFF: Duration = Duration::from_secs(1);
/// Longest wait for a new process to say it serves once it has the sockets: it loads
/// its keys or cache index and connects to its key servers first.
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a new process could not take the sockets.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandoffError {
    /// The upgrade socket could not be used.
    #[error("upgrade socket {path}: {source}")]
    Io {
        /// The socket's path.
        path: String,
        /// The cause.
        source: io::Error,
    },
    /// The running process answered something else than the exchange expects.
    #[error("upgrade socket {path}: {what}")]
    Protocol {
        /// The socket's path.
        path: String,
        /// What was wrong.
        what: String,
    },
}

/// The sockets a new process took from the running one; [`Taken::ready`] tells it to
/// drain.
#[derive(Debug)]
pub struct Taken {
    stream: UnixStream,
    sockets: Vec<(String, OwnedFd)>,
}

impl Taken {
    /// The listening TCP socket named `name`, checked to be bound to `addr` (an upgrade
    /// keeps the listening addresses; changing them takes a restart).
    pub fn tcp_listener(
        &mut self,
        name: &str,
        addr: SocketAddr,
    ) -> io::Result<std::net::TcpListener> {
        let i = self
            .sockets
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| {
                io::Error::other(format!("the running process has no {name} listener"))
            })?;
        let listener = std::net::TcpListener::from(self.sockets.swap_remove(i).1);
        let bound = listener.local_addr()?;
        if bound != addr {
            return Err(io::Error::other(format!(
                "the running process's {name} listener is {bound}, the configuration says {addr}: an upgrade keeps the listening addresses"
            )));
        }
        listener.set_nonblocking(true)?;
        Ok(listener)
    }

    /// Tells the running process that this one serves: it stops accepting and drains.
    pub fn ready(mut self) -> io::Result<()> {
        self.stream.write_all(READY)
    }
}

/// A TCP listener on `addr` named `name`: taken from the running process when there is
/// one (`taken`), else newly bound. Non-blocking, for tokio.
pub fn tcp_listener(
    taken: Option<&mut Taken>,
    name: &str,
    addr: SocketAddr,
) -> io::Result<std::net::TcpListener> {
    match taken {
        Some(taken) => taken.tcp_listener(name, addr),
        None => {
            let listener = std::net::TcpListener::bind(addr)?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        }
    }
}

/// Takes the listening sockets of the process serving upgrades on `path`.
pub fn take(path: &Path) -> Result<Taken, HandoffError> {
    let shown = path.display().to_string();
    let io_error = |source| HandoffError::Io {
        path: shown.clone(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(io_error)?;
    stream
        .set_read_timeout(Some(STEP_TIMEOUT))
        .map_err(io_error)?;
    stream
        .set_write_timeout(Some(STEP_TIMEOUT))
        .map_err(io_error)?;
    stream.write_all(HELLO).map_err(io_error)?;
    let mut names = [0u8; 512];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = rustix::net::recvmsg(
        &stream,
        &mut [IoSliceMut::new(&mut names)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|e| io_error(e.into()))?;
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = message {
            fds.extend(rights);
        }
    }
    let text = String::from_utf8_lossy(&names[..received.bytes]).into_owned();
    let names: Vec<&str> = text.lines().collect();
    if names.is_empty() || names.len() != fds.len() {
        return Err(HandoffError::Protocol {
            path: shown,
            what: format!(
                "{} socket name(s) with {} socket(s)",
                names.len(),
                fds.len()
            ),
        });
    }
    let sockets = names.into_iter().map(str::to_owned).zip(fds).collect();
    Ok(Taken { stream, sockets })
}

/// Binds the upgrade socket at `path`, mode 0600, replacing a socket file left there (by
/// a process that stopped, or the one this process took over from).
fn bind(path: &Path) -> io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// The listening sockets a running process offers its successor, and where.
#[derive(Debug)]
pub struct Offer {
    path: PathBuf,
    sockets: Vec<(String, OwnedFd)>,
}

impl Offer {
    /// Copies of the sockets of `listeners`, named, to offer on the upgrade socket
    /// `path`. A copy keeps its socket open in this process: drop the offer (abort its
    /// task) when the process stops, so that its ports close.
    pub fn new(path: &Path, listeners: &[(&str, BorrowedFd<'_>)]) -> io::Result<Offer> {
        let sockets = listeners
            .iter()
            .map(|(name, fd)| Ok(((*name).to_owned(), fd.try_clone_to_owned()?)))
            .collect::<io::Result<_>>()?;
        Ok(Offer {
            path: path.to_owned(),
            sockets,
        })
    }

    /// Binds the upgrade socket and serves upgrade requests on it until a new process
    /// has taken the sockets and said it serves: the task ends then. Start it once this
    /// process serves (its predecessor, if any, offered on the same path until then).
    pub fn start(self) -> io::Result<tokio::task::JoinHandle<()>> {
        let listener = bind(&self.path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("upgrade socket {}: {e}", self.path.display()),
            )
        })?;
        Ok(tokio::spawn(offer(listener, self.sockets)))
    }
}

/// Serves upgrade requests on `listener` until a new process has taken `sockets` and
/// said it serves on them; each failed attempt is logged and the next awaited.
async fn offer(listener: UnixListener, sockets: Vec<(String, OwnedFd)>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "upgrade socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match hand_over(stream, &sockets).await {
            Ok(pid) => {
                tracing::info!(
                    new_pid = pid,
                    "upgrade: the new process serves on the listening sockets"
                );
                return;
            }
            Err(e) => tracing::warn!(error = %e, "upgrade: handoff failed; still serving"),
        }
    }
}

/// One exchange with a new process; its pid once it said it serves.
async fn hand_over(
    mut stream: tokio::net::UnixStream,
    sockets: &[(String, OwnedFd)],
) -> io::Result<i32> {
    let peer = rustix::net::sockopt::socket_peercred(&stream)?;
    let me = rustix::process::geteuid();
    if peer.uid != me {
        return Err(io::Error::other(format!(
            "peer runs as uid {}, not {}",
            peer.uid.as_raw(),
            me.as_raw()
        )));
    }
    let mut hello = [0u8; HELLO.len()];
    tokio::time::timeout(STEP_TIMEOUT, stream.read_exact(&mut hello))
        .await
        .map_err(|_| io::Error::other("no hello in time"))??;
    if hello != HELLO {
        return Err(io::Error::other("not an upgrade request"));
    }
    let names: String = sockets.iter().map(|(n, _)| format!("{n}\n")).collect();
    let fds: Vec<BorrowedFd<'_>> = sockets.iter().map(|(_, fd)| fd.as_fd()).collect();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if fds.len() > MAX_SOCKETS || !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::other("too many sockets for one handoff"));
    }
    stream.writable().await?;
    let sent = rustix::net::sendmsg(
        &stream,
        &[IoSlice::new(names.as_bytes())],
        &mut control,
        SendFlags::empty(),
    )?;
    if sent != names.len() {
        return Err(io::Error::other("short write of the socket names"));
    }
    let mut ready = [0u8; READY.len()];
    tokio::time::timeout(READY_TIMEOUT, stream.read_exact(&mut ready))
        .await
        .map_err(|_| io::Error::other("the new process did not say it serves in time"))??;
    if ready != READY {
        return Err(io::Error::other(
            "the new process said something else than READY",
        ));
    }
    let _ = stream.shutdown().await;
    Ok(peer.pid.as_raw_nonzero().get())
}

/// A serving process's side of upgrades: started once it serves, it tells its
/// predecessor (when it took over) and the service manager, then offers the listening
/// sockets to a successor, which `SIGUSR2` starts.
#[derive(Debug)]
pub struct Upgrades {
    offer: Option<tokio::task::JoinHandle<()>>,
    successor: Option<tokio::task::JoinHandle<()>>,
    handed_off: Option<tokio::time::Instant>,
}

impl Upgrades {
    /// Tells the service manager, then the predecessor (`taken`), that this process
    /// serves, and starts offering (`offer`: none = no upgrades).
    pub fn start(taken: Option<Taken>, offer: Option<Offer>) -> io::Result<Upgrades> {
        // The service manager first: this is its main process now.
        notify_ready(taken.is_some());
        if let Some(taken) = taken {
            taken.ready().map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot tell the previous process that this one serves: {e}"),
                )
            })?;
            tracing::info!("upgrade: serving; the previous process drains and exits");
        }
        // Only now: the predecessor offered on the same path until this one said it serves.
        let offer = offer.map(Offer::start).transpose()?;
        let successor = offer
            .is_some()
            .then(|| tokio::spawn(successor_on_sigusr2()));
        Ok(Upgrades {
            offer,
            successor,
            handed_off: None,
        })
    }

    /// Resolves once a successor serves on the sockets (never without an offer).
    pub async fn handed_off(&mut self) {
        match self.offer.as_mut() {
            Some(offer) => {
                let _ = offer.await;
                self.offer = None;
                self.handed_off = Some(tokio::time::Instant::now());
            }
            None => std::future::pending().await,
        }
    }

    /// Stops offering: the copies of the listening sockets close (so do the ports,
    /// unless a successor has them).
    pub fn stop(&mut self) {
        for task in [self.offer.take(), self.successor.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
    }

    /// After a handoff, waits until [`LINGER_AFTER_HANDOFF`] after it.
    pub async fn linger(&self) {
        if let Some(at) = self.handed_off {
            tokio::time::sleep_until(at + LINGER_AFTER_HANDOFF).await;
        }
    }
}

/// Starts this binary again, from the path it was started as, with its arguments and
/// `--upgrade`: the new process takes over through the upgrade socket. What `SIGUSR2`
/// does (see [`successor_on_sigusr2`]): under a service manager the new process is
/// then part of the service. Its pid; a thread waits for it and logs if it exits
/// (it exits only when it failed to take over, or at the end of its life).
pub fn spawn_successor() -> io::Result<u32> {
    let mut args = std::env::args_os();
    let program = args
        .next()
        .ok_or_else(|| io::Error::other("no program path in argv"))?;
    let rest: Vec<std::ffi::OsString> = args.filter(|a| a != "--upgrade").collect();
    let mut child = std::process::Command::new(&program)
        .args(rest)
        .arg("--upgrade")
        .stdin(std::process::Stdio::null())
        .spawn()?;
    let pid = child.id();
    std::thread::Builder::new()
        .name("keyless-successor".into())
        .spawn(move || match child.wait() {
            Ok(status) if status.success() => {}
            Ok(status) => tracing::warn!(pid, %status, "upgrade: the new process exited"),
            Err(e) => tracing::warn!(pid, error = %e, "upgrade: cannot wait for the new process"),
        })?;
    Ok(pid)
}

/// On each `SIGUSR2`, starts the successor ([`spawn_successor`]); runs until aborted.
pub async fn successor_on_sigusr2() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut usr2 = match signal(SignalKind::user_defined2()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install the SIGUSR2 handler: upgrade with --upgrade only");
            return;
        }
    };
    while usr2.recv().await.is_some() {
        match spawn_successor() {
            Ok(pid) => tracing::info!(
                new_pid = pid,
                "SIGUSR2: started the binary again with --upgrade"
            ),
            Err(e) => {
                tracing::error!(error = %e, "SIGUSR2: cannot start the binary again; still serving")
            }
        }
    }
}

/// Tells the service manager (systemd `Type=notify`, through `$NOTIFY_SOCKET`) that this
/// process serves; after an upgrade, also that it is now the service's main process
/// (`MAINPID`, which needs `NotifyAccess=all`). Nothing without `$NOTIFY_SOCKET`.
pub fn notify_ready(upgraded: bool) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let message = match upgraded {
        true => format!("MAINPID={}\nREADY=1\n", std::process::id()),
        false => "READY=1\n".to_owned(),
    };
    if let Err(e) = send_notification(&path, message.as_bytes()) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

fn send_notification(path: &std::ffi::OsStr, message: &[u8]) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::UnixDatagram;
    let socket = UnixDatagram::unbound()?;
    match path.as_bytes() {
        [b'@', name @ ..] => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(message, &addr)?;
        }
        _ => {
            socket.send_to(message, Path::new(path))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_listener_moves_to_the_new_process_and_keeps_its_backlog() {
        let dir = std::env::temp_dir().join(format!("keyless-handoff-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("upgrade.sock");
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let offered = Offer::new(&path, &[("https", tcp.as_fd())])
            .unwrap()
            .start()
            .unwrap();

        // A connection waits in the backlog while the socket changes hands.
        let waiting = std::net::TcpStream::connect(addr).unwrap();
        let p = path.clone();
        let mut taken = tokio::task::spawn_blocking(move || take(&p))
            .await
            .unwrap()
            .unwrap();
        drop(tcp);
        let listener = taken.tcp_listener("https", addr).unwrap();
        assert!(taken.tcp_listener("admin", addr).is_err());
        tokio::task::spawn_blocking(move || taken.ready())
            .await
            .unwrap()
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), offered)
            .await
            .unwrap()
            .unwrap();

        listener.set_nonblocking(false).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert_eq!(accepted.peer_addr().unwrap(), waiting.local_addr().unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_service_manager_is_told_ready_and_the_new_main_pid() {
        let dir = std::env::temp_dir().join(format!("keyless-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let receiver = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        send_notification(path.as_os_str(), b"MAINPID=42\nREADY=1\n").unwrap();
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"MAINPID=42\nREADY=1\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_new_process_that_never_says_ready_changes_nothing() {
        let dir = std::env::temp_dir().join(format!("keyless-handoff-2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("upgrade.sock");
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let offered = Offer::new(&path, &[("https", tcp.as_fd())])
            .unwrap()
            .start()
            .unwrap();
        let p = path.clone();
        let taken = tokio::task::spawn_blocking(move || take(&p))
            .await
            .unwrap()
            .unwrap();
        drop(taken);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!offered.is_finished(), "the offer ended without READY");
        offered.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
