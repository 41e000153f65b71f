//! What the server measures about itself, and how it reports it (`/stats`, `/metrics`).
//!
//! The event loop owns one [`ServerStats`] and is its only writer, so nothing here is atomic or
//! locked. `/stats` and `/metrics` are rendered from one table in [`crate::metrics`];
//! `stats_json` and `metrics_text` here are the renderers from before that table, kept for
//! tests only, as the reference the table is checked against (every field they said, it says).

#[cfg(test)]
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
#[cfg(test)]
use serde_json::json;

#[cfg(test)]
use crate::cluster::ClusterFault;
use crate::tempo::Bpm;

/// A tick more than this late counts as late in `conductor_late_ticks_total`.
pub const LATE_TICK_NS: u64 = 1_000_000;

/// Late ticks among the last 64 that make `/healthz` report the server degraded.
pub const DEGRADED_LATE_TICKS: u32 = 8;

/// Tick intervals without a tick while the transport plays that make `/healthz` report the
/// server degraded ([`silence`]).
pub const SILENT_TICKS: u32 = 8;
/// The shortest such silence: at very fast tick rates eight intervals are shorter than one
/// pass of the loop.
pub const MIN_SILENCE: Duration = Duration::from_millis(100);

/// The silence worth reporting: `since_last_tick` when the transport plays and it spans more
/// than [`SILENT_TICKS`] intervals (at least [`MIN_SILENCE`]), else `None`.
pub fn silence(since_last_tick: Duration, interval_ns: f64, playing: bool) -> Option<Duration> {
    let allowed =
        Duration::from_secs_f64(interval_ns * f64::from(SILENT_TICKS) / 1e9).max(MIN_SILENCE);
    (playing && since_last_tick > allowed).then_some(since_last_tick)
}

/// A latency distribution in nanoseconds, 1 ns to 60 s at two significant figures (1%).
#[derive(Clone)]
pub struct LatencyHistogram(Histogram<u64>);

impl Default for LatencyHistogram {
    fn default() -> Self {
        // Two significant figures keep each histogram near 30 KiB; bounds are constants.
        let h = Histogram::new_with_bounds(1, 60_000_000_000, 2)
            .unwrap_or_else(|_| Histogram::new(2).unwrap_or_else(|_| unreachable!()));
        LatencyHistogram(h)
    }
}

impl LatencyHistogram {
    pub fn record(&mut self, ns: u64) {
        self.0.saturating_record(ns.max(1));
    }

    /// Adds another distribution's samples (another shard's).
    pub fn merge(&mut self, other: &LatencyHistogram) {
        // Same bounds on both sides, so adding cannot fail; were it to, the samples of that
        // shard are left out rather than the report.
        let _ = self.0.add(&other.0);
    }

    pub fn summary(&self) -> Percentiles {
        let h = &self.0;
        Percentiles {
            p50: h.value_at_quantile(0.5),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            count: h.len(),
            mean: h.mean(),
        }
    }
}

/// The figures every distribution is reported by, in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Percentiles {
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub count: u64,
    pub mean: f64,
}

impl Percentiles {
    /// `{p50, p99, p999, max, samples}` in microseconds, for JSON.
    #[cfg(test)]
    fn micros(&self) -> serde_json::Value {
        let us = |ns: u64| ns as f64 / 1000.0;
        json!({
            "p50": us(self.p50),
            "p99": us(self.p99),
            "p999": us(self.p999),
            "max": us(self.max),
            "samples": self.count,
        })
    }
}

/// How a client is connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientKind {
    /// `/ws`, this server's own protocol.
    Ws = 0,
    /// Socket.IO over WebSocket.
    SocketIoWs = 1,
    /// Socket.IO over HTTP long-polling.
    SocketIoPolling = 2,
}

impl ClientKind {
    pub const ALL: [ClientKind; 3] = [
        ClientKind::Ws,
        ClientKind::SocketIoWs,
        ClientKind::SocketIoPolling,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ClientKind::Ws => "ws",
            ClientKind::SocketIoWs => "socketio_ws",
            ClientKind::SocketIoPolling => "socketio_polling",
        }
    }
}

