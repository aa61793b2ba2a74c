//! pidfds: a handle that stays bound to one process (no pid-reuse races) and becomes readable
//! when it exits, so exits are awaited, never polled.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;

use super::ProcessIdentity;

pub struct PidFd {
    fd: AsyncFd<OwnedFd>,
    pid: i32,
}

impl PidFd {
    /// Opens a pidfd for `pid`. The caller checks identity afterwards when the pid is not its
    /// own unreaped child (see [`PidFd::open_identity`]).
    pub fn open(pid: i32) -> io::Result<Self> {
        let fd = open_raw(pid)?;
        // SAFETY: the OwnedFd stays inside the AsyncFd, open and unchanged, for its whole life.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(PidFd { fd, pid })
    }

    /// Opens a pidfd and then confirms the process is still the one named by `identity`; the
    /// order matters: once the fd is open the pid cannot be recycled behind it.
    pub fn open_identity(identity: ProcessIdentity) -> io::Result<Self> {
        let fd = Self::open(identity.pid)?;
        confirm(identity)?;
        Ok(fd)
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Completes when the process has exited.
    pub async fn exited(&self) -> io::Result<()> {
        let mut guard = self.fd.readable().await?;
        guard.retain_ready();
        Ok(())
    }

    pub fn send_signal(&self, signal: i32) -> io::Result<()> {
        send(self.fd.get_ref(), signal)
    }

    /// Reaps the process if it is our exited child. Only the owner of a child calls this.
    pub fn reap(&self) -> io::Result<()> {
        let fd = self.fd.get_ref().as_raw_fd();
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid with a zeroed siginfo buffer we own.
        let rc = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                fd as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

/// Sends `signal` to the process `identity` names, if it still is that process. Needs no async
/// runtime (the shim, which has none, signals its tree with it).
pub fn signal_identity(identity: ProcessIdentity, signal: i32) -> io::Result<()> {
    let fd = open_raw(identity.pid)?;
    confirm(identity)?;
    send(&fd, signal)
}

fn open_raw(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the returned fd (CLOEXEC by the kernel) is owned here.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(raw as i32) })
}

/// Whether the pid is still the process `identity` names; checked after its pidfd is open,
/// because from then on the pid cannot be recycled.
fn confirm(identity: ProcessIdentity) -> io::Result<()> {
    if ProcessIdentity::of(identity.pid)? != identity {
        return Err(io::Error::from(io::ErrorKind::NotFound));
    }
    Ok(())
}

fn send(fd: &OwnedFd, signal: i32) -> io::Result<()> {
    // SAFETY: plain syscall on an fd the caller owns.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
