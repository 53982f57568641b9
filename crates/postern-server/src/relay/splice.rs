//! Zero-copy relay of one direction between two plaintext TCP sockets: splice(2) from
//! the source socket into a pipe, then from the pipe into the destination socket. The
//! bytes never enter user space; the pipe only holds references to the kernel's socket
//! buffer pages.
//!
//! A pipe costs two file descriptors, so a session holds one only while bytes are in
//! flight in its direction: the direction waits for its source to be readable with no
//! pipe, takes one from a small per-thread pool, splices what the socket has into it,
//! drains it into the destination and gives it back as soon as it is empty. An idle
//! session therefore holds no pipe, and a busy instance holds about as many pipes as it
//! has directions moving bytes at this instant, plus the pools (at most [`POOL_MAX`]
//! per worker thread). A direction whose destination is slow (a client reading a big
//! FETCH over a phone link) keeps its pipe until the destination has taken what is in
//! it: that pipe is the session's only buffer, and its size bounds what Postern holds
//! for it, in the kernel.
//!
//! A pipe is only filled when it is empty. Then an `EAGAIN` from the source can only
//! mean that the socket has nothing to read (not that the pipe is full), which is what
//! tokio's readiness tracking needs to be told.

use std::cell::RefCell;
use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use rustix::pipe::{PipeFlags, SpliceFlags, fcntl_setpipe_size, pipe_with, splice};
use tokio::io::{AsyncWrite, Interest};
use tokio::net::TcpStream;

/// Which side of a copy failed, so the relay can tell client errors from backend
/// errors. The error itself is dropped: a reset from a phone going out of coverage is
/// routine, and the side that failed is what the session log needs. Defined here, the
/// lower layer, so the relay and the splice copy do not import each other.
#[derive(Debug)]
pub(crate) enum Fault {
    Reader,
    Writer,
}

/// Pipe capacity asked for. Each splice pass moves up to this much; the kernel may
/// grant less (`/proc/sys/fs/pipe-max-size`, per-user pipe quotas), which only means
/// more, smaller passes.
const PIPE_SIZE: usize = 1024 * 1024;

/// Empty pipes kept per worker thread for reuse.
pub(crate) const POOL_MAX: usize = 16;

/// A pipe, both ends non-blocking.
#[derive(Debug)]
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// What the kernel granted.
    size: usize,
}

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

impl Pipe {
    /// An empty pipe from this thread's pool, or a new one.
    fn take() -> io::Result<Pipe> {
        if let Some(p) = POOL.with(|pool| pool.borrow_mut().pop()) {
            return Ok(p);
        }
        let (read, write) = pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
        // A smaller pipe still works; keep whatever the kernel allows.
        let size = fcntl_setpipe_size(&write, PIPE_SIZE).unwrap_or(64 * 1024);
        Ok(Pipe { read, write, size })
    }

    /// Gives an empty pipe back to this thread's pool (or closes it if the pool is full).
    fn give_back(self) {
        POOL.with(|pool| {
            let mut pool = pool.borrow_mut();
            if pool.len() < POOL_MAX {
                pool.push(self);
            }
        });
    }
}

/// One direction of a spliced relay.
#[derive(Debug, Default)]
pub(crate) struct SpliceHalf {
    /// Held only while `in_pipe > 0`.
    pipe: Option<Pipe>,
    in_pipe: usize,
    read_eof: bool,
    done: bool,
    /// Bytes moved from the source.
    pub(crate) bytes: u64,
}

/// Whether an error from `splice` means "would block".
fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl SpliceHalf {
    /// Moves bytes from `src` to `dst` until `src` would block (Pending) or this
    /// direction is finished (Ready(Ok)). `moved` is set when any byte moved.
    /// `Err(None)` means a pipe could not be had (descriptor limit): the caller falls
    /// back to copying, which needs no descriptor. Nothing is in flight then.
    pub(crate) fn poll_splice(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut TcpStream,
        dst: &mut TcpStream,
        moved: &mut bool,
    ) -> Poll<Result<(), Option<Fault>>> {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.in_pipe > 0 {
                let Some(pipe) = &self.pipe else {
                    return Poll::Ready(Err(Some(Fault::Writer)));
                };
                ready!(dst.poll_write_ready(cx)).map_err(|_| Some(Fault::Writer))?;
                // No SPLICE_F_MORE: it would cork the last segment of a reply.
                let flags = SpliceFlags::NONBLOCK | SpliceFlags::MOVE;
                let res = dst.try_io(Interest::WRITABLE, || {
                    splice(&pipe.read, None, &*dst, None, self.in_pipe, flags).map_err(Into::into)
                });
                match res {
                    Ok(0) => return Poll::Ready(Err(Some(Fault::Writer))),
                    Ok(n) => {
                        self.in_pipe -= n.min(self.in_pipe);
                        *moved = true;
                    }
                    Err(e) if would_block(&e) => {}
                    Err(_) => return Poll::Ready(Err(Some(Fault::Writer))),
                }
                continue;
            }
            if let Some(pipe) = self.pipe.take() {
                pipe.give_back();
            }
            if self.read_eof {
                // The peer may already be gone; a failed shutdown ends nothing else.
                let _ = ready!(Pin::new(&mut *dst).poll_shutdown(cx));
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            // Wait for bytes with no pipe held.
            ready!(src.poll_read_ready(cx)).map_err(|_| Some(Fault::Reader))?;
            let pipe = match Pipe::take() {
                Ok(p) => p,
                Err(_) => return Poll::Ready(Err(None)),
            };
            let flags = SpliceFlags::NONBLOCK | SpliceFlags::MOVE;
            let res = src.try_io(Interest::READABLE, || {
                splice(&*src, None, &pipe.write, None, pipe.size, flags).map_err(Into::into)
            });
            match res {
                Ok(0) => {
                    pipe.give_back();
                    self.read_eof = true;
                }
                Ok(n) => {
                    self.pipe = Some(pipe);
                    self.in_pipe = n;
                    self.bytes += n as u64;
                    *moved = true;
                }
                Err(e) if would_block(&e) => pipe.give_back(),
                Err(_) => {
                    pipe.give_back();
                    return Poll::Ready(Err(Some(Fault::Reader)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_keeps_at_most_pool_max_pipes() {
        let pipes: Vec<Pipe> = (0..POOL_MAX + 4)
            .map(|_| Pipe::take().map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("pipe: {e}"));
        assert!(pipes.iter().all(|p| p.size >= 4096));
        for p in pipes {
            p.give_back();
        }
        assert_eq!(POOL.with(|p| p.borrow().len()), POOL_MAX);
    }
}