/// Why a WebSocket connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed (close frame or EOF).
    ClientClosed,
    /// Fell too far behind the ticks (1008).
    SlowConsumer,
    /// Broke the WebSocket protocol (1002).
    ProtocolError,
    /// Sent a message over the size limit (1009).
    MessageTooBig,
    /// Sent a text frame that was not UTF-8 (1007).
    InvalidUtf8,
    /// The socket failed.
    IoError,
    /// The server shut down (1001).
    Shutdown,
    /// Sent messages at ten times the rate limit (1008).
    RateLimited,
    /// Did not answer the server's ping in time (1001).
    PingTimeout,
}

impl CloseReason {
    pub const ALL: [CloseReason; 9] = [
        CloseReason::ClientClosed,
        CloseReason::SlowConsumer,
        CloseReason::ProtocolError,
        CloseReason::MessageTooBig,
        CloseReason::InvalidUtf8,
        CloseReason::IoError,
        CloseReason::Shutdown,
        CloseReason::RateLimited,
        CloseReason::PingTimeout,
    ];

    pub fn label(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::MessageTooBig => "message_too_big",
            CloseReason::InvalidUtf8 => "invalid_utf8",
            CloseReason::IoError => "io_error",
            CloseReason::Shutdown => "shutdown",
            CloseReason::RateLimited => "rate_limited",
            CloseReason::PingTimeout => "ping_timeout",
        }
    }
}

/// Why a connection never became a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefuseReason {
    /// The HTTP request was malformed or over the limits (400, 431).
    BadRequest,
    /// The upgrade request was invalid (400).
    BadUpgrade,
    /// The request head did not arrive in time.
    HandshakeTimeout,
    /// The process ran out of file descriptors (or memory); the connection waits in the backlog.
    FdLimit,
    /// A browser page from an origin not in --allowed-origin (403).
    ForbiddenOrigin,
    /// --max-clients were already connected (503, or a Socket.IO connect_error).
    MaxClients,
    /// The address already held --max-sessions-per-ip long-polling sessions (429).
    SessionsPerIp,
    /// A Socket.IO session or socket that did not connect to the namespace (`40`) within
    /// --handshake-timeout.
    ConnectTimeout,
}

impl RefuseReason {
    pub const ALL: [RefuseReason; 8] = [
        RefuseReason::BadRequest,
        RefuseReason::BadUpgrade,
        RefuseReason::HandshakeTimeout,
        RefuseReason::FdLimit,
        RefuseReason::ForbiddenOrigin,
        RefuseReason::MaxClients,
        RefuseReason::SessionsPerIp,
        RefuseReason::ConnectTimeout,
    ];

    pub fn label(self) -> &'static str {
        match self {
            RefuseReason::BadRequest => "bad_request",
            RefuseReason::BadUpgrade => "bad_upgrade",
            RefuseReason::HandshakeTimeout => "handshake_timeout",
            RefuseReason::FdLimit => "fd_limit",
            RefuseReason::ForbiddenOrigin => "forbidden_origin",
            RefuseReason::MaxClients => "max_clients",
            RefuseReason::SessionsPerIp => "sessions_per_ip",
            RefuseReason::ConnectTimeout => "connect_timeout",
        }
    }
}

/// Everything the loop counts.
#[derive(Clone, Default)]
pub struct ServerStats {
    /// Emission minus deadline, per tick (timing thread).
    pub lateness: LatencyHistogram,
    /// Deadline to the last byte handed to the kernel, per fan-out (event loop).
    pub fanout: LatencyHistogram,
    /// Emission to the moment the loop took the tick from the ring: the cost of waking it.
    pub handoff: LatencyHistogram,
    pub ticks_emitted: u64,
    pub late_ticks: u64,
    /// Frames completely written to clients' sockets.
    pub messages_sent: u64,
    pub connections_accepted: u64,
    pub client_errors: u64,
    pub tempo_changes: u64,
    pub transport_changes: u64,
    /// Clients connected now, all protocols: counted up by `client_opened` and down by
    /// `client_closed`.
    pub clients: usize,
    clients_by_kind: [usize; ClientKind::ALL.len()],
    /// One bit per recent tick, newest lowest: set when it was late.
    recent_late: u64,
    closed: [u64; CloseReason::ALL.len()],
    refused: [u64; RefuseReason::ALL.len()],
    http_responses: Vec<(u16, u64)>,
}

