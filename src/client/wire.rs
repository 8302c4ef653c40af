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
use crate::model::limits::{EntryLimit, Size};

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
            let frames = tokio::time::timeout(timeout, conn.request(&packed, login.len(), None))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "login timed out"))??;
            for frame in frames {
                value(&conn.buf[frame])?;
            }
        }
        Ok(conn)
    }

    /// Sends `packed` (one or more commands) and reads `replies` replies. Returns where each reply
    /// lies in [`Conn::frame`]'s buffer, valid until the next request. With `limit`, the last reply is
    /// a read reply whose entries are bounded as they arrive (see [`Scanner`]).
    pub async fn request(
        &mut self,
        packed: &[u8],
        replies: usize,
        limit: Option<EntryLimit>,
    ) -> io::Result<Vec<std::ops::Range<usize>>> {
        self.io.write_all(packed).await?;
        self.buf.clear();
        let mut frames = Vec::with_capacity(replies);
        let scanner = |start, n: usize| Scanner::new(start, limit.filter(|_| n + 1 == replies));
        let mut scan = scanner(0, 0);
        while frames.len() < replies {
            match scan.advance(&mut self.buf) {
                Ok(Some(end)) => {
                    frames.push(scan.start..end);
                    scan = scanner(end, frames.len());
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
///
/// With a limit it also bounds the entries of a read reply (XREADGROUP's shape, or the recovery
/// script's). It counts each entry's fields and bytes from the headers as they arrive; once an entry is
/// over the limit, everything of its field list — what was buffered and what is still to come — is
/// removed from the buffer as it is scanned, and a marker `?<fields>,<bytes>\r\n` takes the list's
/// place, which [`read_reply`] reports as too large. A 100 MB field thus costs one read chunk of
/// memory, not 100 MB.
struct Scanner {
    start: usize,
    pos: usize,
    /// Items still to come in each open aggregate, the outermost first; `[1]` is the frame itself.
    open: Vec<u64>,
    limit: Option<EntryLimit>,
    /// The entry whose field list is being scanned.
    entry: Option<EntryScan>,
    /// Bytes of an omitted bulk string still to discard; its item completes after them.
    skip: u64,
}

/// An entry's field list being scanned: where it starts, and what it has brought so far.
struct EntryScan {
    at: usize,
    size: Size,
    omitted: bool,
}

/// How deep an entry's field list sits in a read reply: frame, streams, `[name, entries]`, entries,
/// `[id, fields]`.
const FIELDS_DEPTH: usize = 5;

/// The type byte of the marker left where an oversized entry's fields were.
const OMITTED: u8 = b'?';

impl Scanner {
    fn new(start: usize, limit: Option<EntryLimit>) -> Scanner {
        Scanner {
            start,
            pos: start,
            open: vec![1],
            limit,
            entry: None,
            skip: 0,
        }
    }

    /// The end of the frame if `buf` holds all of it, else None (call again with more bytes).
    fn advance(&mut self, buf: &mut Vec<u8>) -> Result<Option<usize>, String> {
        loop {
            if self.skip > 0 {
                let take = self.skip.min((buf.len() - self.pos) as u64) as usize;
                buf.drain(self.pos..self.pos + take);
                self.skip -= take as u64;
                if self.skip > 0 {
                    return Ok(None);
                }
                if self.complete(buf) {
                    return Ok(Some(self.pos));
                }
                continue;
            }
            let Some((kind, n, body)) = header(buf, self.pos)? else {
                return Ok(None);
            };
            let depth = self.open.len();
            if depth == FIELDS_DEPTH + 1
                && let Some(limit) = self.limit
                && let Some(entry) = &mut self.entry
            {
                // A field name or value of a bounded entry.
                if kind != b'$' || n < 0 {
                    return Err(format!(
                        "a field that is not a bulk string at offset {}",
                        self.pos
                    ));
                }
                let size = Size {
                    fields: entry.size.fields,
                    bytes: entry.size.bytes.saturating_add(n as u64),
                };
                if !entry.omitted && limit.exceeds(size) {
                    // Over the limit: what was kept of the entry goes, and so does the rest.
                    entry.omitted = true;
                    let kept = self.pos - entry.at;
                    buf.drain(entry.at..self.pos);
                    self.pos = entry.at;
                    let body = body - kept;
                    entry.size = size;
                    buf.drain(self.pos..body);
                    self.skip = n as u64 + 2;
                    continue;
                }
                if entry.omitted {
                    entry.size = size;
                    buf.drain(self.pos..body);
                    self.skip = n as u64 + 2;
                    continue;
                }
                let end = body + n as usize + 2;
                if end > buf.len() {
                    return Ok(None);
                }
                entry.size = size;
                self.pos = end;
                if self.complete(buf) {
                    return Ok(Some(self.pos));
                }
                continue;
            }
            let end = match kind {
                b'$' | b'=' | b'!' if n >= 0 => {
                    let end = usize::try_from(n)
                        .ok()
                        .and_then(|n| body.checked_add(n)?.checked_add(2))
                        .ok_or_else(|| format!("bulk length {n} out of range"))?;
                    if end > buf.len() {
                        return Ok(None);
                    }
                    end
                }
                _ => body,
            };
            let items = match kind {
                b'*' | b'~' | b'>' if n > 0 => n as u64,
                b'%' | b'|' if n > 0 => 2 * n as u64,
                _ => 0,
            };
            if items == 0 {
                self.pos = end;
                if self.complete(buf) {
                    return Ok(Some(self.pos));
                }
                continue;
            }
            if depth == FIELDS_DEPTH
                && kind == b'*'
                && let Some(limit) = self.limit
            {
                // An entry's field list begins.
                let size = Size {
                    fields: items / 2,
                    bytes: 0,
                };
                let omitted = limit.exceeds(size);
                self.entry = Some(EntryScan {
                    at: self.pos,
                    size,
                    omitted,
                });
                if omitted {
                    buf.drain(self.pos..body);
                } else {
                    self.pos = body;
                }
            } else {
                self.pos = body;
            }
            self.open.push(items);
        }
    }

    /// One item ended: count it in its aggregate, closing every aggregate it completes. True when
    /// the frame itself is complete.
    fn complete(&mut self, buf: &mut Vec<u8>) -> bool {
        while let Some(left) = self.open.last_mut() {
            *left -= 1;
            if *left > 0 {
                return false;
            }
            self.open.pop();
            if self.open.len() == FIELDS_DEPTH
                && let Some(entry) = self.entry.take()
                && entry.omitted
            {
                let marker = format!("?{},{}\r\n", entry.size.fields, entry.size.bytes);
                buf.splice(entry.at..entry.at, marker.bytes());
                self.pos = entry.at + marker.len();
            }
        }
        true
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

    /// The [`Scanner`]'s marker of an oversized entry, if one is next: its size.
    fn omitted(&mut self) -> Result<Option<Size>, String> {
        if self.buf.get(self.pos) != Some(&OMITTED) {
            return Ok(None);
        }
        let rest = &self.buf[self.pos + 1..];
        let line = rest
            .iter()
            .position(|&b| b == b'\r')
            .ok_or("truncated marker")?;
        let text = std::str::from_utf8(&rest[..line]).map_err(|_| "bad marker")?;
        let (fields, bytes) = text.split_once(',').ok_or("bad marker")?;
        let size = Size {
            fields: fields.parse().map_err(|_| "bad marker")?,
            bytes: bytes.parse().map_err(|_| "bad marker")?,
        };
        self.pos += 1 + line + 2;
        Ok(Some(size))
    }

    fn int(&mut self) -> Result<i64, String> {
        let start = self.pos;
        match self.header()? {
            (b':', _) => number(&self.buf[start + 1..self.pos - 2]),
            (kind, _) => Err(format!("expected an integer, got type {:?}", kind as char)),
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
/// `[[stream, [[id, [f, v, …] | nil], …]]]`. Entries deleted while pending come back with nil fields;
/// entries the [`Scanner`] bounded, with its marker. The recovery script's reply has a third element
/// per stream, `[id, count, …]`: the entries' delivery counts; the claim script's two more, the scan's
/// next cursor and the ids Redis dropped (see [`super::recover`]).
pub fn read_reply(frame: &[u8]) -> Result<Entries, String> {
    let mut c = Cursor { buf: frame, pos: 0 };
    let mut out = Entries::default();
    let Some(streams) = c.array()? else {
        return Ok(out);
    };
    if streams == 0 {
        return Ok(out);
    }
    let parts = c.array()?;
    if !matches!(parts, Some(2 | 3 | 5)) {
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
        if let Some(size) = c.omitted()? {
            out.too_large.push((id, size));
            continue;
        }
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
    if parts >= Some(3) {
        let counts = c.array()?.unwrap_or(0);
        for _ in 0..counts / 2 {
            let id = String::from_utf8_lossy(c.bulk()?).into_owned();
            let n = c.int()?;
            out.deliveries.insert(id, n.max(0) as u64);
        }
    }
    // A claim's reply: the scan's next cursor and the ids Redis dropped.
    if parts == Some(5) {
        out.next = Some(String::from_utf8_lossy(c.bulk()?).into_owned());
        for _ in 0..c.array()?.unwrap_or(0) {
            out.dropped
                .push(String::from_utf8_lossy(c.bulk()?).into_owned());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const READ: &[u8] =
        b"*1\r\n*2\r\n$5\r\nnova1\r\n*2\r\n*2\r\n$3\r\n1-0\r\n*4\r\n$1\r\na\r\n$1\r\nb\r\n\
        $2\r\nid\r\n$3\r\n\xff\x00\r\r\n*2\r\n$3\r\n2-0\r\n*-1\r\n";

    /// Feeds `input` to a scanner `chunk` bytes at a time, as [`Conn::request`] does. Returns the
    /// buffer, where the frame ended, and the most the buffer held at any time.
    fn scan(input: &[u8], chunk: usize, limit: Option<EntryLimit>) -> (Vec<u8>, usize, usize) {
        let mut s = Scanner::new(0, limit);
        let mut buf = Vec::new();
        let mut peak = 0;
        for piece in input.chunks(chunk) {
            buf.extend_from_slice(piece);
            peak = peak.max(buf.len());
            if let Some(end) = s.advance(&mut buf).unwrap() {
                return (buf, end, peak);
            }
        }
        panic!("the frame never ended");
    }

    type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

    /// An XREADGROUP reply of `entries`, each `(id, [(name, value)])`.
    fn read_frame(entries: &[(&str, Pairs)]) -> Vec<u8> {
        let bulk = |out: &mut Vec<u8>, b: &[u8]| {
            out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
            out.extend_from_slice(b);
            out.extend_from_slice(b"\r\n");
        };
        let mut out = format!("*1\r\n*2\r\n$1\r\ns\r\n*{}\r\n", entries.len()).into_bytes();
        for (id, fields) in entries {
            out.extend_from_slice(b"*2\r\n");
            bulk(&mut out, id.as_bytes());
            out.extend_from_slice(format!("*{}\r\n", 2 * fields.len()).as_bytes());
            for (n, v) in fields {
                bulk(&mut out, n);
                bulk(&mut out, v);
            }
        }
        out
    }

    fn field(n: &str, v: Vec<u8>) -> (Vec<u8>, Vec<u8>) {
        (n.as_bytes().to_vec(), v)
    }

    #[test]
    fn scans_frames_resumably_from_any_split() {
        let unbounded = Some(EntryLimit::NONE);
        for limit in [None, unbounded] {
            for split in 0..READ.len() {
                let mut s = Scanner::new(0, limit);
                let mut buf = READ[..split].to_vec();
                assert_eq!(s.advance(&mut buf), Ok(None), "split at {split}");
                buf.extend_from_slice(&READ[split..]);
                assert_eq!(
                    s.advance(&mut buf),
                    Ok(Some(READ.len())),
                    "split at {split}"
                );
                assert_eq!(buf, READ, "nothing changed within the limit");
            }
        }
        let mut two = READ.to_vec();
        two.extend_from_slice(b"-NOGROUP no such group\r\n");
        let mut s = Scanner::new(READ.len(), None);
        assert_eq!(s.advance(&mut two), Ok(Some(two.len())));
    }

    #[test]
    fn an_oversized_entry_is_dropped_as_it_arrives_and_its_neighbours_kept() {
        let big = vec![b'x'; 1 << 20];
        let frame = read_frame(&[
            ("1-0", vec![field("a", b"small".to_vec())]),
            (
                "2-0",
                vec![field("head", b"h".to_vec()), field("body", big)],
            ),
            ("3-0", vec![field("b", b"after".to_vec())]),
        ]);
        let limit = EntryLimit {
            fields: 10,
            bytes: 64 * 1024,
        };
        for chunk in [1, 7, 4096, 64 * 1024] {
            let (buf, end, peak) = scan(&frame, chunk, Some(limit));
            assert!(
                peak < 2 * 64 * 1024 + 256,
                "chunk {chunk}: held {peak} bytes"
            );
            let got = read_reply(&buf[..end]).unwrap();
            let ids: Vec<_> = got.entries.iter().map(|e| e.id.as_str()).collect();
            assert_eq!(ids, ["1-0", "3-0"], "chunk {chunk}");
            assert_eq!(got.entries[1].fields.get("b"), Some(&b"after"[..]));
            assert_eq!(
                got.too_large,
                vec![(
                    "2-0".to_string(),
                    Size {
                        fields: 2,
                        bytes: 4 + 1 + 4 + (1 << 20)
                    }
                )],
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn a_too_wide_entry_is_dropped_whole() {
        let wide: Vec<_> = (0..50).map(|i| field(&format!("f{i}"), vec![])).collect();
        let frame = read_frame(&[("1-0", wide), ("2-0", vec![field("ok", b"1".to_vec())])]);
        let limit = EntryLimit {
            fields: 49,
            bytes: 1 << 20,
        };
        let (buf, end, _) = scan(&frame, 3, Some(limit));
        assert!(
            end < 120,
            "the wide entry's fields were not kept ({end} bytes)"
        );
        let got = read_reply(&buf[..end]).unwrap();
        assert_eq!(got.too_large.len(), 1);
        assert_eq!(got.too_large[0].1.fields, 50);
        assert_eq!(
            got.too_large[0].1.bytes,
            (0..50).map(|i| format!("f{i}").len() as u64).sum::<u64>()
        );
        assert_eq!(got.entries.len(), 1);
        let (buf, end, _) = scan(
            &frame,
            3,
            Some(EntryLimit {
                fields: 50,
                ..limit
            }),
        );
        assert_eq!(
            read_reply(&buf[..end]).unwrap().entries.len(),
            2,
            "50 fields are allowed"
        );
    }

    #[test]
    fn a_claim_reply_is_bounded_and_brings_its_cursor_and_dropped_ids() {
        let mut frame = read_frame(&[
            ("1-0", vec![field("blob", vec![b'x'; 5000])]),
            ("2-0", vec![field("a", b"b".to_vec())]),
        ]);
        // The recovery shape plus the claim's two parts: counts, next cursor, dropped ids.
        frame[4..8].copy_from_slice(b"*5\r\n");
        frame.extend_from_slice(
            b"*4\r\n$3\r\n1-0\r\n:2\r\n$3\r\n2-0\r\n:3\r\n$3\r\n7-0\r\n*1\r\n$3\r\n0-5\r\n",
        );
        let limit = EntryLimit {
            fields: 10,
            bytes: 1000,
        };
        let (buf, end, peak) = scan(&frame, 64, Some(limit));
        assert_eq!(end, buf.len());
        assert!(peak < 1000, "the big field was never held: {peak}");
        let got = read_reply(&buf[..end]).unwrap();
        assert_eq!(got.entries.len(), 1);
        assert_eq!(
            got.too_large,
            [(
                "1-0".to_string(),
                Size {
                    fields: 1,
                    bytes: 5004
                }
            )]
        );
        assert_eq!(got.deliveries.get("1-0"), Some(&2));
        assert_eq!(got.next.as_deref(), Some("7-0"));
        assert_eq!(got.dropped, ["0-5"]);
    }

    #[test]
    fn the_recovery_reply_brings_delivery_counts() {
        let frame = b"*1\r\n*3\r\n$1\r\ns\r\n*2\r\n*2\r\n$3\r\n1-0\r\n*2\r\n$1\r\na\r\n$1\r\nb\r\n\
            *2\r\n$3\r\n2-0\r\n*-1\r\n*4\r\n$3\r\n1-0\r\n:3\r\n$3\r\n2-0\r\n:1\r\n";
        let (buf, end, _) = scan(frame, 5, Some(EntryLimit::default()));
        assert_eq!(end, frame.len());
        let got = read_reply(&buf[..end]).unwrap();
        assert_eq!(got.entries.len(), 1);
        assert_eq!(got.deleted, ["2-0"]);
        assert_eq!(got.deliveries.get("1-0"), Some(&3));
        assert_eq!(got.deliveries.get("2-0"), Some(&1));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn entries() -> impl Strategy<Value = Vec<(String, Pairs)>> {
            let field = (
                proptest::collection::vec(any::<u8>(), 0..12),
                proptest::collection::vec(any::<u8>(), 0..300),
            );
            let entry = (1u64..1000, proptest::collection::vec(field, 0..12));
            proptest::collection::vec(entry, 0..8).prop_map(|es| {
                es.into_iter()
                    .enumerate()
                    .map(|(i, (ms, f))| (format!("{ms}-{i}"), f))
                    .collect()
            })
        }

        proptest! {
            /// Whatever Redis — or anything on the socket — sends, the scanner and the decoder end
            /// with an answer or an error, never a panic, and a bounded scan never holds more than
            /// what came in.
            #[test]
            fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), chunk in 1usize..64) {
                for limit in [None, Some(EntryLimit { fields: 2, bytes: 16 })] {
                    let mut s = Scanner::new(0, limit);
                    let mut buf = Vec::new();
                    for piece in bytes.chunks(chunk) {
                        buf.extend_from_slice(piece);
                        prop_assert!(buf.len() <= bytes.len() + 64);
                        match s.advance(&mut buf) {
                            Ok(Some(end)) => { let _ = read_reply(&buf[..end]); break; }
                            Ok(None) => {}
                            Err(_) => break,
                        }
                    }
                }
                let _ = read_reply(&bytes);
            }

            /// A read reply split anywhere decodes to the entries sent; under a limit, exactly the
            /// entries over it come back as too large, with their true sizes, and the rest intact.
            #[test]
            fn read_replies_decode_exactly_under_any_split_and_limit(
                sent in entries(), chunk in 1usize..97, fields in 0usize..8, bytes in 0u64..1200,
            ) {
                let frame = read_frame(&sent.iter().map(|(id, f)| (id.as_str(), f.clone())).collect::<Vec<_>>());
                let limit = EntryLimit { fields, bytes };
                let mut s = Scanner::new(0, Some(limit));
                let mut buf = Vec::new();
                let mut end = None;
                for piece in frame.chunks(chunk) {
                    buf.extend_from_slice(piece);
                    if let Some(e) = s.advance(&mut buf).unwrap() {
                        end = Some(e);
                        break;
                    }
                }
                let got = read_reply(&buf[..end.expect("the frame ends")]).unwrap();
                let (mut kept, mut large) = (got.entries.iter(), got.too_large.iter());
                for (id, pairs) in &sent {
                    let size = Size {
                        fields: pairs.len() as u64,
                        bytes: pairs.iter().map(|(n, v)| (n.len() + v.len()) as u64).sum(),
                    };
                    if limit.exceeds(size) {
                        prop_assert_eq!(large.next(), Some(&(id.clone(), size)));
                    } else {
                        let e = kept.next().unwrap();
                        prop_assert_eq!(&e.id, id);
                        let want: Fields = pairs.iter().cloned().collect();
                        prop_assert_eq!(&e.fields, &want);
                    }
                }
                prop_assert!(kept.next().is_none() && large.next().is_none());
            }
        }
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
            let mut s = Scanner::new(0, Some(EntryLimit::default()));
            let _ = s.advance(&mut bad.to_vec());
            assert!(
                read_reply(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
