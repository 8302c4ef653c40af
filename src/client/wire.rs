//! The group reader's own wire: a plain RESP2 connection, and XREADGROUP replies decoded straight
//! into entries.
//!
//! Owns the hot path's bytes. The crate's parser builds a `redis::Value` tree for every reply and was a
//! fifth of the daemon's CPU time in the benchmark (docs/performance.md); a read reply here is scanned
//! once to find where it ends, then each field is copied once, from the socket buffer into its
//! [`Fields`]. Everything else — connection setup, TLS, every other command — stays with the `redis`
//! crate ([`super::conn`]): this connection is used only for plain TCP and unix sockets, and only by
//! [`super::reader::GroupReader`]. Other replies on it (a commit travelling with a read) are handed to
//! the crate's own parser, which is also how server errors become `redis::RedisError`s.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::decode::Entries;
use crate::model::envelope::{Entry, Fields};

/// Where a plain connection goes, and how it logs in.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: Addr,
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: i64,
}

#[derive(Clone, Debug)]
pub enum Addr {
    Tcp(String, u16),
    Unix(PathBuf),
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One RESP2 connection, used strictly request → replies.
pub struct Conn {
    io: Box<dyn Io>,
    buf: Vec<u8>,
}

/// Room kept free for the next socket read: a 500-entry read reply is about 150 KB.
const READ_CHUNK: usize = 64 * 1024;

impl Conn {
    /// Connects and logs in (AUTH, SELECT). A refused login comes back as the server's error.
    pub async fn connect(target: &Target, timeout: Duration) -> redis::RedisResult<Conn> {
        let io: Box<dyn Io> = match &target.addr {
            Addr::Tcp(host, port) => {
                let s = tokio::time::timeout(
                    timeout,
                    tokio::net::TcpStream::connect((host.as_str(), *port)),
                )
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            Addr::Unix(path) => Box::new(tokio::net::UnixStream::connect(path).await?),
        };
        let mut conn = Conn {
            io,
            buf: Vec::with_capacity(READ_CHUNK),
        };
        let mut login = Vec::new();
        if let Some(password) = &target.password {
            let mut auth = redis::cmd("AUTH");
            if let Some(user) = &target.username {
                auth.arg(user);
            }
            auth.arg(password);
            login.push(auth);
        }
        if target.db != 0 {
            login.push(redis::cmd("SELECT").arg(target.db).clone());
        }
        if !login.is_empty() {
            let mut packed = Vec::new();
            for cmd in &login {
                cmd.write_packed_command(&mut packed);
            }
            let frames = tokio::time::timeout(timeout, conn.request(&packed, login.len()))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "login timed out"))??;
            for frame in frames {
                value(&conn.buf[frame])?;
            }
        }
        Ok(conn)
    }

    /// Sends `packed` (one or more commands) and reads `replies` replies. Returns where each reply
    /// lies in [`Conn::frame`]'s buffer, valid until the next request.
    pub async fn request(
        &mut self,
        packed: &[u8],
        replies: usize,
    ) -> io::Result<Vec<std::ops::Range<usize>>> {
        self.io.write_all(packed).await?;
        self.buf.clear();
        let mut frames = Vec::with_capacity(replies);
        let mut scan = Scanner::new(0);
        while frames.len() < replies {
            match scan.advance(&self.buf) {
                Ok(Some(end)) => {
                    frames.push(scan.start..end);
                    scan = Scanner::new(end);
                    continue;
                }
                Ok(None) => {}
                Err(detail) => return Err(io::Error::new(io::ErrorKind::InvalidData, detail)),
            }
            self.buf.reserve(READ_CHUNK);
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "redis closed the connection",
                ));
            }
        }
        Ok(frames)
    }

    /// The bytes of a reply [`Conn::request`] returned.
    pub fn frame(&self, range: std::ops::Range<usize>) -> &[u8] {
        &self.buf[range]
    }
}

/// Any reply through the crate's parser; a server error becomes the crate's error.
pub fn value(frame: &[u8]) -> redis::RedisResult<redis::Value> {
    redis::parse_redis_value(frame)?.extract_error()
}

/// Finds where a RESP frame ends, resumably: it remembers how far it got when the bytes ran out.
struct Scanner {
    start: usize,
    pos: usize,
    /// Values still to skip before the frame is complete.
    pending: u64,
}

impl Scanner {
    fn new(start: usize) -> Scanner {
        Scanner {
            start,
            pos: start,
            pending: 1,
        }
    }

    /// The end of the frame if `buf` holds all of it, else None (call again with more bytes).
    fn advance(&mut self, buf: &[u8]) -> Result<Option<usize>, String> {
        while self.pending > 0 {
            let Some((kind, n, body)) = header(buf, self.pos)? else {
                return Ok(None);
            };
            let next = match kind {
                b'$' | b'=' | b'!' if n >= 0 => {
                    let end = body + n as usize + 2;
                    if end > buf.len() {
                        return Ok(None);
                    }
                    end
                }
                _ => body,
            };
            self.pending -= 1;
            match kind {
                b'*' | b'~' | b'>' if n > 0 => self.pending += n as u64,
                b'%' | b'|' if n > 0 => self.pending += 2 * n as u64,
                _ => {}
            }
            self.pos = next;
        }
        Ok(Some(self.pos))
    }
}