impl ServerStats {
    pub fn record_tick(&mut self, lateness_ns: u64) {
        self.ticks_emitted += 1;
        let late = lateness_ns > LATE_TICK_NS;
        if late {
            self.late_ticks += 1;
        }
        self.recent_late = (self.recent_late << 1) | u64::from(late);
        self.lateness.record(lateness_ns);
    }

    /// Why the server is unhealthy, if it is: no tick for a while although the transport
    /// plays (`silent`, from [`silence`]), or sustained lateness on the timing thread.
    pub fn degraded(&self, silent: Option<Duration>) -> Option<String> {
        if let Some(silent) = silent {
            return Some(format!(
                "degraded: no tick for {} ms although the transport plays",
                silent.as_millis()
            ));
        }
        let late = self.recent_late.count_ones();
        (late >= DEGRADED_LATE_TICKS)
            .then(|| format!("degraded: {late} of the last 64 ticks were more than 1 ms late"))
    }

    /// A client joined: an upgraded `/ws` socket, a Socket.IO socket, or a polling session.
    pub fn client_opened(&mut self, kind: ClientKind) {
        self.clients += 1;
        self.clients_by_kind[kind as usize] += 1;
    }

    /// A client of `kind` left: the one place a client stops being one.
    pub fn client_closed(&mut self, kind: ClientKind, reason: CloseReason) {
        self.clients_by_kind[kind as usize] = self.clients_by_kind[kind as usize].saturating_sub(1);
        self.count_close(reason);
    }

    /// A polling session became a WebSocket one: the same client, another transport.
    pub fn client_moved(&mut self, from: ClientKind, to: ClientKind) {
        self.clients_by_kind[from as usize] = self.clients_by_kind[from as usize].saturating_sub(1);
        self.clients_by_kind[to as usize] += 1;
    }

    pub fn clients_of(&self, kind: ClientKind) -> usize {
        self.clients_by_kind[kind as usize]
    }

    fn count_close(&mut self, reason: CloseReason) {
        self.clients = self.clients.saturating_sub(1);
        if let Some(i) = CloseReason::ALL.iter().position(|r| *r == reason) {
            self.closed[i] += 1;
        }
    }

    pub fn count_refused(&mut self, reason: RefuseReason) {
        if let Some(i) = RefuseReason::ALL.iter().position(|r| *r == reason) {
            self.refused[i] += 1;
        }
    }

    pub fn count_http(&mut self, status: u16) {
        match self.http_responses.iter_mut().find(|(s, _)| *s == status) {
            Some((_, n)) => *n += 1,
            None => {
                self.http_responses.push((status, 1));
                self.http_responses.sort_unstable();
            }
        }
    }

    pub fn refused(&self, reason: RefuseReason) -> u64 {
        RefuseReason::ALL
            .iter()
            .position(|r| *r == reason)
            .map_or(0, |i| self.refused[i])
    }

    /// `(status, responses)`, by status.
    pub fn http_responses(&self) -> &[(u16, u64)] {
        &self.http_responses
    }

    /// Adds another fan-out shard's figures to these: its clients, messages, closes,
    /// refusals, responses, and its fan-out and hand-off distributions. What the timing
    /// thread's stream says (ticks, lateness) and the hub's change counts are the same on
    /// every shard, so they are kept from `self` rather than counted once per shard.
    pub fn merge_shard(&mut self, other: &ServerStats) {
        self.fanout.merge(&other.fanout);
        self.handoff.merge(&other.handoff);
        self.messages_sent += other.messages_sent;
        self.connections_accepted += other.connections_accepted;
        self.client_errors += other.client_errors;
        self.clients += other.clients;
        for (mine, theirs) in self.clients_by_kind.iter_mut().zip(other.clients_by_kind) {
            *mine += theirs;
        }
        for (mine, theirs) in self.closed.iter_mut().zip(other.closed) {
            *mine += theirs;
        }
        for (mine, theirs) in self.refused.iter_mut().zip(other.refused) {
            *mine += theirs;
        }
        for &(status, n) in &other.http_responses {
            match self.http_responses.iter_mut().find(|(s, _)| *s == status) {
                Some((_, mine)) => *mine += n,
                None => self.http_responses.push((status, n)),
            }
        }
        self.http_responses.sort_unstable();
    }

