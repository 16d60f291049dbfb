//! HTTP/1.1 to backends for requests without a body, without hyper's client: the request head
//! is written straight to a kept-alive connection and the answer is read back on the client's own
//! task. hyper's client runs each connection as a task of its own and hands requests and
//! responses to it over channels, two task wake-ups per request; for the requests that make up
//! most traffic (GET, HEAD) that hand-over cost as much as the rest of the proxying (see
//! `benches/ingress.rs`). Requests with a body and upgrades still go through hyper.
//!
//! This part only frames bytes: it writes request heads, parses response heads (with httparse)
//! and takes response bodies apart (a `Content-Length`, chunks, or up to the close).

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use hyper::body::SizeHint;

/// Response heads larger than this are refused (hyper's client allows about as much).
pub(super) const MAX_HEAD: usize = 64 << 10;
/// Header fields in a response head, at most.
const MAX_HEADERS: usize = 100;
/// A chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4 << 10;
/// Trailer fields after the last chunk, all together (they are read and dropped).
const MAX_TRAILERS: usize = 16 << 10;

/// What makes a backend's answer unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(super) enum BadResponse {
    #[error("the response head is not valid HTTP/1.1: {0}")]
    Head(httparse::Error),
    #[error("the response head is larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("the response has an invalid header field")]
    Header,
    #[error("the response status {0} is not valid")]
    Status(u16),
    #[error("the backend switched protocols unasked")]
    SwitchedUnasked,
    #[error("the response has an invalid Content-Length")]
    ContentLength,
    #[error("the response has an invalid chunk")]
    Chunk,
    #[error("the response trailers are larger than {MAX_TRAILERS} bytes")]
    TrailersTooLarge,
    #[error("the backend closed the connection in the middle of the response")]
    ClosedEarly,
}

/// Appends the request head to `out`: request line, header fields, blank line.
pub(super) fn write_head(method: &Method, target: &str, headers: &HeaderMap, out: &mut Vec<u8>) {
    write_request_line(method, target, out);
    for (name, value) in headers {
        write_field(name.as_str(), value.as_bytes(), out);
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends `GET /path HTTP/1.1` and its line end.
pub(super) fn write_request_line(method: &Method, target: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
}

/// Appends one header field line.
pub(super) fn write_field(name: &str, value: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The head of a final response.
#[derive(Debug)]
pub(super) struct Head {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) framing: Framing,
    /// The connection may carry another request once this response has been read.
    pub(super) keep_alive: bool,
}

/// What the start of a buffer holds.
#[derive(Debug)]
pub(super) enum Parsed {
    /// Not a whole head yet.
    Partial,
    /// An interim (1xx) response of this many bytes, to skip.
    Interim(usize),
    /// A final response head of this many bytes.
    Final(Head, usize),
}

/// Parses the response head at the start of `buf`. `to_head` says the request was a HEAD,
/// whose answer has no body whatever its `Content-Length` says.
pub(super) fn parse_head(buf: &[u8], to_head: bool) -> Result<Parsed, BadResponse> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut fields);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => return Err(BadResponse::HeadTooLarge),
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(e) => return Err(BadResponse::Head(e)),
    };
    let code = response.code.unwrap_or_default();
    match code {
        101 => return Err(BadResponse::SwitchedUnasked),
        100..=199 => return Ok(Parsed::Interim(len)),
        _ => {}
    }
    let status = StatusCode::from_u16(code).map_err(|_| BadResponse::Status(code))?;
    let mut headers = HeaderMap::with_capacity(response.headers.len());
    let mut length: Option<u64> = None;
    let mut chunked = None;
    let mut close = response.version != Some(1);
    for field in response.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| BadResponse::Header)?;
        let value = HeaderValue::from_bytes(field.value).map_err(|_| BadResponse::Header)?;
        if name == http::header::CONTENT_LENGTH {
            // "5" or a list of the same value ("5, 5"), as RFC 9110 section 8.6 allows.
            for item in field.value.split(|&b| b == b',') {
                let item = item.trim_ascii();
                let n = std::str::from_utf8(item)
                    .ok()
                    .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or(BadResponse::ContentLength)?;
                if length.is_some_and(|seen| seen != n) {
                    return Err(BadResponse::ContentLength);
                }
                length = Some(n);
            }
        } else if name == http::header::TRANSFER_ENCODING {
            // Only the last coding frames the message.
            let last = field.value.rsplit(|&b| b == b',').next().unwrap_or_default();
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name == http::header::CONNECTION {
            close |= field.value.split(|&b| b == b',').any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
        headers.append(name, value);
    }
    let bodiless = to_head || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let framing = if bodiless {
        Framing::Length(0)
    } else {
        match (chunked, length) {
            (Some(true), length) => {
                // Both framings: the chunks count (RFC 9112 section 6.3), and the connection
                // is not trusted with another request.
                close |= length.is_some();
                Framing::Chunked(Chunk::Size)
            }
            (Some(false), _) | (None, None) => {
                close = true;
                Framing::Close
            }
            (None, Some(n)) => Framing::Length(n),
        }
    };
    Ok(Parsed::Final(Head { status, headers, framing, keep_alive: !close }, len))
}

