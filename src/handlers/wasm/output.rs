//! A guest's stdout and stderr: captured into a capped buffer, never into the daemon's own stdio.
//!
//! Owns the capture only; [`super::sandbox`] logs what was captured after each call, escaped. Writes past
//! the cap are accepted and counted, not refused: a chatty handler is not a failing one.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// What one stream captured since the last [`Capture::take`].
#[derive(Debug, Default)]
struct Buffer {
    bytes: Vec<u8>,
    dropped: usize,
}

/// A capped in-memory sink for one guest stream. Clones share the buffer.
#[derive(Clone, Debug)]
pub struct Capture {
    cap: usize,
    buf: Arc<Mutex<Buffer>>,
}

impl Capture {
    pub fn new(cap: usize) -> Self {
        Capture {
            cap,
            buf: Arc::new(Mutex::new(Buffer::default())),
        }
    }

    fn append(&self, data: &[u8]) {
        let mut b = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        let room = self.cap.saturating_sub(b.bytes.len());
        let keep = data.len().min(room);
        b.bytes.extend_from_slice(&data[..keep]);
        b.dropped += data.len() - keep;
    }

    /// Takes what was captured, and how many bytes did not fit.
    pub fn take(&self) -> (Vec<u8>, usize) {
        let mut b = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        (std::mem::take(&mut b.bytes), std::mem::take(&mut b.dropped))
    }
}

impl IsTerminal for Capture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Capture {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl Pollable for Capture {
    async fn ready(&mut self) {}
}

impl OutputStream for Capture {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for Capture {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.append(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_up_to_the_cap_and_counts_the_rest() {
        let c = Capture::new(4);
        c.append(b"abc");
        c.append(b"defg");
        assert_eq!(c.take(), (b"abcd".to_vec(), 3));
        assert_eq!(c.take(), (Vec::new(), 0));
    }
}
