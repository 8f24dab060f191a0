//! The libc calls whose plain names are 32-bit on 32-bit glibc (armv7):
//! there `stat`, `readdir`, `lseek` and `sendfile` fail with EOVERFLOW on
//! a large inode number, size or offset, so the `...64` calls stand in.
//! Everywhere else (64-bit targets, musl) the plain ones are already
//! 64-bit. And whether a process is gone, for files named after the
//! process that writes them.

#[cfg(all(target_env = "gnu", target_pointer_width = "32"))]
pub(crate) use libc::{
    fstat64 as fstat, fstatat64 as fstatat, fstatfs64 as fstatfs, fstatvfs64 as fstatvfs,
    lseek64 as lseek, off64_t as off_t, readdir64 as readdir, sendfile64 as sendfile,
    stat64 as stat, statfs64 as statfs, statvfs64 as statvfs,
};

#[cfg(not(all(target_env = "gnu", target_pointer_width = "32")))]
pub(crate) use libc::{
    fstat, fstatat, fstatfs, fstatvfs, lseek, off_t, readdir, sendfile, stat, statfs, statvfs,
};

/// True when no process has this PID (`kill(pid, 0)` says ESRCH). One
/// that exists but is not ours (EPERM), or any doubt, counts as alive:
/// what it may be writing is left alone.
pub(crate) fn process_gone(pid: i32) -> bool {
    // SAFETY: signal 0 only asks whether the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}