/// How a response body ends, and how far it has come.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Framing {
    /// This many bytes are left.
    Length(u64),
    Chunked(Chunk),
    /// The body runs until the backend closes the connection.
    Close,
    Done,
}

/// Where a chunked body is.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Chunk {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk, with this many bytes left.
    Data(u64),
    /// After a chunk's data, before its CRLF.
    DataEnd,
    /// After the last chunk, with this many bytes of trailer fields seen.
    Trailers(usize),
}

/// What a body has to give from its buffer.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step {
    Data(Bytes),
    /// Nothing until more bytes are read.
    More,
    End,
}

impl Framing {
    pub(super) fn is_done(&self) -> bool {
        *self == Framing::Done
    }

    /// The next piece of the body in `buf`, taking it (and the framing around it) out.
    pub(super) fn step(&mut self, buf: &mut BytesMut) -> Result<Step, BadResponse> {
        self.settle(buf)?;
        let left = match self {
            Framing::Done => return Ok(Step::End),
            _ if buf.is_empty() => return Ok(Step::More),
            Framing::Close => {
                return Ok(Step::Data(buf.split().freeze()));
            }
            Framing::Length(left) | Framing::Chunked(Chunk::Data(left)) => left,
            Framing::Chunked(_) => return Ok(Step::More),
        };
        let take = (*left).min(buf.len() as u64);
        *left -= take;
        let data = buf.split_to(take as usize).freeze();
        if let Framing::Chunked(chunk @ Chunk::Data(0)) = self {
            *chunk = Chunk::DataEnd;
        }
        // So that the body reads as ended along with its last data when the rest is buffered.
        // An error here stays in the state, for the next step to report.
        let _ = self.settle(buf);
        Ok(Step::Data(data))
    }

    /// Goes through what `buf` holds up to the next data (or the end); changes nothing on error.
    fn settle(&mut self, buf: &mut BytesMut) -> Result<(), BadResponse> {
        loop {
            match self {
                Framing::Length(0) => *self = Framing::Done,
                Framing::Chunked(chunk) => match chunk {
                    Chunk::Data(_) => return Ok(()),
                    Chunk::DataEnd => {
                        if buf.len() < 2 {
                            return Ok(());
                        }
                        if &buf[..2] != b"\r\n" {
                            return Err(BadResponse::Chunk);
                        }
                        buf.advance(2);
                        *chunk = Chunk::Size;
                    }
                    Chunk::Size => {
                        let Some(end) = line_end(buf) else {
                            return if buf.len() > MAX_CHUNK_LINE { Err(BadResponse::Chunk) } else { Ok(()) };
                        };
                        let size = chunk_size(&buf[..end])?;
                        buf.advance(end + 2);
                        *chunk = if size == 0 { Chunk::Trailers(0) } else { Chunk::Data(size) };
                    }
                    Chunk::Trailers(seen) => {
                        let Some(end) = line_end(buf) else {
                            return if *seen + buf.len() > MAX_TRAILERS {
                                Err(BadResponse::TrailersTooLarge)
                            } else {
                                Ok(())
                            };
                        };
                        if *seen + end > MAX_TRAILERS {
                            return Err(BadResponse::TrailersTooLarge);
                        }
                        buf.advance(end + 2);
                        if end == 0 {
                            *self = Framing::Done;
                        } else {
                            *seen += end + 2;
                        }
                    }
                },
                _ => return Ok(()),
            }
        }
    }