/// The header line at `pos`: its type byte, its number (0 where the type has none), and where the
/// line ends. None if the line is not complete yet.
fn header(buf: &[u8], pos: usize) -> Result<Option<(u8, i64, usize)>, String> {
    let Some(&kind) = buf.get(pos) else {
        return Ok(None);
    };
    let Some(cr) = buf[pos..].iter().position(|&b| b == b'\r') else {
        return Ok(None);
    };
    let line_end = pos + cr;
    match buf.get(line_end + 1) {
        None => return Ok(None),
        Some(b'\n') => {}
        Some(_) => {
            return Err(format!(
                "a RESP line without its newline at offset {line_end}"
            ));
        }
    }
    let line = &buf[pos + 1..line_end];
    let n = match kind {
        b'$' | b'*' | b'%' | b'~' | b'>' | b'|' | b'=' | b'!' => number(line)?,
        b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => 0,
        other => {
            return Err(format!(
                "unexpected RESP type byte 0x{other:02x} at offset {pos}"
            ));
        }
    };
    Ok(Some((kind, n, line_end + 2)))
}

fn number(line: &[u8]) -> Result<i64, String> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad RESP length {:?}", String::from_utf8_lossy(line)))
}

/// Reads a complete frame's values in order.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn header(&mut self) -> Result<(u8, i64), String> {
        let (kind, n, body) = header(self.buf, self.pos)?.ok_or("truncated reply")?;
        self.pos = body;
        Ok((kind, n))
    }

    /// An array's length; None for a nil array (or a RESP3 null).
    fn array(&mut self) -> Result<Option<usize>, String> {
        match self.header()? {
            (b'*', n) if n >= 0 => Ok(Some(n as usize)),
            (b'*' | b'$', -1) | (b'_', _) => Ok(None),
            (kind, _) => Err(format!("expected an array, got type {:?}", kind as char)),
        }
    }

    fn bulk(&mut self) -> Result<&'a [u8], String> {
        match self.header()? {
            (b'$', n) if n >= 0 => {
                let start = self.pos;
                let end = start + n as usize;
                if end + 2 > self.buf.len() {
                    return Err("truncated bulk string".into());
                }
                self.pos = end + 2;
                Ok(&self.buf[start..end])
            }
            (kind, _) => Err(format!(
                "expected a bulk string, got type {:?}",
                kind as char
            )),
        }
    }
}

/// An XREADGROUP (or XREAD) reply for one stream, RESP2: nil on timeout, else
/// `[[stream, [[id, [f, v, …] | nil], …]]]`. Entries deleted while pending come back with nil fields.
pub fn read_reply(frame: &[u8]) -> Result<Entries, String> {
    let mut c = Cursor { buf: frame, pos: 0 };
    let mut out = Entries::default();
    let Some(streams) = c.array()? else {
        return Ok(out);
    };
    if streams == 0 {
        return Ok(out);
    }
    if c.array()? != Some(2) {
        return Err("expected [stream, entries]".into());
    }
    c.bulk()?; // the stream's name
    let n = c.array()?.unwrap_or(0);
    out.entries.reserve(n);
    for _ in 0..n {
        if c.array()? != Some(2) {
            return Err("expected an [id, fields] pair".into());
        }
        let id = std::str::from_utf8(c.bulk()?)
            .map_err(|_| "entry id is not text")?
            .to_owned();
        let Some(flat) = c.array()? else {
            out.deleted.push(id);
            continue;
        };
        if !flat.is_multiple_of(2) {
            return Err(format!(
                "entry {id} has an odd number of field names and values"
            ));
        }
        let mut fields = Fields::with_capacity(flat / 2);
        for _ in 0..flat / 2 {
            let name = c.bulk()?.to_vec();
            fields.push(name, c.bulk()?.to_vec());
        }
        out.entries.push(Entry { id, fields });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const READ: &[u8] =
        b"*1\r\n*2\r\n$5\r\nnova1\r\n*2\r\n*2\r\n$3\r\n1-0\r\n*4\r\n$1\r\na\r\n$1\r\nb\r\n\
        $2\r\nid\r\n$3\r\n\xff\x00\r\r\n*2\r\n$3\r\n2-0\r\n*-1\r\n";

    #[test]
    fn scans_frames_resumably_from_any_split() {
        for split in 0..READ.len() {
            let mut s = Scanner::new(0);
            assert_eq!(s.advance(&READ[..split]), Ok(None), "split at {split}");
            assert_eq!(s.advance(READ), Ok(Some(READ.len())), "split at {split}");
        }
        let mut two = READ.to_vec();
        two.extend_from_slice(b"-NOGROUP no such group\r\n");
        let mut s = Scanner::new(READ.len());
        assert_eq!(s.advance(&two), Ok(Some(two.len())));
    }

    #[test]
    fn decodes_entries_binary_values_and_deleted_ids() {
        let got = read_reply(READ).unwrap();
        assert_eq!(got.entries.len(), 1);
        assert_eq!(got.entries[0].id, "1-0");
        assert_eq!(got.entries[0].fields.get("a"), Some(&b"b"[..]));
        assert_eq!(got.entries[0].fields.get("id"), Some(&b"\xff\x00\r"[..]));
        assert_eq!(got.deleted, vec!["2-0".to_string()]);
        assert_eq!(read_reply(b"*-1\r\n").unwrap(), Entries::default());
    }

    #[test]
    fn refuses_garbage_without_panicking() {
        for bad in [
            &b"?x\r\n"[..],
            b"*1\r\n:5\r\n",
            b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$9\r\n1-0\r\n",
        ] {
            let mut s = Scanner::new(0);
            let _ = s.advance(bad);
            assert!(
                read_reply(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
