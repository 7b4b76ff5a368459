//! Moving a relay's bytes inside the kernel: `splice(2)` from one socket into a
//! pipe, then from the pipe into the other socket. The payload's pages are
//! handed from socket to pipe to socket by reference and never copied through
//! user space, which on a bulk transfer is most of what a forwarder costs.
//!
//! A pipe is two descriptors and a little kernel memory, so a relay holds one
//! only while bytes are moving in its direction: it takes one from [`Pipes`]
//! when its source has data and gives it back as soon as the source runs dry.
//! An idle connection holds none; a pool of a few pipes saves the two
//! syscalls of making and closing one per burst. Pipes count against the
//! process's [`DescriptorBudget`](super::descriptors::DescriptorBudget) like
//! the sockets do: when it is spent, a burst is copied instead.
//!
//! The same pipes serve a plain tunnel's exchanges (`tunnel::exchange`),
//! which splice each chunk's payload between the local socket and the data
//! channel and write only its header through user space.
//!
//! Where splice cannot serve — not Linux, a kernel or a seccomp filter that
//! refuses it (`EINVAL`, `ENOSYS`, `EPERM`), or `TUNNELD_FORCE_COPY=1` (for
//! benchmarks: the same build, the other path) — [`Pipes::take`] gives none and
//! the relay copies through user space as before.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::descriptors::{BudgetShare, DescriptorBudget, Taken};
use crate::core::sync::lock;

/// Bytes a pipe holds (`F_SETPIPE_SZ`): what one splice moves at most. The
/// kernel's default is 64 KiB; a larger pipe halves the syscalls of a bulk
/// transfer. Its pages are allocated only while holding data. If the kernel
/// refuses the size (an unprivileged user past `pipe-user-pages-soft`), the
/// pipe keeps the size it got.
const PIPE_SIZE: usize = 256 * 1024;

/// Idle pipes kept for the next burst, at most: enough for the directions of
/// a busy daemon that start and stop at once, few enough that what the pool
/// holds (two descriptors each) is small beside the budget.
const POOL_MAX: usize = 32;

/// Descriptors of one pipe.
const PIPE_DESCRIPTORS: u32 = 2;

/// A pipe for one direction of a relay, non-blocking at both ends.
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// How many bytes it holds at most.
    size: usize,
    _descriptors: Taken,
}

impl Pipe {
    /// Bytes one splice into it may move.
    pub(crate) fn size(&self) -> usize {
        self.size
    }
}

/// Where the relays of one process get their pipes.
pub(crate) struct Pipes {
    idle: Mutex<Vec<Pipe>>,
    /// How many idle pipes the pool keeps.
    keep: usize,
    budget: BudgetShare,
    /// Splicing is off: forced, or refused by the kernel once.
    off: AtomicBool,
}

impl Pipes {
    /// Pipes whose descriptors come out of `budget`; none at all where splice
    /// cannot serve (see the module doc).
    pub(crate) fn new(budget: &DescriptorBudget) -> Pipes {
        let forced_copy = std::env::var_os("TUNNELD_FORCE_COPY").is_some_and(|v| v == "1");
        if forced_copy {
            debug!("TUNNELD_FORCE_COPY=1: relays copy through user space");
        }
        // The pool's descriptors come out of the budget too: keep it within a
        // sixteenth of it.
        let keep = POOL_MAX.min(budget.capacity() / 16 / PIPE_DESCRIPTORS as usize);
        Pipes {
            idle: Mutex::new(Vec::new()),
            keep,
            budget: budget.share(),
            off: AtomicBool::new(forced_copy || !cfg!(target_os = "linux")),
        }
    }

    /// Whether relays splice (rather than copy) now.
    pub(crate) fn splicing(&self) -> bool {
        !self.off.load(Ordering::Relaxed)
    }

    /// A pipe for a burst: an idle one, or a new one while the descriptor
    /// budget allows; `None` when splicing is off or no pipe can be had now
    /// (then the burst is copied).
    pub(crate) fn take(&self) -> Option<Pipe> {
        if !self.splicing() {
            return None;
        }
        if let Some(pipe) = lock(&self.idle).pop() {
            return Some(pipe);
        }
        let descriptors = self.budget.try_take(PIPE_DESCRIPTORS)?;
        match sys::pipe() {
            Ok((read, write, size)) => Some(Pipe { read, write, size, _descriptors: descriptors }),
            Err(e) if cannot_splice(&e) => {
                self.refused(&e);
                None
            }
            Err(e) => {
                debug!(error = %e, "no pipe for a relay; copying this burst");
                None
            }
        }
    }

