//! Opens and changes files beneath an area's root without ever following a
//! symlink, in a way a concurrent rename or symlink swap cannot defeat.
//!
//! The area root is held open as a directory descriptor. A request's
//! directory is resolved from it with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)`, or, on kernels without openat2, one component at
//! a time with `openat(O_DIRECTORY | O_NOFOLLOW)`; every later operation
//! (open, create, rename, unlink, stat, symlink) is relative to that
//! directory's descriptor and never follows a symlink in its last
//! component. Names must already be checked by `paths::components`.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once openat2 answered ENOSYS (a kernel before 5.6) or EPERM (a
/// container whose seccomp profile refuses unknown system calls that
/// way); the component walk, with the same guarantees, is used from then.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// Switches to the component walk, saying why once.
fn without_openat2(err: &io::Error) {
    if !NO_OPENAT2.swap(true, Ordering::Relaxed) {
        crate::error::print_error(format!(
            "openat2 is not available here ({}); opening paths one component at a time instead, with the same guarantees",
            crate::error::describe_io(err)
        ));
    }
}

fn cstr(name: &[u8]) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `openat` relative to `dir` that never follows a symlink in `name`.
fn open_at(dir: RawFd, name: &[u8], flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    let name = cstr(name)?;
    loop {
        // SAFETY: a valid descriptor and NUL-terminated name.
        let fd = unsafe {
            libc::openat(
                dir,
                name.as_ptr(),
                flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                mode as libc::c_uint,
            )
        };
        match check(fd) {
            // SAFETY: the kernel just gave us this descriptor.
            Ok(fd) => return Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// An area root, held open.
pub(crate) struct Root {
    fd: OwnedFd,
    path: PathBuf,
}

/// A directory beneath a root, held open.
pub(crate) struct Dir {
    fd: OwnedFd,
    /// For messages and last-resort cleanup only; never opened by path.
    pub(crate) path: PathBuf,
}

/// What `fstatat` says of a name, without following it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Meta {
    pub(crate) kind: Kind,
    pub(crate) size: u64,
    pub(crate) mode: u32,
    pub(crate) mtime: i64,
    /// The nanoseconds of the mtime.
    pub(crate) mtime_ns: u32,
    /// The owner and group (numeric).
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    /// How many names the file has.
    pub(crate) nlink: u64,
    /// Device, inode, mtime and ctime in nanoseconds: what the hash cache
    /// keys on, so that any change to the file misses it.
    pub(crate) identity: [i128; 4],
    /// Bytes allocated on disk (`st_blocks` × 512).
    pub(crate) alloc: u64,
}

/// A directory's own mode, mtime and owner.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OwnMeta {
    pub(crate) mode: u32,
    pub(crate) mtime: i64,
    pub(crate) mtime_ns: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
}

/// What `stat` says of a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    File,
    Dir,
    Symlink,
    Other,
}

