//! The guest's own standard output and error (`println!`): buffered, bounded, and moved into
//! the `stdio` log at every host call and at the end of the run.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

/// Most bytes of guest stdout or stderr buffered between two host calls; more is dropped and
/// counted, so a chatty guest cannot grow the host's memory.
const GUEST_OUTPUT_BUFFER: usize = 1 << 20;

/// A bounded buffer the guest's stdout or stderr writes into.
#[derive(Clone)]
pub(crate) struct GuestOutput {
    inner: Arc<Mutex<Buffer>>,
}

struct Buffer {
    bytes: Vec<u8>,
    dropped: u64,
    limit: usize,
}

impl Default for GuestOutput {
    fn default() -> Self {
        GuestOutput::with_limit(GUEST_OUTPUT_BUFFER)
    }
}

impl GuestOutput {
    /// A buffer keeping at most `limit` bytes between two [`take`](GuestOutput::take)s.
    pub fn with_limit(limit: usize) -> Self {
        GuestOutput {
            inner: Arc::new(Mutex::new(Buffer {
                bytes: Vec::new(),
                dropped: 0,
                limit,
            })),
        }
    }

    /// Takes what was written so far, and the count of bytes dropped.
    pub fn take(&self) -> (Vec<u8>, u64) {
        let mut b = self.inner.lock().expect("guest output lock");
        (std::mem::take(&mut b.bytes), std::mem::take(&mut b.dropped))
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl tokio::io::AsyncWrite for GuestOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let mut b = self.inner.lock().expect("guest output lock");
        let room = b.limit.saturating_sub(b.bytes.len());
        let keep = room.min(buf.len());
        b.bytes.extend_from_slice(&buf[..keep]);
        b.dropped += (buf.len() - keep) as u64;
        // Everything counts as written: dropping is the host's business, not a guest error.
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