    pub fn closed(&self, reason: CloseReason) -> u64 {
        CloseReason::ALL
            .iter()
            .position(|r| *r == reason)
            .map_or(0, |i| self.closed[i])
    }
}

/// The live values a report needs besides the counters.
pub struct Snapshot<'a> {
    pub bpm: Bpm,
    pub ppqn: u32,
    pub clients: usize,
    pub count: u64,
    /// The transport's state for the next tick, and the tick its latest change holds from.
    pub transport: &'static str,
    pub transport_count: u64,
    pub uptime_s: f64,
    /// Ticks no client got: the ring to a stalled loop was full, or the timing thread fell
    /// behind and skipped them.
    pub dropped_ticks: u64,
    /// Of those, the ticks the timing thread skipped.
    pub skipped_ticks: u64,
    /// How long no tick has gone out although the transport plays, when that is too long.
    pub silent_for: Option<Duration>,
    /// With `--cluster`: Redis, peers, timeline version, last change's lead.
    pub cluster: Option<crate::cluster::ClusterStatus>,
    /// Every shard's figures added up.
    pub stats: &'a ServerStats,
    /// Each fan-out shard's own, in shard order.
    pub shards: &'a [ShardFigures],
}

/// One fan-out shard's figures in `/stats` and `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardFigures {
    pub clients: usize,
    /// Its fan-outs' p99, deadline to last byte, in ns.
    pub fanout_p99_ns: u64,
}

#[cfg(test)]
/// The `/stats` document.
pub fn stats_json(s: &Snapshot) -> String {
    let st = s.stats;
    let mut closed = serde_json::Map::new();
    for r in CloseReason::ALL {
        closed.insert(r.label().into(), st.closed(r).into());
    }
    let mut refused = serde_json::Map::new();
    for (i, r) in RefuseReason::ALL.iter().enumerate() {
        refused.insert(r.label().into(), st.refused[i].into());
    }
    let doc = json!({
        "bpm": s.bpm,
        "ppqn": s.ppqn,
        "clients": s.clients,
        "clients_by_protocol": ClientKind::ALL
            .iter()
            .map(|k| (k.label().to_string(), st.clients_of(*k).into()))
            .collect::<serde_json::Map<_, _>>(),
        "count": s.count,
        "transport": { "state": s.transport, "count": s.transport_count },
        "uptime_s": (s.uptime_s * 1000.0).round() / 1000.0,
        "ticks_emitted": st.ticks_emitted,
        "late_ticks": st.late_ticks,
        "dropped_ticks": s.dropped_ticks,
        "skipped_ticks": s.skipped_ticks,
        "messages_sent": st.messages_sent,
        "tick_lateness_us": st.lateness.summary().micros(),
        "fanout_us": st.fanout.summary().micros(),
        "handoff_us": st.handoff.summary().micros(),
        "closed": closed,
        "refused": refused,
        "healthy": st.degraded(s.silent_for).is_none(),
        "cluster": s.cluster.map(|c| json!({
            "connected": c.connected,
            "error": c.fault.map(|f| f.label()),
            "peers": c.peers,
            "version": c.version,
            "last_lead_ms": c.last_lead_ms,
            "timelines_refused": c.timelines_refused,
        })),
        "version": env!("CARGO_PKG_VERSION"),
    });
    doc.to_string()
}

#[cfg(test)]
fn metric(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(
        out,
        "# HELP conductor_{name} {help}\n# TYPE conductor_{name} {kind}"
    );
}

#[cfg(test)]
/// One metric with a single value.
fn single(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    metric(out, name, kind, help);
    let _ = writeln!(out, "conductor_{name} {value}");
}