impl Root {
    pub(crate) fn open(path: &Path) -> io::Result<Root> {
        let fd = open_at(
            libc::AT_FDCWD,
            path.as_os_str().as_bytes(),
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )
        // The root itself may be a symlink to a directory; that one is
        // followed once, as the configuration or the user names it.
        .or_else(|_| Dir::open_path(path).map(|d| d.fd))?;
        Ok(Root {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// Whether the root's path still names the directory this root holds:
    /// false once it was replaced or a file system was mounted over it.
    pub(crate) fn still_named(&self) -> io::Result<bool> {
        use std::os::unix::fs::MetadataExt;
        let named = std::fs::metadata(&self.path)?;
        // SAFETY: zeroed stat is a valid out-buffer for fstat.
        let mut st: crate::sys::stat = unsafe { std::mem::zeroed() };
        // SAFETY: a descriptor we own and a valid out-buffer.
        check(unsafe { crate::sys::fstat(self.fd.as_raw_fd(), &mut st) })?;
        Ok(named.dev() == st.st_dev as u64 && named.ino() == st.st_ino as u64)
    }

    /// Another handle on the same root (for a thread of its own).
    pub(crate) fn try_clone(&self) -> io::Result<Root> {
        Ok(Root {
            fd: self.fd.try_clone()?,
            path: self.path.clone(),
        })
    }

    /// Opens the directory `comps` (relative, checked) beneath the root.
    /// With `create`, missing directories are made one at a time. A symlink
    /// anywhere is refused with ELOOP; a non-directory with ENOTDIR.
    pub(crate) fn dir(&self, comps: &[&[u8]], create: bool) -> io::Result<Dir> {
        let path = comps
            .iter()
            .fold(self.path.clone(), |p, c| p.join(OsStr::from_bytes(c)));
        if comps.is_empty() {
            let fd = open_at(
                self.fd.as_raw_fd(),
                b".",
                libc::O_RDONLY | libc::O_DIRECTORY,
                0,
            )?;
            return Ok(Dir { fd, path });
        }
        if !create && !NO_OPENAT2.load(Ordering::Relaxed) {
            let rel: Vec<u8> = comps.join(&b'/');
            match openat2_beneath(self.fd.as_raw_fd(), &rel) {
                Ok(fd) => return Ok(Dir { fd, path }),
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) => {
                    without_openat2(&e)
                }
                Err(e) => return Err(e),
            }
        }
        let mut fd = open_at(
            self.fd.as_raw_fd(),
            b".",
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )?;
        for c in comps {
            let next = match open_at(fd.as_raw_fd(), c, libc::O_RDONLY | libc::O_DIRECTORY, 0) {
                Err(e) if create && e.kind() == io::ErrorKind::NotFound => {
                    let name = cstr(c)?;
                    // SAFETY: a valid descriptor and NUL-terminated name.
                    match check(unsafe { libc::mkdirat(fd.as_raw_fd(), name.as_ptr(), 0o755) }) {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                        Err(e) => return Err(e),
                    }
                    open_at(fd.as_raw_fd(), c, libc::O_RDONLY | libc::O_DIRECTORY, 0)?
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTDIR | libc::ELOOP)) => {
                    // O_DIRECTORY|O_NOFOLLOW says ENOTDIR for a symlink too;
                    // tell the two apart for the caller.
                    let link = Dir {
                        fd,
                        path: PathBuf::new(),
                    }
                    .kind(c)?
                        == Some(Kind::Symlink);
                    return Err(io::Error::from_raw_os_error(if link {
                        libc::ELOOP
                    } else {
                        libc::ENOTDIR
                    }));
                }
                other => other?,
            };
            fd = next;
        }
        Ok(Dir { fd, path })
    }
}

/// `struct open_how` of openat2(2) (libc's is non-exhaustive).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

fn openat2_beneath(dir: RawFd, rel: &[u8]) -> io::Result<OwnedFd> {
    let name = cstr(rel)?;
    let how = OpenHow {
        flags: (libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS,
    };
    loop {
        // SAFETY: a valid descriptor, a NUL-terminated name and an open_how
        // of the size we pass.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir,
                name.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if rc >= 0 {
            // SAFETY: the kernel just gave us this descriptor.
            return Ok(unsafe { OwnedFd::from_raw_fd(rc as RawFd) });
        }
        let e = io::Error::last_os_error();
        // EAGAIN: a concurrent rename; the kernel asks us to retry.
        if !matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) {
            return Err(e);
        }
    }
}

impl Dir {
    /// Opens a file for reading; a symlink is refused (ELOOP), a FIFO does
    /// not block.
    pub(crate) fn open_read(&self, name: &[u8]) -> io::Result<File> {
        Ok(File::from(open_at(
            self.fd.as_raw_fd(),
            name,
            libc::O_RDONLY | libc::O_NONBLOCK,
            0,
        )?))
    }

    /// Creates a new file (never an existing one, never through a link).
    pub(crate) fn create_new(&self, name: &[u8]) -> io::Result<File> {
        self.create_excl(name, libc::O_WRONLY)
    }

    /// Creates a new file, mode 0600, opened with `access`.
    fn create_excl(&self, name: &[u8], access: libc::c_int) -> io::Result<File> {
        let flags = access | libc::O_CREAT | libc::O_EXCL;
        Ok(File::from(open_at(
            self.fd.as_raw_fd(),
            name,
            flags,
            0o600,
        )?))
    }

    /// Opens a file for reading and writing, creating it (mode 0600) when
    /// absent; never through a link.
    pub(crate) fn open_rw(&self, name: &[u8]) -> io::Result<File> {
        Ok(File::from(open_at(
            self.fd.as_raw_fd(),
            name,
            libc::O_RDWR | libc::O_CREAT,
            0o600,
        )?))
    }

