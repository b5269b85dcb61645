//! The agent's drop monitor as its local API speaks it: `GET /overlay-agent/monitor` answers
//! with a long-lived stream of newline-delimited JSON [`MonitorEvent`]s (blank lines are
//! keep-alives), and `GET /overlay-agent/drops` with the drops of the last minute
//! ([`RecentDrops`]).

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::Path,
};

use serde::{Deserialize, Serialize};

use crate::agent::{LocalError, percent_encode};

/// One line of the monitor's stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
// Passed one at a time on their way to JSON; nearly all are drops.
#[allow(clippy::large_enum_variant)]
pub enum MonitorEvent {
    Drop(DropReport),
    /// Events that were not reported: over the datapath's per-CPU budget or the ring buffer
    /// was full (`by: datapath`), or this subscriber fell behind the agent (`by: agent`).
    Skipped(SkippedReport),
}

/// A dropped packet, as the datapath saw it, with the names the agent knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropReport {
    /// RFC 3339, UTC, microseconds.
    pub time: String,
    /// The reporting agent's underlay address.
    pub agent: IpAddr,
    /// Name of the network the drop is counted under; none for drops of no network (VXLAN
    /// from an unknown VTEP, say).
    pub network: Option<String>,
    /// Its id in the datapath (0: no network).
    pub network_id: u32,
    /// The drop reason (`drop_cross_network`, ...), as the counters name it.
    pub reason: String,
    /// The program that dropped it (`from_container`, `from_host`, `from_underlay`,
    /// `xdp_underlay`).
    pub program: String,
    /// `tcp`, `udp`, `icmp`, `icmpv6`, `sctp`, `hopopt` (IPv6 hop-by-hop options first), the
    /// number, or `arp`/`ethertype 0x....` for frames that are not IP.
    pub protocol: String,
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    /// Ports (ICMP: type and code) when the packet had them.
    pub src_port: Option<u16>,
    pub dst_port: Option<u16>,
    /// The device it arrived on, and its name when it is a container's veth or known.
    pub ifindex: u32,
    pub interface: Option<String>,
    /// The local container it came from (by veth, or by source address).
    pub src_container: Option<String>,
    /// The local container it was for (by destination address).
    pub dst_container: Option<String>,
    /// Length as it arrived.
    pub len: u32,
    /// Addresses are those of the packet inside a VXLAN datagram.
    pub inner: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedReport {
    pub count: u64,
    /// `datapath` or `agent`.
    pub by: String,
}

/// What to follow; every given field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorFilter {
    /// Only `drop` exists today.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// A network name, or its id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// A container id: events it sent or that were for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

impl MonitorFilter {
    /// The query string of `GET /overlay-agent/monitor`.
    pub fn query(&self) -> String {
        let mut parts = vec![];
        for (key, value) in [
            ("type", &self.kind),
            ("network", &self.network),
            ("container", &self.container),
        ] {
            if let Some(v) = value {
                parts.push(format!("{key}={}", percent_encode(v)));
            }
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!("?{}", parts.join("&"))
        }
    }

    /// Whether a drop passes (skipped reports always do: they are not attributable).
    pub fn matches(&self, event: &MonitorEvent) -> bool {
        let MonitorEvent::Drop(d) = event else {
            return true;
        };
        if let Some(n) = &self.network
            && d.network.as_deref() != Some(n.as_str())
            && n.parse::<u32>().ok() != Some(d.network_id)
        {
            return false;
        }
        if let Some(c) = &self.container
            && d.src_container.as_deref() != Some(c.as_str())
            && d.dst_container.as_deref() != Some(c.as_str())
        {
            return false;
        }
        true
    }
}

/// `GET /overlay-agent/drops`: drops counted in the last minute, by network and reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentDrops {
    /// The window the figures cover: 60 s, or less while the agent is younger than that.
    pub window_seconds: u64,
    /// How they are measured: `counter deltas` (the datapath's drop counters, sampled; not the
    /// monitor's events, which are rate-limited).
    pub source: String,
    pub drops: Vec<RecentDrop>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentDrop {
    pub network: Option<String>,
    pub network_id: u32,
    pub reason: String,
    pub packets: u64,
}