#[cfg(test)]
/// One metric family with a value per `label` (e.g. `reason`).
fn labelled<V: std::fmt::Display>(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    label: &str,
    rows: impl IntoIterator<Item = (String, V)>,
) {
    metric(out, name, kind, help);
    for (key, value) in rows {
        let _ = writeln!(out, "conductor_{name}{{{label}=\"{key}\"}} {value}");
    }
}

#[cfg(test)]
fn summary(out: &mut String, name: &str, help: &str, p: &Percentiles) {
    metric(out, name, "summary", help);
    let s = |ns: u64| ns as f64 / 1e9;
    for (q, v) in [
        ("0.5", p.p50),
        ("0.99", p.p99),
        ("0.999", p.p999),
        ("1", p.max),
    ] {
        let _ = writeln!(out, "conductor_{name}{{quantile=\"{q}\"}} {}", s(v));
    }
    let _ = writeln!(
        out,
        "conductor_{name}_sum {}",
        p.mean * p.count as f64 / 1e9
    );
    let _ = writeln!(out, "conductor_{name}_count {}", p.count);
}

#[cfg(test)]
/// The `/metrics` document, Prometheus text exposition format 0.0.4.
pub fn metrics_text(s: &Snapshot) -> String {
    let st = s.stats;
    let mut out = String::with_capacity(4096);
    single(
        &mut out,
        "clients",
        "gauge",
        "Connected clients, all protocols.",
        s.clients.to_string(),
    );
    single(
        &mut out,
        "bpm",
        "gauge",
        "Current tempo in beats per minute.",
        s.bpm.as_f64().to_string(),
    );
    single(
        &mut out,
        "ppqn",
        "gauge",
        "Ticks per quarter note.",
        s.ppqn.to_string(),
    );
    single(
        &mut out,
        "tick_count",
        "gauge",
        "Count of the last tick emitted.",
        s.count.to_string(),
    );
    single(
        &mut out,
        "uptime_seconds",
        "gauge",
        "Seconds since start.",
        s.uptime_s.to_string(),
    );
    single(
        &mut out,
        "ticks_emitted_total",
        "counter",
        "Ticks emitted by the timing thread.",
        st.ticks_emitted.to_string(),
    );
    single(
        &mut out,
        "late_ticks_total",
        "counter",
        "Ticks emitted more than 1 ms after their deadline.",
        st.late_ticks.to_string(),
    );
    single(
        &mut out,
        "dropped_ticks_total",
        "counter",
        "Ticks no client got: the event loop stalled, or the timing thread fell behind.",
        s.dropped_ticks.to_string(),
    );
    single(
        &mut out,
        "skipped_ticks_total",
        "counter",
        "Ticks the timing thread skipped after falling behind, rather than send them at once.",
        s.skipped_ticks.to_string(),
    );
    single(
        &mut out,
        "messages_sent_total",
        "counter",
        "Frames fully written to client sockets.",
        st.messages_sent.to_string(),
    );
    single(
        &mut out,
        "connections_accepted_total",
        "counter",
        "TCP connections accepted.",
        st.connections_accepted.to_string(),
    );
    single(
        &mut out,
        "client_errors_total",
        "counter",
        "Client messages answered with an error event.",
        st.client_errors.to_string(),
    );
    single(
        &mut out,
        "tempo_changes_total",
        "counter",
        "Tempo changes applied.",
        st.tempo_changes.to_string(),
    );
    single(
        &mut out,
        "transport_changes_total",
        "counter",
        "Transport starts and stops applied.",
        st.transport_changes.to_string(),
    );
    single(
        &mut out,
        "playing",
        "gauge",
        "1 while the transport plays (ticks are sent), 0 while stopped.",
        u8::from(s.transport == "playing").to_string(),
    );
    summary(
        &mut out,
        "tick_lateness_seconds",
        "Tick emission minus its deadline.",
        &st.lateness.summary(),
    );
    summary(
        &mut out,
        "fanout_latency_seconds",
        "Tick deadline to the last byte handed to the kernel.",
        &st.fanout.summary(),
    );
    if let Some(c) = s.cluster {
        let o = &mut out;
        single(
            o,
            "cluster_connected",
            "gauge",
            "1 while the cluster's Redis answers and takes writes.",
            u8::from(c.connected),
        );
        labelled(
            o,
            "cluster_error",
            "gauge",
            "1 for what is wrong with the cluster's Redis, if anything.",
            "error",
            ClusterFault::ALL
                .iter()
                .map(|f| (f.label().to_string(), u8::from(c.fault == Some(*f)))),
        );
        single(
            o,
            "cluster_timelines_refused_total",
            "counter",
            "Timelines read from Redis that were refused (out of limits, corrupt) and repaired.",
            c.timelines_refused,
        );
        single(
            o,
            "cluster_peers",
            "gauge",
            "Instances with a recent heartbeat, this one included.",
            c.peers,
        );
        single(
            o,
            "cluster_timeline_version",
            "gauge",
            "Version of the shared timeline followed.",
            c.version,
        );
        if let Some(ms) = c.last_lead_ms {
            single(
                o,
                "cluster_last_lead_seconds",
                "gauge",
                "For the last shared change: its effective instant minus when this instance heard of it.",
                ms / 1000.0,
            );
        }
    }
    labelled(
        &mut out,
        "protocol_clients",
        "gauge",
        "Connected clients, by protocol (ws, socketio_ws, socketio_polling).",
        "protocol",
        ClientKind::ALL.map(|k| (k.label().to_string(), st.clients_of(k))),
    );
    labelled(
        &mut out,
        "connections_closed_total",
        "counter",
        "WebSocket connections closed, by reason.",
        "reason",
        CloseReason::ALL.map(|r| (r.label().to_string(), st.closed(r))),
    );
    labelled(
        &mut out,
        "connections_refused_total",
        "counter",
        "Connections refused before becoming clients, by reason.",
        "reason",
        RefuseReason::ALL
            .iter()
            .zip(st.refused)
            .map(|(r, n)| (r.label().to_string(), n)),
    );
    labelled(
        &mut out,
        "http_responses_total",
        "counter",
        "HTTP responses, by status.",
        "status",
        st.http_responses
            .iter()
            .map(|(status, n)| (status.to_string(), *n)),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(stats: &ServerStats) -> Snapshot<'_> {
        Snapshot {
            bpm: Bpm::whole(120),
            ppqn: 4,
            clients: 3,
            count: 41,
            transport: "playing",
            transport_count: 0,
            uptime_s: 5.25,
            dropped_ticks: 0,
            skipped_ticks: 0,
            silent_for: None,
            cluster: None,
            stats,
            shards: &[],
        }
    }

    #[test]
    fn shards_add_up_but_the_timing_stream_counts_once() {
        let mut a = ServerStats::default();
        let mut b = ServerStats::default();
        for st in [&mut a, &mut b] {
            st.record_tick(10);
            st.client_opened(ClientKind::Ws);
            st.count_http(200);
            st.fanout.record(1_000);
            st.messages_sent += 5;
        }
        b.client_opened(ClientKind::Ws);
        b.client_closed(ClientKind::Ws, CloseReason::ClientClosed);
        b.count_refused(RefuseReason::MaxClients);
        b.count_http(404);
        b.fanout.record(9_000_000);
        a.merge_shard(&b);
        assert_eq!(a.clients, 2);
        assert_eq!(a.clients_of(ClientKind::Ws), 2);
        assert_eq!(a.messages_sent, 10);
        assert_eq!(a.closed(CloseReason::ClientClosed), 1);
        assert_eq!(a.refused(RefuseReason::MaxClients), 1);
        assert_eq!(a.http_responses(), &[(200, 2), (404, 1)]);
        assert_eq!(a.fanout.summary().count, 3);
        assert!(a.fanout.summary().max >= 9_000_000);
        assert_eq!(a.ticks_emitted, 1);
    }

    #[test]
    fn percentiles_come_from_recorded_values() {
        let mut h = LatencyHistogram::default();
        for ns in 1..=1000u64 {
            h.record(ns * 1000);
        }
        let p = h.summary();
        assert_eq!(p.count, 1000);
        assert!((495_000..=505_000).contains(&p.p50), "{p:?}");
        assert!((985_000..=1_000_000).contains(&p.p99), "{p:?}");
        assert!(p.max >= 995_000, "{p:?}");
    }

    #[test]
    fn sustained_lateness_degrades_health_and_recovers() {
        let mut st = ServerStats::default();
        for _ in 0..100 {
            st.record_tick(10_000);
        }
        assert_eq!(st.degraded(None), None);
        for _ in 0..7 {
            st.record_tick(5_000_000);
        }
        assert_eq!(
            st.degraded(None),
            None,
            "a few late ticks are not sustained"
        );
        st.record_tick(5_000_000);
        assert!(st.degraded(None).unwrap().contains("8 of the last 64"));
        for _ in 0..64 {
            st.record_tick(10_000);
        }
        assert_eq!(st.degraded(None), None);
    }

    #[test]
    fn a_playing_server_without_ticks_for_eight_intervals_is_degraded() {
        let ms = Duration::from_millis;
        // 125 ms ticks: eight intervals are a second.
        assert_eq!(silence(ms(900), 125e6, true), None);
        assert_eq!(silence(ms(1001), 125e6, true), Some(ms(1001)));
        assert_eq!(
            silence(ms(60_000), 125e6, false),
            None,
            "stopped: silence is right"
        );
        // Very fast ticks: never less than MIN_SILENCE.
        assert_eq!(silence(ms(50), 62_500.0, true), None);
        assert!(silence(ms(150), 62_500.0, true).is_some());
        let st = ServerStats::default();
        let why = st.degraded(silence(ms(3000), 125e6, true)).unwrap();
        assert!(why.contains("no tick for 3000 ms"), "{why}");
    }

    #[test]
    fn stats_json_has_the_documented_fields() {
        let mut st = ServerStats::default();
        st.record_tick(20_000);
        st.record_tick(2_000_000);
        st.fanout.record(50_000);
        st.client_opened(ClientKind::SocketIoPolling);
        st.client_opened(ClientKind::Ws);
        st.client_opened(ClientKind::SocketIoPolling);
        st.client_moved(ClientKind::SocketIoPolling, ClientKind::SocketIoWs);
        st.client_closed(ClientKind::Ws, CloseReason::SlowConsumer);
        assert_eq!(st.clients, 2);
        let v: serde_json::Value = serde_json::from_str(&stats_json(&snapshot(&st))).unwrap();
        assert_eq!(v["clients_by_protocol"]["ws"], 0);
        assert_eq!(v["clients_by_protocol"]["socketio_ws"], 1);
        assert_eq!(v["clients_by_protocol"]["socketio_polling"], 1);
        assert_eq!(v["bpm"], 120);
        assert_eq!(v["clients"], 3);
        assert_eq!(v["count"], 41);
        assert_eq!(v["uptime_s"], 5.25);
        assert_eq!(v["ticks_emitted"], 2);
        assert_eq!(v["late_ticks"], 1);
        assert_eq!(v["closed"]["slow_consumer"], 1);
        for key in ["p50", "p99", "p999", "max"] {
            assert!(v["tick_lateness_us"][key].is_number(), "{key}");
            assert!(v["fanout_us"][key].is_number(), "{key}");
        }
        assert!((v["fanout_us"]["max"].as_f64().unwrap() - 50.0).abs() < 1.0);
    }

    #[test]
    fn metrics_are_prefixed_and_well_formed() {
        let mut st = ServerStats::default();
        st.record_tick(10_000);
        st.count_http(404);
        st.count_http(200);
        st.count_http(404);
        st.count_refused(RefuseReason::BadUpgrade);
        let text = metrics_text(&snapshot(&st));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("conductor_"), "{line}");
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
        assert!(text.contains("conductor_clients 3\n"));
        assert!(text.contains("conductor_protocol_clients{protocol=\"socketio_polling\"} 0\n"));
        assert!(text.contains("conductor_ticks_emitted_total 1\n"));
        assert!(text.contains("conductor_http_responses_total{status=\"404\"} 2\n"));
        assert!(text.contains("conductor_connections_refused_total{reason=\"bad_upgrade\"} 1\n"));
        assert!(text.contains("conductor_tick_lateness_seconds{quantile=\"0.99\"}"));
        assert!(text.contains("conductor_connections_closed_total{reason=\"slow_consumer\"} 0\n"));
    }
}