    /// This directory's own permission bits and mtime.
    pub(crate) fn own_meta(&self) -> io::Result<OwnMeta> {
        // SAFETY: zeroed stat is a valid out-buffer for fstat.
        let mut st: crate::sys::stat = unsafe { std::mem::zeroed() };
        // SAFETY: a descriptor we own and a valid out-buffer.
        check(unsafe { crate::sys::fstat(self.fd.as_raw_fd(), &mut st) })?;
        Ok(OwnMeta {
            mode: st.st_mode & 0o7777,
            mtime: time(st.st_mtime),
            mtime_ns: st.st_mtime_nsec.clamp(0, 999_999_999) as u32,
            uid: st.st_uid,
            gid: st.st_gid,
        })
    }

    /// Sets this directory's own permission bits and mtime (seconds and
    /// nanoseconds).
    pub(crate) fn set_own_meta(
        &self,
        mode: Option<u32>,
        mtime: Option<(i64, u32)>,
    ) -> io::Result<()> {
        let fd = self.fd.as_raw_fd();
        if let Some(m) = mode {
            // SAFETY: a descriptor we own.
            check(unsafe { libc::fchmod(fd, (m & 0o777) as libc::mode_t) })?;
        }
        if let Some((t, ns)) = mtime {
            let times = [
                libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_OMIT,
                },
                libc::timespec {
                    tv_sec: to_time(t),
                    tv_nsec: ns.min(999_999_999) as _,
                },
            ];
            // SAFETY: a descriptor we own and two valid timespecs.
            check(unsafe { libc::futimens(fd, times.as_ptr()) })?;
        }
        Ok(())
    }