/// A live `GET /overlay-agent/monitor`: one event per [`MonitorStream::next_event`].
pub struct MonitorStream {
    body: BufReader<UnixStream>,
    /// Bytes of the current chunk not yet read.
    chunk_left: usize,
    line: Vec<u8>,
}

impl MonitorStream {
    /// Opens the stream on the agent's socket.
    pub fn open(socket: &Path, filter: &MonitorFilter) -> Result<MonitorStream, LocalError> {
        let unreachable = |source| LocalError::Unreachable {
            path: socket.to_owned(),
            source,
        };
        let mut stream = UnixStream::connect(socket).map_err(unreachable)?;
        let head = format!(
            "GET /overlay-agent/monitor{} HTTP/1.1\r\nHost: ebpf-overlay\r\nAccept: application/x-ndjson\r\n\r\n",
            filter.query()
        );
        stream.write_all(head.as_bytes()).map_err(unreachable)?;
        let mut body = BufReader::new(stream);
        let malformed = |m: &str| LocalError::Malformed(m.to_owned());
        let mut status_line = String::new();
        body.read_line(&mut status_line).map_err(unreachable)?;
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| malformed("no status line"))?;
        let mut chunked = false;
        let mut length = None;
        loop {
            let mut header = String::new();
            if body.read_line(&mut header).map_err(unreachable)? == 0 {
                return Err(malformed("answer ended in its headers"));
            }
            let header = header.trim_end().to_ascii_lowercase();
            if header.is_empty() {
                break;
            }
            if header.starts_with("transfer-encoding:") && header.contains("chunked") {
                chunked = true;
            }
            if let Some(v) = header.strip_prefix("content-length:") {
                length = v.trim().parse::<usize>().ok();
            }
        }
        if status != 200 {
            let mut text = vec![0u8; length.unwrap_or(0).min(64 * 1024)];
            let _ = body.read_exact(&mut text);
            let message = serde_json::from_slice::<crate::ErrorBody>(&text)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&text).into_owned());
            return Err(LocalError::Rejected { status, message });
        }
        if !chunked {
            return Err(malformed("the monitor's answer is not a chunked stream"));
        }
        Ok(MonitorStream {
            body,
            chunk_left: 0,
            line: vec![],
        })
    }

    /// The next byte of the chunked body; `None` at its end.
    fn next_byte(&mut self) -> Result<Option<u8>, LocalError> {
        let io = |e: std::io::Error| LocalError::Malformed(format!("reading the stream: {e}"));
        while self.chunk_left == 0 {
            let mut size = String::new();
            if self.body.read_line(&mut size).map_err(io)? == 0 {
                return Ok(None);
            }
            let size = size.trim();
            if size.is_empty() {
                continue; // the CRLF after a chunk's data
            }
            let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| LocalError::Malformed(format!("bad chunk size {size:?}")))?;
            if size == 0 {
                return Ok(None);
            }
            self.chunk_left = size;
        }
        let mut b = [0u8; 1];
        self.body.read_exact(&mut b).map_err(io)?;
        self.chunk_left -= 1;
        Ok(Some(b[0]))
    }

    /// The next event; `None` when the agent ended the stream.
    pub fn next_event(&mut self) -> Result<Option<MonitorEvent>, LocalError> {
        loop {
            match self.next_byte()? {
                None => return Ok(None),
                Some(b'\n') => {
                    let line = std::mem::take(&mut self.line);
                    if line.iter().all(|b| b.is_ascii_whitespace()) {
                        continue; // keep-alive
                    }
                    return serde_json::from_slice(&line)
                        .map(Some)
                        .map_err(|e| LocalError::Malformed(format!("monitor event: {e}")));
                }
                Some(b) => self.line.push(b),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drop_report() -> DropReport {
        DropReport {
            time: "2026-12-02T07:00:00.000000Z".into(),
            agent: "10.0.0.1".parse().unwrap(),
            network: Some("dcos".into()),
            network_id: 1,
            reason: "drop_cross_network".into(),
            program: "from_container".into(),
            protocol: "udp".into(),
            src: Some("9.0.1.2".parse().unwrap()),
            dst: Some("10.1.1.2".parse().unwrap()),
            src_port: Some(4000),
            dst_port: Some(5000),
            ifindex: 7,
            interface: Some("veth1".into()),
            src_container: Some("c1".into()),
            dst_container: None,
            len: 42,
            inner: false,
        }
    }

    #[test]
    fn filters_by_network_name_or_id_and_by_container_either_way() {
        let ev = MonitorEvent::Drop(drop_report());
        let f = |network: Option<&str>, container: Option<&str>| MonitorFilter {
            kind: None,
            network: network.map(Into::into),
            container: container.map(Into::into),
        };
        assert!(f(None, None).matches(&ev));
        assert!(f(Some("dcos"), None).matches(&ev));
        assert!(f(Some("1"), None).matches(&ev));
        assert!(!f(Some("blue"), None).matches(&ev));
        assert!(f(None, Some("c1")).matches(&ev));
        assert!(!f(None, Some("c2")).matches(&ev));
        let skipped = MonitorEvent::Skipped(SkippedReport {
            count: 3,
            by: "datapath".into(),
        });
        assert!(f(Some("blue"), Some("c2")).matches(&skipped));
        assert_eq!(
            f(Some("my net"), Some("c/1")).query(),
            "?network=my%20net&container=c%2F1"
        );
        assert_eq!(f(None, None).query(), "");
    }

    /// Serves one canned answer on a fresh Unix socket; returns the socket's path.
    fn serve_once(answer: Vec<u8>) -> std::path::PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "monitor-stream-{}-{}.sock",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut request = [0u8; 1024];
            let _ = std::io::Read::read(&mut conn, &mut request);
            conn.write_all(&answer).unwrap();
        });
        path
    }

    #[test]
    fn the_stream_reads_lines_across_chunks_and_skips_keep_alives() {
        let skipped = r#"{"type":"skipped","count":7,"by":"datapath"}"#;
        let drop = serde_json::to_string(&MonitorEvent::Drop(drop_report())).unwrap();
        let body = format!("\n{skipped}\n\n{drop}\n");
        // Chunks that split lines anywhere.
        let mut answer =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n"
                .to_vec();
        for piece in body.as_bytes().chunks(5) {
            answer.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
            answer.extend_from_slice(piece);
            answer.extend_from_slice(b"\r\n");
        }
        answer.extend_from_slice(b"0\r\n\r\n");
        let path = serve_once(answer);
        let mut stream = MonitorStream::open(&path, &MonitorFilter::default()).unwrap();
        assert_eq!(
            stream.next_event().unwrap(),
            Some(MonitorEvent::Skipped(SkippedReport {
                count: 7,
                by: "datapath".into()
            }))
        );
        assert_eq!(
            stream.next_event().unwrap(),
            Some(MonitorEvent::Drop(drop_report()))
        );
        assert_eq!(stream.next_event().unwrap(), None);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_refusal_is_an_error_with_the_agents_message() {
        let body = br#"{"error":"type "flow": the monitor reports only "drop" events"}"#;
        let mut answer = format!(
            "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        answer.extend_from_slice(body);
        let path = serve_once(answer);
        let filter = MonitorFilter {
            kind: Some("flow".into()),
            ..Default::default()
        };
        match MonitorStream::open(&path, &filter) {
            Err(LocalError::Rejected { status, message }) => {
                assert_eq!(status, 400);
                assert!(message.contains("only \"drop\""), "{message}");
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a refusal read as a stream"),
        }
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn events_are_tagged_json_lines() {
        let line = serde_json::to_string(&MonitorEvent::Drop(drop_report())).unwrap();
        assert!(line.starts_with(r#"{"type":"drop","#), "{line}");
        let back: MonitorEvent = serde_json::from_str(&line).unwrap();
        assert_eq!(back, MonitorEvent::Drop(drop_report()));
        let skipped: MonitorEvent =
            serde_json::from_str(r#"{"type":"skipped","count":5,"by":"datapath"}"#).unwrap();
        assert_eq!(
            skipped,
            MonitorEvent::Skipped(SkippedReport {
                count: 5,
                by: "datapath".into()
            })
        );
    }
}
