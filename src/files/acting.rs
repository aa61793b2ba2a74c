//! Acting as the sandbox's user for file operations in sidecar mode: the main container's
//! processes (and execd, which ran among them) see files with that user's rights, and files they
//! create are theirs. The calling thread alone takes the user's filesystem ids and groups
//! (`setfsuid`, `setfsgid` and the raw `setgroups` syscall: glibc's wrapper would change every
//! thread of sandlet) until the guard is dropped.

use std::io;

use crate::process::enter::Credentials;

pub struct ActingAs {
    uid: u32,
    gid: u32,
    groups: Vec<libc::gid_t>,
}

/// Switches this thread's filesystem credentials to `user` until the guard drops.
pub fn act_as(user: &Credentials) -> io::Result<ActingAs> {
    let groups = current_groups()?;
    // SAFETY: plain syscalls on this thread's credentials.
    let (uid, gid) = unsafe { (current_fsuid(), current_fsgid()) };
    let guard = ActingAs { uid, gid, groups };
    set_groups(&user.groups)?;
    // SAFETY: as above; the results are checked by reading the ids back.
    unsafe {
        libc::setfsgid(user.gid);
        libc::setfsuid(user.uid);
        if current_fsgid() != user.gid || current_fsuid() != user.uid {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "cannot act as uid {} gid {} for file operations (does sandlet have CAP_SETUID and CAP_SETGID?)",
                    user.uid, user.gid
                ),
            ));
        }
    }
    Ok(guard)
}

impl Drop for ActingAs {
    fn drop(&mut self) {
        // SAFETY: restoring this thread's own earlier ids, which it was allowed to hold.
        unsafe {
            libc::setfsuid(self.uid);
            libc::setfsgid(self.gid);
        }
        if let Err(e) = set_groups(&self.groups) {
            // A pool thread with the wrong groups would serve later requests with them.
            tracing::error!(error = %e, "cannot restore a thread's groups after acting as the sandbox user");
            std::process::abort();
        }
    }
}

fn current_groups() -> io::Result<Vec<libc::gid_t>> {
    // SAFETY: getgroups with a buffer of the size it reported.
    unsafe {
        let n = libc::getgroups(0, std::ptr::null_mut());
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut groups = vec![0; n as usize];
        let n = libc::getgroups(n, groups.as_mut_ptr());
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        groups.truncate(n as usize);
        Ok(groups)
    }
}

fn set_groups(groups: &[u32]) -> io::Result<()> {
    // SAFETY: the raw syscall (this thread only) with a valid slice.
    let rc = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `setfsuid` with an invalid id changes nothing and returns the current one.
unsafe fn current_fsuid() -> u32 {
    unsafe { libc::setfsuid(u32::MAX) as u32 }
}

unsafe fn current_fsgid() -> u32 {
    unsafe { libc::setfsgid(u32::MAX) as u32 }
}