    /// Sets the owner and group of `name` itself (a symlink is not
    /// followed).
    pub(crate) fn chown_nofollow(&self, name: &[u8], uid: u32, gid: u32) -> io::Result<()> {
        let c = cstr(name)?;
        // SAFETY: a descriptor we own and a NUL-terminated name.
        check(unsafe {
            libc::fchownat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                uid,
                gid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
        .map(drop)
    }

    /// Sets the mtime of `name` itself (a symlink is not followed).
    pub(crate) fn set_mtime_nofollow(&self, name: &[u8], (t, ns): (i64, u32)) -> io::Result<()> {
        let c = cstr(name)?;
        let times = [
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            libc::timespec {
                tv_sec: to_time(t),
                tv_nsec: ns.min(999_999_999) as _,
            },
        ];
        // SAFETY: a descriptor we own, a NUL-terminated name and two valid
        // timespecs.
        check(unsafe {
            libc::utimensat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
        .map(drop)
    }

    /// Sets this directory's owner and group.
    pub(crate) fn set_own_owner(&self, uid: u32, gid: u32) -> io::Result<()> {
        // SAFETY: a descriptor we own.
        check(unsafe { libc::fchown(self.fd.as_raw_fd(), uid, gid) }).map(drop)
    }

    /// What `name` is, without following it; `None` when absent.
    pub(crate) fn kind(&self, name: &[u8]) -> io::Result<Option<Kind>> {
        Ok(self.stat(name)?.map(|m| m.kind))
    }

    /// `fstatat` without following; `None` when absent.
    pub(crate) fn stat(&self, name: &[u8]) -> io::Result<Option<Meta>> {
        let c = cstr(name)?;
        // SAFETY: zeroed stat is a valid out-buffer for fstatat.
        let mut st: crate::sys::stat = unsafe { std::mem::zeroed() };
        // SAFETY: a valid descriptor, NUL-terminated name and out-buffer.
        let rc = unsafe {
            crate::sys::fstatat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        match check(rc) {
            Ok(_) => Ok(Some(Meta {
                kind: match st.st_mode & libc::S_IFMT {
                    libc::S_IFREG => Kind::File,
                    libc::S_IFDIR => Kind::Dir,
                    libc::S_IFLNK => Kind::Symlink,
                    _ => Kind::Other,
                },
                size: st.st_size as u64,
                alloc: st.st_blocks as u64 * 512,
                mode: st.st_mode & 0o7777,
                mtime: time(st.st_mtime),
                mtime_ns: st.st_mtime_nsec.clamp(0, 999_999_999) as u32,
                uid: st.st_uid,
                gid: st.st_gid,
                nlink: st.st_nlink as u64,
                identity: [
                    st.st_dev as i128,
                    st.st_ino as i128,
                    st.st_mtime as i128 * 1_000_000_000 + st.st_mtime_nsec as i128,
                    st.st_ctime as i128 * 1_000_000_000 + st.st_ctime_nsec as i128,
                ],
            })),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The target of the symlink `name`.
    pub(crate) fn read_link(&self, name: &[u8]) -> io::Result<Vec<u8>> {
        let c = cstr(name)?;
        let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
        // SAFETY: a valid descriptor, NUL-terminated name and buffer.
        let n = unsafe {
            libc::readlinkat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        Ok(buf)
    }

    pub(crate) fn symlink(&self, target: &[u8], name: &[u8]) -> io::Result<()> {
        let (t, n) = (cstr(target)?, cstr(name)?);
        // SAFETY: NUL-terminated strings and a valid descriptor.
        check(unsafe { libc::symlinkat(t.as_ptr(), self.fd.as_raw_fd(), n.as_ptr()) }).map(drop)
    }

    /// Makes `to` in this directory another name of the file `name` in
    /// `from` (a hard link; a symlink there is linked as itself, never
    /// followed).
    pub(crate) fn link_from(&self, from: &Dir, name: &[u8], to: &[u8]) -> io::Result<()> {
        let (n, t) = (cstr(name)?, cstr(to)?);
        // SAFETY: NUL-terminated names and valid descriptors; flags 0
        // does not follow a symlink.
        check(unsafe {
            libc::linkat(
                from.fd.as_raw_fd(),
                n.as_ptr(),
                self.fd.as_raw_fd(),
                t.as_ptr(),
                0,
            )
        })
        .map(drop)
    }

    /// Renames within this directory; replaces a file or symlink at `to`,
    /// never a directory.
    pub(crate) fn rename(&self, from: &[u8], to: &[u8]) -> io::Result<()> {
        let (f, t) = (cstr(from)?, cstr(to)?);
        let fd = self.fd.as_raw_fd();
        // SAFETY: NUL-terminated names and a valid descriptor.
        check(unsafe { libc::renameat(fd, f.as_ptr(), fd, t.as_ptr()) }).map(drop)
    }

    /// Removes a file or symlink (not a directory, never a link's target).
    pub(crate) fn unlink(&self, name: &[u8]) -> io::Result<()> {
        let n = cstr(name)?;
        // SAFETY: a NUL-terminated name and a valid descriptor.
        check(unsafe { libc::unlinkat(self.fd.as_raw_fd(), n.as_ptr(), 0) }).map(drop)
    }

    /// Removes the empty directory `name` (ENOTEMPTY otherwise).
    pub(crate) fn rmdir(&self, name: &[u8]) -> io::Result<()> {
        let n = cstr(name)?;
        // SAFETY: a NUL-terminated name and a valid descriptor.
        check(unsafe { libc::unlinkat(self.fd.as_raw_fd(), n.as_ptr(), libc::AT_REMOVEDIR) })
            .map(drop)
    }

    /// Makes everything written to this directory's file system durable
    /// (`syncfs`): one call for many files.
    pub(crate) fn sync_fs(&self) -> io::Result<()> {
        // SAFETY: syncfs on a descriptor we own.
        check(unsafe { libc::syncfs(self.fd.as_raw_fd()) }).map(drop)
    }

    /// Makes renames and unlinks in this directory durable.
    pub(crate) fn sync(&self) {
        // SAFETY: fsync on a descriptor we own.
        unsafe { libc::fsync(self.fd.as_raw_fd()) };
    }

    /// Another handle on the same directory.
    pub(crate) fn try_clone(&self) -> io::Result<Dir> {
        Ok(Dir {
            fd: self.fd.try_clone()?,
            path: self.path.clone(),
        })
    }

    /// Opens the subdirectory `name`; a symlink is refused (ELOOP), a
    /// non-directory with ENOTDIR. With `create` it is made (mode 0755)
    /// when absent.
    pub(crate) fn open_dir(&self, name: &[u8], create: bool) -> io::Result<Dir> {
        let path = self.path.join(OsStr::from_bytes(name));
        let flags = libc::O_RDONLY | libc::O_DIRECTORY;
        let fd = match open_at(self.fd.as_raw_fd(), name, flags, 0) {
            Err(e) if create && e.kind() == io::ErrorKind::NotFound => {
                match self.mkdir(name, 0o755) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(e),
                }
                open_at(self.fd.as_raw_fd(), name, flags, 0)
            }
            other => other,
        }
        .map_err(|e| {
            // O_DIRECTORY|O_NOFOLLOW says ENOTDIR for a symlink too.
            if e.raw_os_error() == Some(libc::ENOTDIR)
                && self.kind(name).ok().flatten() == Some(Kind::Symlink)
            {
                io::Error::from_raw_os_error(libc::ELOOP)
            } else {
                e
            }
        })?;
        Ok(Dir { fd, path })
    }

    /// Makes the directory `name`.
    pub(crate) fn mkdir(&self, name: &[u8], mode: libc::mode_t) -> io::Result<()> {
        let c = cstr(name)?;
        // SAFETY: a valid descriptor and NUL-terminated name.
        check(unsafe { libc::mkdirat(self.fd.as_raw_fd(), c.as_ptr(), mode) }).map(drop)
    }

    /// Removes the empty directory `name` (never a link's target).
    pub(crate) fn remove_dir(&self, name: &[u8]) -> io::Result<()> {
        let n = cstr(name)?;
        // SAFETY: a NUL-terminated name and a valid descriptor.
        check(unsafe { libc::unlinkat(self.fd.as_raw_fd(), n.as_ptr(), libc::AT_REMOVEDIR) })
            .map(drop)
    }

    /// Opens the regular file `name` for reading. `Ok(None)` when absent;
    /// a symlink, FIFO, device or directory is an error and is never
    /// read or waited on.
    pub(crate) fn open_file(&self, name: &[u8]) -> io::Result<Option<File>> {
        match self.open_read(name) {
            Ok(f) => {
                regular(&f)?;
                Ok(Some(f))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(not_followed(e)),
        }
    }

    /// Opens the regular file `name` for appending, creating it (mode
    /// 0600) when absent; never through a link, never a FIFO.
    pub(crate) fn open_append(&self, name: &[u8]) -> io::Result<File> {
        let flags = libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_NONBLOCK;
        let f = File::from(open_at(self.fd.as_raw_fd(), name, flags, 0o600).map_err(not_followed)?);
        regular(&f)?;
        Ok(f)
    }

    /// Creates `name` afresh for reading and writing (mode 0600): whatever
    /// was there (a file, a symlink, a FIFO) is unlinked and replaced,
    /// never followed or opened. A directory in the way is an error.
    pub(crate) fn create_fresh(&self, name: &[u8]) -> io::Result<File> {
        // Creating first: an unlink of nothing still takes the directory's
        // lock, which parallel downloads into one directory queue on.
        match self.create_excl(name, libc::O_RDWR) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            made => return made,
        }
        match self.unlink(name) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        self.create_excl(name, libc::O_RDWR)
    }

    /// Renames `from` in this directory to `to` in `dest`; replaces a file
    /// or symlink at `to`, never a directory, never following either.
    pub(crate) fn rename_to(&self, from: &[u8], dest: &Dir, to: &[u8]) -> io::Result<()> {
        let (f, t) = (cstr(from)?, cstr(to)?);
        // SAFETY: NUL-terminated names and valid descriptors.
        check(unsafe {
            libc::renameat(
                self.fd.as_raw_fd(),
                f.as_ptr(),
                dest.fd.as_raw_fd(),
                t.as_ptr(),
            )
        })
        .map(drop)
    }

    /// The names in this directory (without `.` and `..`), sorted
    /// bytewise, with their kind when the filesystem says it.
    pub(crate) fn names(&self) -> io::Result<Vec<(Vec<u8>, Option<Kind>)>> {
        let dup = self.fd.try_clone()?;
        // SAFETY: fdopendir takes ownership of a descriptor we own.
        let dirp = unsafe { libc::fdopendir(dup.as_raw_fd()) };
        if dirp.is_null() {
            return Err(io::Error::last_os_error());
        }
        std::mem::forget(dup);
        struct Close(*mut libc::DIR);
        impl Drop for Close {
            fn drop(&mut self) {
                // SAFETY: a stream from fdopendir, closed once.
                unsafe { libc::closedir(self.0) };
            }
        }
        let dirp = Close(dirp);
        // SAFETY: a valid stream; the dup shares the offset, start over.
        unsafe { libc::rewinddir(dirp.0) };
        let mut out = Vec::new();
        loop {
            // SAFETY: errno is thread-local; readdir signals errors only
            // through it.
            unsafe { *libc::__errno_location() = 0 };
            // SAFETY: a valid stream.
            let ent = unsafe { crate::sys::readdir(dirp.0) };
            if ent.is_null() {
                let err = io::Error::last_os_error();
                if err.raw_os_error().unwrap_or(0) != 0 {
                    return Err(err);
                }
                break;
            }
            // SAFETY: readdir returned a valid entry with a NUL-terminated name.
            let (name, d_type) = unsafe {
                (
                    std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()).to_bytes(),
                    (*ent).d_type,
                )
            };
            if name == b"." || name == b".." {
                continue;
            }
            let kind = match d_type {
                libc::DT_REG => Some(Kind::File),
                libc::DT_DIR => Some(Kind::Dir),
                libc::DT_LNK => Some(Kind::Symlink),
                libc::DT_UNKNOWN => None,
                _ => Some(Kind::Other),
            };
            out.push((name.to_vec(), kind));
        }
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Writes `name` whole and atomically: a fresh temporary file
    /// `NAME.tmp` (never through a link), synced when `sync`, renamed
    /// over `name`.
    pub(crate) fn write_atomic(&self, name: &str, bytes: &[u8], sync: bool) -> io::Result<()> {
        use std::io::Write;
        let tmp = format!("{name}.tmp");
        let written = self.create_fresh(tmp.as_bytes()).and_then(|mut f| {
            f.write_all(bytes)?;
            if sync {
                f.sync_all()?;
            }
            self.rename(tmp.as_bytes(), name.as_bytes())
        });
        if written.is_err() {
            let _ = self.unlink(tmp.as_bytes());
        }
        written
    }

    /// Opens a directory named by the user (following a symlink there, as
    /// the shell would); what is beneath it is then reached through it.
    pub(crate) fn open_path(path: &Path) -> io::Result<Dir> {
        let name = cstr(path.as_os_str().as_bytes())?;
        // SAFETY: a NUL-terminated path.
        let fd = check(unsafe {
            libc::open(
                name.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        })?;
        Ok(Dir {
            // SAFETY: the kernel just gave us this descriptor.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            path: path.to_path_buf(),
        })
    }

    /// The filesystem's magic number (`statfs`'s `f_type`), if it tells.
    pub(crate) fn fs_magic(&self) -> Option<u64> {
        // SAFETY: zeroed statfs is a valid out-buffer.
        let mut st: crate::sys::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: a descriptor we own and a valid out-buffer.
        if unsafe { crate::sys::fstatfs(self.fd.as_raw_fd(), &mut st) } != 0 {
            return None;
        }
        #[allow(clippy::unnecessary_cast)]
        Some(st.f_type as u64)
    }

    /// The file system's free bytes for unprivileged writers.
    pub(crate) fn free_space(&self) -> Option<u64> {
        // SAFETY: zeroed statvfs is a valid out-buffer.
        let mut st: crate::sys::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: a descriptor we own and a valid out-buffer.
        if unsafe { crate::sys::fstatvfs(self.fd.as_raw_fd(), &mut st) } != 0 {
            return None;
        }
        // A filesystem that says it has no blocks at all (fusefat) cannot
        // tell.
        if st.f_blocks == 0 {
            return None;
        }
        Some(st.f_bavail as u64 * st.f_frsize as u64)
    }
}

/// A new file with no name in `dir` (O_TMPFILE), removed by the kernel
/// when closed; where the file system cannot do that, a fresh file that
/// is unlinked at once.
pub(crate) fn anonymous_file(dir: &Path) -> io::Result<File> {
    let d = cstr(dir.as_os_str().as_bytes())?;
    // SAFETY: a NUL-terminated path.
    let fd = unsafe {
        libc::open(
            d.as_ptr(),
            libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
            0o600 as libc::c_uint,
        )
    };
    if fd >= 0 {
        // SAFETY: the kernel just gave us this descriptor.
        return Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }));
    }
    let dir = Dir::open_path(dir)?;
    let name = format!(
        ".bitfog-scratch-{}-{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let f = dir.create_new(name.as_bytes())?;
    let _ = dir.unlink(name.as_bytes());
    Ok(f)
}

/// A `time_t` as seconds: 64 bits on most targets, 32 on older 32-bit
/// ones (armv7 glibc).
#[allow(clippy::unnecessary_cast, clippy::useless_conversion, deprecated)]
fn time(t: libc::time_t) -> i64 {
    t as i64
}

/// Seconds as a `time_t`, clamped where it is 32 bits wide.
#[allow(clippy::useless_conversion, deprecated)]
fn to_time(t: i64) -> libc::time_t {
    t.try_into().unwrap_or(if t < 0 {
        libc::time_t::MIN
    } else {
        libc::time_t::MAX
    })
}

/// Refuses anything but a regular file, with a message that says what it is.
pub(crate) fn regular(f: &File) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let ft = f.metadata()?.file_type();
    if ft.is_file() {
        return Ok(());
    }
    let what = if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "a device"
    };
    Err(io::Error::other(format!("{what}, not a regular file")))
}

/// ELOOP from an O_NOFOLLOW open means the name is a symlink: say so.
fn not_followed(e: io::Error) -> io::Error {
    if e.raw_os_error() == Some(libc::ELOOP) {
        io::Error::other("a symlink, not a regular file (never followed)")
    } else {
        e
    }
}

/// What a walk beneath a root finds, in the contract's order (a
/// depth-first walk visiting each directory's names in byte order).
pub(crate) enum Found<'a> {
    /// Anything but a directory: `dir` holds it as `name`; `rel` is its
    /// path relative to the root.
    Item {
        dir: &'a Arc<Dir>,
        rel: &'a Path,
        name: &'a [u8],
        kind: Kind,
    },
    /// A directory, before what is in it (the root first, as ""):
    /// `empty` when it has no names in it at all.
    Dir {
        dir: &'a Arc<Dir>,
        rel: &'a Path,
        empty: bool,
    },
    /// A directory that could not be opened, read or found again (a
    /// permission, a swap for a symlink, too many open files, an I/O
    /// error), or a name that could not be looked at: what is there is
    /// missing from the walk.
    Unreadable { rel: &'a Path, err: io::Error },
}

/// Levels of a walk whose directory stays open; deeper ones are found
/// again from the root when the walk returns to them, so a walk holds a
/// bounded number of descriptors however deep the tree.
const OPEN_LEVELS: usize = 32;

/// Walks everything beneath `root` through directory descriptors: each
/// directory is opened relative to its parent with O_NOFOLLOW, so a
/// directory swapped for a symlink is reported as unreadable and never
/// entered. `enter` decides which directories are walked into; `visit`
/// returns false to stop. A visitor may keep a directory's handle (an
/// `Arc`) past its visit, to look at its names later; each one kept holds
/// a descriptor open.
pub(crate) fn walk(
    root: &Root,
    enter: impl Fn(&Path) -> bool,
    mut visit: impl FnMut(Found<'_>) -> bool,
) {
    struct Level {
        rel: PathBuf,
        dir: Option<Arc<Dir>>,
        names: std::vec::IntoIter<(Vec<u8>, Option<Kind>)>,
    }
    let top = root
        .dir(&[], false)
        .and_then(|d| Ok((d.names()?, Arc::new(d))));
    let (names, dir) = match top {
        Ok(x) => x,
        Err(err) => {
            visit(Found::Unreadable {
                rel: Path::new(""),
                err,
            });
            return;
        }
    };
    if !visit(Found::Dir {
        dir: &dir,
        rel: Path::new(""),
        empty: names.is_empty(),
    }) {
        return;
    }
    let mut stack = vec![Level {
        rel: PathBuf::new(),
        dir: Some(dir),
        names: names.into_iter(),
    }];
    loop {
        let depth = stack.len();
        let Some(level) = stack.last_mut() else {
            return;
        };
        let Some((name, kind)) = level.names.next() else {
            stack.pop();
            continue;
        };
        if level.dir.is_none() {
            let comps: Vec<&[u8]> = level.rel.iter().map(|c| c.as_bytes()).collect();
            match root.dir(&comps, false) {
                Ok(d) => level.dir = Some(Arc::new(d)),
                Err(err) => {
                    let rel = std::mem::take(&mut level.rel);
                    stack.pop();
                    if !visit(Found::Unreadable { rel: &rel, err }) {
                        return;
                    }
                    continue;
                }
            }
        }
        let dir = level.dir.as_ref().expect("opened above");
        let rel = level.rel.join(OsStr::from_bytes(&name));
        let kind = match kind {
            Some(k) => k,
            None => match dir.kind(&name) {
                Ok(Some(k)) => k,
                Ok(None) => continue,
                Err(err) => {
                    if !visit(Found::Unreadable { rel: &rel, err }) {
                        return;
                    }
                    continue;
                }
            },
        };
        if kind != Kind::Dir {
            let item = Found::Item {
                dir,
                rel: &rel,
                name: &name,
                kind,
            };
            if !visit(item) {
                return;
            }
            continue;
        }
        if !enter(&rel) {
            continue;
        }
        let child = dir
            .open_dir(&name, false)
            .and_then(|d| Ok((d.names()?, Arc::new(d))));
        let (names, child) = match child {
            Ok(x) => x,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => {
                if !visit(Found::Unreadable { rel: &rel, err }) {
                    return;
                }
                continue;
            }
        };
        if !visit(Found::Dir {
            dir: &child,
            rel: &rel,
            empty: names.is_empty(),
        }) {
            return;
        }
        if names.is_empty() {
            continue;
        }
        if depth > OPEN_LEVELS {
            level.dir = None;
        }
        stack.push(Level {
            rel,
            dir: Some(child),
            names: names.into_iter(),
        });
    }
}

/// What identifies a version of a file without reading it (device, inode,
/// mtime and ctime in nanoseconds): any write changes the ctime.
pub(crate) fn identity(m: &std::fs::Metadata) -> [i128; 4] {
    use std::os::unix::fs::MetadataExt;
    [
        m.dev() as i128,
        m.ino() as i128,
        m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_swapped_for_a_symlink_mid_walk_is_not_entered() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("area");
        let outside = t.path().join("outside");
        for d in ["a", "b", "c"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
            std::fs::write(root.join(d).join("f"), d).unwrap();
        }
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), "x").unwrap();
        let r = Root::open(&root).unwrap();
        let mut seen = Vec::new();
        let mut unreadable = Vec::new();
        walk(
            &r,
            |_| true,
            |found| {
                match found {
                    Found::Item { rel, .. } => {
                        // While a/ is walked, b/ becomes a link to outside.
                        if rel == Path::new("a/f") {
                            std::fs::rename(root.join("b"), t.path().join("b-moved")).unwrap();
                            std::os::unix::fs::symlink(&outside, root.join("b")).unwrap();
                        }
                        seen.push(rel.to_path_buf());
                    }
                    Found::Unreadable { rel, .. } => unreadable.push(rel.to_path_buf()),
                    Found::Dir { .. } => {}
                }
                true
            },
        );
        assert_eq!(seen, [Path::new("a/f"), Path::new("c/f")]);
        assert_eq!(unreadable, [Path::new("b")], "reported, never entered");
    }

    #[test]
    fn refuses_symlinks_everywhere() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("area");
        let outside = t.path().join("outside");
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), "x").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), root.join("d/filelink")).unwrap();
        let r = Root::open(&root).unwrap();
        for create in [false, true] {
            assert!(r.dir(&[b"link"], create).is_err());
            assert!(r.dir(&[b"d", b"filelink"], create).is_err());
            assert!(r.dir(&[b"d"], create).is_ok());
        }
        let d = r.dir(&[b"d"], false).unwrap();
        assert!(d.open_read(b"filelink").is_err());
        assert_eq!(d.kind(b"filelink").unwrap(), Some(Kind::Symlink));
        assert!(d.create_new(b"filelink").is_err());
        assert_eq!(
            r.dir(&[b"new", b"deeper"], true)
                .unwrap()
                .kind(b"x")
                .unwrap(),
            None
        );
        assert!(root.join("new/deeper").is_dir());
        // The walk without openat2 refuses the same.
        NO_OPENAT2.store(true, Ordering::Relaxed);
        assert!(r.dir(&[b"link"], false).is_err());
        assert!(r.dir(&[b"d"], false).is_ok());
        NO_OPENAT2.store(false, Ordering::Relaxed);
    }
}