    /// The backend closed the connection: the end of a body that runs until then, or too early.
    pub(super) fn closed(&mut self) -> Result<(), BadResponse> {
        match self {
            Framing::Close | Framing::Done => {
                *self = Framing::Done;
                Ok(())
            }
            _ => Err(BadResponse::ClosedEarly),
        }
    }

    /// The size of what is left, when it is known.
    pub(super) fn size_hint(&self) -> SizeHint {
        match self {
            Framing::Length(left) => SizeHint::with_exact(*left),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// Where the CRLF ending the first line of `buf` starts.
fn line_end(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|pair| pair == b"\r\n")
}

/// The size on a chunk-size line: hex digits, then optional extensions (ignored).
fn chunk_size(line: &[u8]) -> Result<u64, BadResponse> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return Err(BadResponse::Chunk);
    }
    let rest = line[digits..].trim_ascii_start();
    if !rest.is_empty() && rest[0] != b';' {
        return Err(BadResponse::Chunk);
    }
    let hex = std::str::from_utf8(&line[..digits]).map_err(|_| BadResponse::Chunk)?;
    u64::from_str_radix(hex, 16).map_err(|_| BadResponse::Chunk)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str, to_head: bool) -> Head {
        match parse_head(raw.as_bytes(), to_head) {
            Ok(Parsed::Final(head, len)) => {
                assert_eq!(len, raw.len());
                head
            }
            other => panic!("not a final head: {other:?}"),
        }
    }

    /// Feeds `raw` to a body one piece of `piece` bytes at a time; the data it gave and whether
    /// it ended, or the error.
    fn body(mut framing: Framing, raw: &[u8], piece: usize) -> Result<(Vec<u8>, bool), BadResponse> {
        let mut buf = BytesMut::new();
        let mut data = Vec::new();
        for part in raw.chunks(piece.max(1)) {
            buf.extend_from_slice(part);
            loop {
                match framing.step(&mut buf)? {
                    Step::Data(bytes) => data.extend_from_slice(&bytes),
                    Step::More => break,
                    Step::End => return Ok((data, buf.is_empty())),
                }
            }
        }
        Ok((data, framing.is_done()))
    }

    #[test]
    fn writes_request_heads() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("app.example.com"));
        headers.append("accept", HeaderValue::from_static("*/*"));
        let mut out = Vec::new();
        write_head(&Method::GET, "/a?b=c", &headers, &mut out);
        assert_eq!(out, b"GET /a?b=c HTTP/1.1\r\nhost: app.example.com\r\naccept: */*\r\n\r\n");
    }

    #[test]
    fn frames_responses_as_rfc_9112_says() {
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\n", false);
        assert_eq!((h.status, &h.framing, h.keep_alive), (StatusCode::OK, &Framing::Length(5), true));
        assert_eq!(h.headers["x-a"], "1");
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n", false);
        assert_eq!(h.framing, Framing::Length(5));
        let h = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", false);
        assert_eq!((&h.framing, h.keep_alive), (&Framing::Chunked(Chunk::Size), true));
        let h = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n", false);
        assert_eq!((&h.framing, h.keep_alive), (&Framing::Chunked(Chunk::Size), false));
        let h = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false);
        assert_eq!((&h.framing, h.keep_alive), (&Framing::Close, false));
        let h = head("HTTP/1.1 200 OK\r\n\r\n", false);
        assert_eq!((&h.framing, h.keep_alive), (&Framing::Close, false));
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive, Close\r\n\r\n", false);
        assert_eq!((&h.framing, h.keep_alive), (&Framing::Length(3), false));
        let h = head("HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\n", false);
        assert!(!h.keep_alive);
        for bodiless in ["HTTP/1.1 204 No Content\r\n\r\n", "HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n"] {
            assert_eq!(head(bodiless, false).framing, Framing::Length(0));
        }
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n", true);
        assert_eq!((&h.framing, h.headers["content-length"].as_bytes()), (&Framing::Length(0), &b"7"[..]));
    }

    #[test]
    fn skips_interim_answers_and_waits_for_whole_heads() {
        let raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n";
        assert!(matches!(parse_head(raw, false), Ok(Parsed::Interim(25))));
        assert!(matches!(parse_head(&raw[25..], false), Ok(Parsed::Partial)));
        assert!(matches!(parse_head(b"", false), Ok(Parsed::Partial)));
    }

    #[test]
    fn refuses_bad_heads() {
        let bad = |raw: &[u8]| match parse_head(raw, false) {
            Err(e) => e,
            Ok(parsed) => panic!("accepted {parsed:?}"),
        };
        assert_eq!(bad(b"HTTP/1.1 101 Switching Protocols\r\n\r\n"), BadResponse::SwitchedUnasked);
        assert_eq!(bad(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n"), BadResponse::ContentLength);
        assert_eq!(
            bad(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"),
            BadResponse::ContentLength
        );
        assert_eq!(bad(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"), BadResponse::ContentLength);
        assert_eq!(bad(b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n"), BadResponse::ContentLength);
        assert_eq!(bad(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n"), BadResponse::ContentLength);
        assert!(matches!(bad(b"HTTP/1.1 2000 OK\r\n\r\n"), BadResponse::Head(_)));
        assert!(matches!(bad(b"SMTP ready\r\n\r\n"), BadResponse::Head(_)));
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(bad(&many), BadResponse::Head(httparse::Error::TooManyHeaders));
        let mut huge = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
        huge.resize(MAX_HEAD, b'a');
        assert_eq!(bad(&huge), BadResponse::HeadTooLarge);
    }

    #[test]
    fn takes_bodies_apart_however_they_arrive() {
        let chunked = b"4\r\nWiki\r\n6;name=value\r\npedia \r\nE\r\nin \r\n\r\nchunks.\r\n0\r\nExpires: never\r\n\r\n";
        for piece in [1, 2, 3, 7, chunked.len()] {
            let (data, clean) = body(Framing::Chunked(Chunk::Size), chunked, piece).unwrap();
            assert_eq!(data, b"Wikipedia in \r\n\r\nchunks.", "in pieces of {piece}");
            assert!(clean);
            let (data, clean) = body(Framing::Length(5), b"hello", piece).unwrap();
            assert_eq!((data.as_slice(), clean), (&b"hello"[..], true));
        }
        let (data, ended) = body(Framing::Close, b"until the end", 4).unwrap();
        assert_eq!((data.as_slice(), ended), (&b"until the end"[..], false));
        let mut close = Framing::Close;
        assert_eq!(close.closed(), Ok(()));
        assert!(close.is_done());
        assert_eq!(Framing::Length(3).closed(), Err(BadResponse::ClosedEarly));
        assert_eq!(Framing::Chunked(Chunk::Size).closed(), Err(BadResponse::ClosedEarly));
    }

    #[test]
    fn a_body_ends_with_its_last_data_when_the_end_is_buffered() {
        let mut framing = Framing::Chunked(Chunk::Size);
        let mut buf = BytesMut::from(&b"3\r\nabc\r\n0\r\n\r\n"[..]);
        assert_eq!(framing.step(&mut buf), Ok(Step::Data(Bytes::from_static(b"abc"))));
        assert!(framing.is_done() && buf.is_empty());
        let mut framing = Framing::Length(3);
        let mut buf = BytesMut::from(&b"abc"[..]);
        assert_eq!(framing.step(&mut buf), Ok(Step::Data(Bytes::from_static(b"abc"))));
        assert!(framing.is_done());
    }

    #[test]
    fn refuses_bad_chunks() {
        for raw in [
            &b"g\r\n"[..],
            b"\r\n",
            b"3 x\r\nabc\r\n",
            b"3\r\nabcX\r\n",
            b"1000000000000000\r\n",
            b"-3\r\nabc\r\n0\r\n\r\n",
        ] {
            assert_eq!(body(Framing::Chunked(Chunk::Size), raw, 1), Err(BadResponse::Chunk), "{raw:?}");
        }
        let long = vec![b'1'; MAX_CHUNK_LINE + 2];
        assert_eq!(body(Framing::Chunked(Chunk::Size), &long, 64), Err(BadResponse::Chunk));
        let mut trailers = b"0\r\n".to_vec();
        for _ in 0..2000 {
            trailers.extend_from_slice(b"x-trailer: value\r\n");
        }
        assert_eq!(body(Framing::Chunked(Chunk::Size), &trailers, 512), Err(BadResponse::TrailersTooLarge));
    }
}