    /// Takes back an empty pipe after a burst: kept for the next, or closed
    /// when the pool is full.
    pub(crate) fn give_back(&self, pipe: Pipe) {
        let mut idle = lock(&self.idle);
        if idle.len() < self.keep {
            idle.push(pipe);
        }
    }

    /// The kernel refused a splice with `error`: every relay copies from now on.
    pub(crate) fn refused(&self, error: &io::Error) {
        if !self.off.swap(true, Ordering::Relaxed) {
            warn!(error = %error, "splice(2) refused by the kernel; relays copy through user space from now on");
            lock(&self.idle).clear();
        }
    }
}

/// Whether `error` from a splice (or making a pipe) says splice cannot serve
/// here at all, rather than that this one connection failed: not supported
/// (`EINVAL` for a file that cannot splice, `ENOSYS`, `EOPNOTSUPP`) or
/// forbidden by a seccomp filter (`EPERM`, systemd's `SystemCallErrorNumber`).
pub(crate) fn cannot_splice(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::EPERM))
        || error.kind() == io::ErrorKind::Unsupported
}

/// What one splice from a socket into a pipe found ([`Pipe::try_fill`]).
pub(crate) enum Fill {
    /// Moved this many bytes (0: the socket's end, or rarely urgent data
    /// only: the caller checks with [`has_data`]).
    Moved(usize),
    /// The splice found nothing, yet the socket has bytes: urgent data, which
    /// splice cannot move past, or bytes that arrived just after it looked.
    /// A plain read takes them either way.
    Urgent,
}

impl Pipe {
    /// One non-blocking splice of up to `max` bytes from `src` into the pipe
    /// (empty on entry), through `src`'s readiness: `WouldBlock` clears it,
    /// so the caller's next `readable().await` waits for new bytes.
    pub(crate) fn try_fill(&self, src: &TcpStream, max: usize) -> io::Result<Fill> {
        src.try_io(Interest::READABLE, || match self.fill_from(src, max) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && has_data(src) => Ok(Fill::Urgent),
            filled => filled.map(Fill::Moved),
        })
    }

    /// Splices the `n` bytes in the pipe into `dst`, waiting while it cannot
    /// take more, and tells `delivered` of each piece as it reaches `dst` (the
    /// caller counts there). On an error, what was not delivered is still in
    /// the pipe.
    ///
    /// `followed`: the caller writes more to `dst` at once (`SPLICE_F_MORE`),
    /// so TCP holds back a part-filled last segment to fill it with what
    /// follows rather than send it short (a tunnel's chunks of 64 KiB and 4
    /// header bytes do not end on the 64 KiB segments of loopback).
    pub(crate) async fn drain(&self, dst: &TcpStream, mut n: usize, followed: bool, mut delivered: impl FnMut(usize)) -> io::Result<()> {
        while n > 0 {
            match dst.try_io(Interest::WRITABLE, || self.drain_into(dst, n, followed)) {
                // A pipe with bytes in it never splices 0 into a socket.
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(moved) => {
                    n -= moved;
                    delivered(moved);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable().await?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Delivers the next `n` bytes in the pipe (fewer if it holds fewer) to
    /// `dst` through user space, telling `delivered` of each piece: for bytes
    /// spliced in before the kernel refused to splice them on. What the pipe
    /// holds past them stays in it.
    pub(crate) async fn copy_out(&self, dst: &TcpStream, mut n: usize, mut delivered: impl FnMut(usize)) -> io::Result<()> {
        let mut buf = vec![0u8; n.min(self.size)];
        while n > 0 {
            let want = n.min(buf.len());
            let read = match self.read_out(&mut buf[..want]) {
                Ok(0) => return Ok(()),
                Ok(read) => read,
                // Empty: everything was delivered.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            };
            n -= read;
            let mut data = &buf[..read];
            while !data.is_empty() {
                match dst.try_write(data) {
                    Ok(written) => {
                        data = &data[written..];
                        delivered(written);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable().await?,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
}

/// Whether `socket` has bytes to read, without taking them: when a splice
/// finds nothing, this tells a drained socket from one stuck at urgent data.
pub(crate) fn has_data(socket: &TcpStream) -> bool {
    let mut byte = [std::mem::MaybeUninit::uninit()];
    socket2::SockRef::from(socket).peek(&mut byte).is_ok_and(|n| n > 0)
}

impl Pipe {
    /// Moves up to `max` bytes from `socket` into the pipe (which the caller
    /// keeps empty before each fill); `Ok(0)` at the socket's end (or, rarely,
    /// when it holds urgent data only: the caller checks with a plain read).
    fn fill_from(&self, socket: &impl AsFd, max: usize) -> io::Result<usize> {
        sys::splice(socket.as_fd(), self.write.as_fd(), max.min(self.size), false)
    }

    /// Moves up to `max` of the bytes the pipe holds into `socket`.
    fn drain_into(&self, socket: &impl AsFd, max: usize, followed: bool) -> io::Result<usize> {
        sys::splice(self.read.as_fd(), socket.as_fd(), max, followed)
    }

    /// Reads what the pipe holds into `buf` the ordinary way: for bytes left in
    /// it when the kernel refused to splice them on.
    fn read_out(&self, buf: &mut [u8]) -> io::Result<usize> {
        sys::read(self.read.as_fd(), buf)
    }
}

#[cfg(target_os = "linux")]
mod sys {
    use std::io;
    use std::os::fd::{BorrowedFd, OwnedFd};

    use rustix::pipe::{PipeFlags, SpliceFlags};

    /// A non-blocking pipe of [`super::PIPE_SIZE`] if the kernel allows, with its size.
    pub(super) fn pipe() -> io::Result<(OwnedFd, OwnedFd, usize)> {
        let (read, write) = rustix::pipe::pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
        let size = rustix::pipe::fcntl_setpipe_size(&write, super::PIPE_SIZE)
            .or_else(|_| rustix::pipe::fcntl_getpipe_size(&write))
            .unwrap_or(64 * 1024);
        Ok((read, write, size))
    }

    /// One non-blocking splice of up to `len` bytes from `from` to `to`;
    /// `more`: more follows at once (`SPLICE_F_MORE`).
    pub(super) fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize, more: bool) -> io::Result<usize> {
        let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
        let flags = if more { flags | SpliceFlags::MORE } else { flags };
        Ok(rustix::pipe::splice(from, None, to, None, len, flags)?)
    }

    pub(super) fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
        Ok(rustix::io::read(fd, buf)?)
    }
}

/// Elsewhere there is no splice: [`Pipes::new`] starts switched off, and these
/// are never reached.
#[cfg(not(target_os = "linux"))]
mod sys {
    use std::io;
    use std::os::fd::{BorrowedFd, OwnedFd};

    pub(super) fn pipe() -> io::Result<(OwnedFd, OwnedFd, usize)> {
        Err(io::ErrorKind::Unsupported.into())
    }

    pub(super) fn splice(_: BorrowedFd<'_>, _: BorrowedFd<'_>, _: usize, _: bool) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }

    pub(super) fn read(_: BorrowedFd<'_>, _: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn pipes_come_out_of_the_budget_and_idle_ones_are_kept_up_to_the_pool() {
        // 8 descriptors: four pipes at most, and a pool of none (a sixteenth).
        let budget = DescriptorBudget::with_capacity(8);
        let pipes = Pipes::new(&budget);
        let taken: Vec<Pipe> = std::iter::from_fn(|| pipes.take()).take(10).collect();
        assert_eq!(taken.len(), 4, "two descriptors a pipe, out of 8");
        assert!(budget.try_take(1).is_none(), "the pipes hold the whole budget");
        assert!(taken.iter().all(|p| p.size() >= 64 * 1024), "at least the kernel's default size");
        for pipe in taken {
            pipes.give_back(pipe);
        }
        assert!(budget.try_take(8).is_some(), "with no pool, given-back pipes are closed and their descriptors free");

        // A larger budget keeps idle pipes for the next burst, at most POOL_MAX.
        let budget = DescriptorBudget::with_capacity(10_000);
        let pipes = Pipes::new(&budget);
        let taken: Vec<Pipe> = (0..POOL_MAX + 5).filter_map(|_| pipes.take()).collect();
        for pipe in taken {
            pipes.give_back(pipe);
        }
        assert_eq!(lock(&pipes.idle).len(), POOL_MAX);
        assert!(budget.try_take((10_000 - 2 * POOL_MAX) as u32).is_some(), "only the pool's descriptors are held");
    }
}
