//! One table of everything the server reports, rendered as `/stats` JSON and as Prometheus
//! text, so the two can no longer drift apart.
//!
//! This module owns the names, kinds, help texts and units of every figure, in one list:
//! [`table`]. Each row carries its `/stats` path and its `/metrics` name side by side; a row
//! with only one of them says why in its help (text values have no Prometheus form; a
//! derived gauge has no JSON one). Rendering is pure: a [`Snapshot`] and the rooms' reports
//! in, text out. It reads no clock and counts nothing itself ([`crate::stats`] counts).

use std::fmt::Write as _;

use serde_json::{Map, Value, json};

use crate::cluster::ClusterFault;
use crate::hub::RoomReport;
use crate::stats::{ClientKind, CloseReason, Percentiles, RefuseReason, Snapshot};
use crate::tempo::Bpm;
use crate::transport::TransportState;

/// A Prometheus metric type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Gauge,
    Counter,
    Summary,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
            Kind::Summary => "summary",
        }
    }
}

/// One value.
#[derive(Clone, Debug, PartialEq)]
pub enum Scalar {
    U(u64),
    F(f64),
    /// A float shown to the millisecond in JSON (uptime), in full in Prometheus.
    Rounded(f64),
    Bool(bool),
    /// A tempo: an integer in JSON when whole, as clients print it.
    Bpm(Bpm),
    /// JSON only.
    Text(String),
    /// `null` in JSON; the line is left out of Prometheus.
    Missing,
}

impl Scalar {
    fn json(&self) -> Value {
        match self {
            Scalar::U(v) => (*v).into(),
            Scalar::F(v) => json!(v),
            Scalar::Rounded(v) => json!((v * 1000.0).round() / 1000.0),
            Scalar::Bool(v) => (*v).into(),
            Scalar::Bpm(b) => json!(b),
            Scalar::Text(t) => t.as_str().into(),
            Scalar::Missing => Value::Null,
        }
    }

    fn prometheus(&self, divisor: f64) -> Option<String> {
        let scaled = |v: f64| {
            if divisor == 1.0 {
                v.to_string()
            } else {
                (v / divisor).to_string()
            }
        };
        match self {
            Scalar::U(v) if divisor == 1.0 => Some(v.to_string()),
            Scalar::U(v) => Some(scaled(*v as f64)),
            Scalar::F(v) | Scalar::Rounded(v) => Some(scaled(*v)),
            Scalar::Bool(v) => Some(u8::from(*v).to_string()),
            Scalar::Bpm(b) => Some(scaled(b.as_f64())),
            Scalar::Text(_) | Scalar::Missing => None,
        }
    }
}

/// What a row holds.
#[derive(Clone, Debug, PartialEq)]
pub enum Reading {
    One(Scalar),
    /// One value per label value (`reason`, `protocol`, `room`…): a JSON object keyed by it,
    /// a labelled Prometheus family. `prom_rows` limits the Prometheus family to its first
    /// rows (the busiest rooms); JSON has them all.
    Labelled {
        label: &'static str,
        rows: Vec<(String, Scalar)>,
        prom_rows: usize,
    },
    /// A latency distribution in ns: `{p50, p99, p999, max, samples}` in µs in JSON, a
    /// summary in seconds in Prometheus.
    Latency(Percentiles),
    /// JSON `null` in place of a whole object (the cluster, without `--cluster`).
    Null,
}

/// One figure, under both its names.
#[derive(Clone, Debug, PartialEq)]
pub struct Metric {
    /// The `/stats` path, dot-separated; `*` stands for the label value of a labelled row.
    pub json: Option<&'static str>,
    /// The `/metrics` name, without the `conductor_` prefix.
    pub prom: Option<&'static str>,
    pub kind: Kind,
    pub help: &'static str,
    /// Prometheus value = JSON value ÷ this (e.g. 1000: milliseconds in JSON, seconds).
    pub prom_divisor: f64,
    pub reading: Reading,
}

fn row(
    json: &'static str,
    prom: &'static str,
    kind: Kind,
    help: &'static str,
    v: Scalar,
) -> Metric {
    Metric {
        json: Some(json),
        prom: Some(prom),
        kind,
        help,
        prom_divisor: 1.0,
        reading: Reading::One(v),
    }
}

fn labelled(
    json: &'static str,
    prom: &'static str,
    kind: Kind,
    help: &'static str,
    label: &'static str,
    rows: Vec<(String, Scalar)>,
) -> Metric {
    let prom_rows = rows.len();
    Metric {
        json: Some(json),
        prom: Some(prom),
        kind,
        help,
        prom_divisor: 1.0,
        reading: Reading::Labelled {
            label,
            rows,
            prom_rows,
        },
    }
}

fn latency(json: &'static str, prom: &'static str, help: &'static str, p: Percentiles) -> Metric {
    Metric {
        json: Some(json),
        prom: Some(prom),
        kind: Kind::Summary,
        help,
        prom_divisor: 1.0,
        reading: Reading::Latency(p),
    }
}

/// Every figure the server reports, in `/metrics` order. `rooms` are the hub's reports,
/// `main` first; `/metrics` labels the per-room gauges for the `metrics_rooms` rooms with the
/// most clients, `/stats` lists every room.
pub fn table(s: &Snapshot, rooms: &[RoomReport], metrics_rooms: usize) -> Vec<Metric> {
    use Kind::{Counter, Gauge};
    use Scalar::{Bool, Rounded, Text, U};
    let st = s.stats;
    let mut t = vec![
        row(
            "clients",
            "clients",
            Gauge,
            "Connected clients, all protocols.",
            U(s.clients as u64),
        ),
        row(
            "bpm",
            "bpm",
            Gauge,
            "Current tempo of room main in beats per minute.",
            Scalar::Bpm(s.bpm),
        ),
        row(
            "ppqn",
            "ppqn",
            Gauge,
            "Ticks per quarter note.",
            U(u64::from(s.ppqn)),
        ),
        row(
            "count",
            "tick_count",
            Gauge,
            "Count of the last tick emitted in room main.",
            U(s.count),
        ),
        row(
            "uptime_s",
            "uptime_seconds",
            Gauge,
            "Seconds since start.",
            Rounded(s.uptime_s),
        ),
        row(
            "ticks_emitted",
            "ticks_emitted_total",
            Counter,
            "Ticks emitted by the timing thread.",
            U(st.ticks_emitted),
        ),
        row(
            "late_ticks",
            "late_ticks_total",
            Counter,
            "Ticks emitted more than 1 ms after their deadline.",
            U(st.late_ticks),
        ),
        row(
            "dropped_ticks",
            "dropped_ticks_total",
            Counter,
            "Ticks no client got: the event loop stalled, or the timing thread fell behind.",
            U(s.dropped_ticks),
        ),
        row(
            "skipped_ticks",
            "skipped_ticks_total",
            Counter,
            "Ticks the timing thread skipped after falling behind, rather than send them at once.",
            U(s.skipped_ticks),
        ),
        row(
            "messages_sent",
            "messages_sent_total",
            Counter,
            "Frames fully written to client sockets.",
            U(st.messages_sent),
        ),
        row(
            "connections_accepted",
            "connections_accepted_total",
            Counter,
            "TCP connections accepted.",
            U(st.connections_accepted),
        ),
        row(
            "client_errors",
            "client_errors_total",
            Counter,
            "Client messages answered with an error event.",
            U(st.client_errors),
        ),
        row(
            "tempo_changes",
            "tempo_changes_total",
            Counter,
            "Tempo changes applied.",
            U(st.tempo_changes),
        ),
        row(
            "transport_changes",
            "transport_changes_total",
            Counter,
            "Transport starts and stops applied.",
            U(st.transport_changes),
        ),
        Metric {
            json: None,
            prom: Some("playing"),
            kind: Gauge,
            help: "1 while the transport of room main plays (ticks are sent), 0 while stopped. (In /stats: transport.state.)",
            prom_divisor: 1.0,
            reading: Reading::One(Bool(s.transport == TransportState::Playing.label())),
        },
        Metric {
            json: Some("transport.state"),
            prom: None,
            kind: Gauge,
            help: "The transport state of room main for the next tick. (In /metrics: playing.)",
            prom_divisor: 1.0,
            reading: Reading::One(Text(s.transport.to_string())),
        },
        Metric {
            json: Some("transport.count"),
            prom: Some("transport_count"),
            kind: Gauge,
            help: "The tick the latest transport change of room main holds from.",
            prom_divisor: 1.0,
            reading: Reading::One(U(s.transport_count)),
        },
        latency(
            "tick_lateness_us",
            "tick_lateness_seconds",
            "Tick emission minus its deadline.",
            st.lateness.summary(),
        ),
        latency(
            "fanout_us",
            "fanout_latency_seconds",
            "Tick deadline to the last byte handed to the kernel.",
            st.fanout.summary(),
        ),
        latency(
            "handoff_us",
            "handoff_latency_seconds",
            "Tick emission to the event loop taking it from the ring.",
            st.handoff.summary(),
        ),
        row(
            "healthy",
            "healthy",
            Gauge,
            "1 unless the server is degraded (see /healthz).",
            Bool(st.degraded(s.silent_for).is_none()),
        ),
        Metric {
            json: Some("version"),
            prom: None,
            kind: Gauge,
            help: "The server's version (text).",
            prom_divisor: 1.0,
            reading: Reading::One(Text(env!("CARGO_PKG_VERSION").into())),
        },
    ];
    match s.cluster {
        None => t.push(Metric {
            json: Some("cluster"),
            prom: None,
            kind: Gauge,
            help: "null without --cluster.",
            prom_divisor: 1.0,
            reading: Reading::Null,
        }),
        Some(c) => {
            t.push(row(
                "cluster.connected",
                "cluster_connected",
                Gauge,
                "1 while the cluster's Redis answers and takes writes.",
                Bool(c.connected),
            ));
            t.push(Metric {
                json: Some("cluster.error"),
                prom: None,
                kind: Gauge,
                help: "What is wrong with the cluster's Redis, if anything, as text. (In /metrics: cluster_error.)",
                prom_divisor: 1.0,
                reading: Reading::One(
                    c.fault
                        .map_or(Scalar::Missing, |f| Scalar::Text(f.label().into())),
                ),
            });
            let mut errors = labelled(
                "cluster.error",
                "cluster_error",
                Gauge,
                "1 for what is wrong with the cluster's Redis, if anything. (In /stats: cluster.error.)",
                "error",
                ClusterFault::ALL
                    .iter()
                    .map(|f| (f.label().to_string(), Bool(c.fault == Some(*f))))
                    .collect(),
            );
            errors.json = None;
            t.push(errors);
            t.push(row(
                "cluster.timelines_refused",
                "cluster_timelines_refused_total",
                Counter,
                "Timelines read from Redis that were refused (out of limits, corrupt) and repaired.",
                U(c.timelines_refused),
            ));
            t.push(row(
                "cluster.peers",
                "cluster_peers",
                Gauge,
                "Instances with a recent heartbeat, this one included.",
                U(c.peers),
            ));
            t.push(row(
                "cluster.version",
                "cluster_timeline_version",
                Gauge,
                "Version of the shared timeline followed.",
                U(c.version),
            ));
            let mut lead = row(
                "cluster.last_lead_ms",
                "cluster_last_lead_seconds",
                Gauge,
                "For the last shared change: its effective instant minus when this instance heard of it.",
                c.last_lead_ms.map_or(Scalar::Missing, Scalar::F),
            );
            lead.prom_divisor = 1000.0;
            t.push(lead);
        }
    }
    t.push(labelled(
        "clients_by_protocol.*",
        "protocol_clients",
        Gauge,
        "Connected clients, by protocol (ws, socketio_ws, socketio_polling).",
        "protocol",
        ClientKind::ALL
            .iter()
            .map(|k| (k.label().to_string(), U(st.clients_of(*k) as u64)))
            .collect(),
    ));
    t.push(labelled(
        "closed.*",
        "connections_closed_total",
        Counter,
        "WebSocket connections closed, by reason.",
        "reason",
        CloseReason::ALL
            .iter()
            .map(|r| (r.label().to_string(), U(st.closed(*r))))
            .collect(),
    ));
    t.push(labelled(
        "refused.*",
        "connections_refused_total",
        Counter,
        "Connections refused before becoming clients, by reason.",
        "reason",
        RefuseReason::ALL
            .iter()
            .map(|r| (r.label().to_string(), U(st.refused(*r))))
            .collect(),
    ));
    t.push(labelled(
        "http_responses.*",
        "http_responses_total",
        Counter,
        "HTTP responses, by status.",
        "status",
        st.http_responses()
            .iter()
            .map(|(status, n)| (status.to_string(), U(*n)))
            .collect(),
    ));
    t.push(row(
        "shard_count",
        "shards",
        Gauge,
        "Fan-out shards (event loops), --threads.",
        U(s.shards.len() as u64),
    ));
    t.push(labelled(
        "shards.*.clients",
        "shard_clients",
        Gauge,
        "Clients on each fan-out shard.",
        "shard",
        s.shards
            .iter()
            .enumerate()
            .map(|(i, f)| (i.to_string(), U(f.clients as u64)))
            .collect(),
    ));
    t.push(Metric {
        prom_divisor: 1e6,
        ..labelled(
            "shards.*.fanout_p99_us",
            "shard_fanout_p99_seconds",
            Gauge,
            "Each shard's fan-out p99, from a tick's deadline to its last byte written.",
            "shard",
            s.shards
                .iter()
                .enumerate()
                .map(|(i, f)| (i.to_string(), Scalar::F(f.fanout_p99_ns as f64 / 1e3)))
                .collect(),
        )
    });
    t.push(row(
        "room_count",
        "rooms",
        Gauge,
        "Rooms open, main included.",
        U(rooms.len() as u64),
    ));
    t.extend(room_rows(rooms, metrics_rooms));
    t
}

/// The per-room rows: every room in `/stats`, the `limit` with the most clients in
/// `/metrics` (ties by name, so the set is stable).
fn room_rows(rooms: &[RoomReport], limit: usize) -> Vec<Metric> {
    use Kind::{Counter, Gauge};
    let mut order: Vec<&RoomReport> = rooms.iter().collect();
    order.sort_by(|a, b| b.clients.cmp(&a.clients).then_with(|| a.name.cmp(&b.name)));
    let per_room = |f: &dyn Fn(&RoomReport) -> Scalar| -> Vec<(String, Scalar)> {
        order.iter().map(|r| (r.name.to_string(), f(r))).collect()
    };
    let mut rows = vec![
        labelled(
            "rooms.*.clients",
            "room_clients",
            Gauge,
            "Clients in each room.",
            "room",
            per_room(&|r| Scalar::U(r.clients as u64)),
        ),
        labelled(
            "rooms.*.bpm",
            "room_bpm",
            Gauge,
            "Each room's tempo in beats per minute.",
            "room",
            per_room(&|r| Scalar::Bpm(r.bpm)),
        ),
        labelled(
            "rooms.*.count",
            "room_tick_count",
            Gauge,
            "Count of each room's last tick.",
            "room",
            per_room(&|r| Scalar::U(r.count)),
        ),
        labelled(
            "rooms.*.transport.state",
            "room_playing",
            Gauge,
            "Each room's transport for the next tick: playing or stopped (in /metrics, 1 or 0).",
            "room",
            per_room(&|r| Scalar::Text(r.transport.label().into())),
        ),
        labelled(
            "rooms.*.transport.count",
            "room_transport_count",
            Gauge,
            "The tick each room's latest transport change holds from.",
            "room",
            per_room(&|r| Scalar::U(r.transport_count)),
        ),
        labelled(
            "rooms.*.lead_ms",
            "room_change_lead_seconds",
            Gauge,
            "How far ahead a change in each room is scheduled now (from its members' round trips).",
            "room",
            per_room(&|r| Scalar::F(r.lead_ns as f64 / 1e6)),
        ),
        labelled(
            "rooms.*.tempo_changes",
            "room_tempo_changes_total",
            Counter,
            "Tempo changes announced in each room.",
            "room",
            per_room(&|r| Scalar::U(r.tempo_changes)),
        ),
        labelled(
            "rooms.*.transport_changes",
            "room_transport_changes_total",
            Counter,
            "Starts and stops announced in each room.",
            "room",
            per_room(&|r| Scalar::U(r.transport_changes)),
        ),
    ];
    for m in &mut rows {
        if let Reading::Labelled {
            prom_rows,
            rows: values,
            ..
        } = &mut m.reading
        {
            *prom_rows = limit.min(values.len());
        }
        if m.prom == Some("room_change_lead_seconds") {
            m.prom_divisor = 1000.0;
        }
    }
    rows
}

/// Sets `value` at a dotted `path` in `root`, making objects on the way.
fn put(root: &mut Map<String, Value>, path: &str, value: Value) {
    let mut parts = path.split('.').peekable();
    let mut here = root;
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            here.insert(part.to_string(), value);
            return;
        }
        let next = here
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if !next.is_object() {
            *next = Value::Object(Map::new());
        }
        let Value::Object(map) = next else { return };
        here = map;
    }
}

fn micros(p: &Percentiles) -> Value {
    let us = |ns: u64| ns as f64 / 1000.0;
    json!({
        "p50": us(p.p50),
        "p99": us(p.p99),
        "p999": us(p.p999),
        "max": us(p.max),
        "samples": p.count,
    })
}

/// The `/stats` document.
pub fn render_json(table: &[Metric]) -> String {
    let mut root = Map::new();
    for m in table {
        let Some(path) = m.json else { continue };
        match &m.reading {
            Reading::One(v) => put(&mut root, path, v.json()),
            Reading::Null => put(&mut root, path, Value::Null),
            Reading::Latency(p) => put(&mut root, path, micros(p)),
            Reading::Labelled { rows, .. } => {
                if rows.is_empty() {
                    // An empty family is still an object (no HTTP response yet, say).
                    let parent = path.split(".*").next().unwrap_or(path);
                    put(&mut root, parent, Value::Object(Map::new()));
                }
                for (key, v) in rows {
                    put(&mut root, &path.replace('*', key), v.json());
                }
            }
        }
    }
    Value::Object(root).to_string()
}

/// A Prometheus label value: `\`, `"` and newlines escaped (room names never need it; the
/// rule is the format's).
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The `/metrics` document, Prometheus text exposition format 0.0.4.
pub fn render_prometheus(table: &[Metric]) -> String {
    let mut out = String::with_capacity(8192);
    for m in table {
        let Some(name) = m.prom else { continue };
        let header = |out: &mut String| {
            let _ = writeln!(
                out,
                "# HELP conductor_{name} {}\n# TYPE conductor_{name} {}",
                m.help,
                m.kind.label()
            );
        };
        match &m.reading {
            Reading::One(v) => {
                if let Some(v) = v.prometheus(m.prom_divisor) {
                    header(&mut out);
                    let _ = writeln!(out, "conductor_{name} {v}");
                }
            }
            Reading::Null => {}
            Reading::Latency(p) => {
                header(&mut out);
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
            Reading::Labelled {
                label,
                rows,
                prom_rows,
            } => {
                header(&mut out);
                for (key, v) in rows.iter().take(*prom_rows) {
                    // A text value in a labelled gauge is a state: 1 when playing.
                    let value = match v {
                        Scalar::Text(t) => {
                            Some(u8::from(t == TransportState::Playing.label()).to_string())
                        }
                        v => v.prometheus(m.prom_divisor),
                    };
                    if let Some(value) = value {
                        let _ = writeln!(
                            out,
                            "conductor_{name}{{{label}=\"{}\"}} {value}",
                            label_value(key)
                        );
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::ClusterStatus;
    use crate::room::RoomName;
    use crate::stats::{self, ServerStats};

    fn stats() -> ServerStats {
        let mut st = ServerStats::default();
        st.record_tick(20_000);
        st.record_tick(2_000_000);
        st.fanout.record(50_000);
        st.handoff.record(7_000);
        st.client_opened(ClientKind::SocketIoPolling);
        st.client_opened(ClientKind::Ws);
        st.client_opened(ClientKind::SocketIoPolling);
        st.client_moved(ClientKind::SocketIoPolling, ClientKind::SocketIoWs);
        st.client_closed(ClientKind::Ws, CloseReason::SlowConsumer);
        st.count_http(404);
        st.count_http(200);
        st.count_http(404);
        st.count_refused(RefuseReason::BadUpgrade);
        st.tempo_changes = 4;
        st
    }

    fn snapshot<'a>(st: &'a ServerStats, cluster: Option<ClusterStatus>) -> Snapshot<'a> {
        Snapshot {
            bpm: Bpm::from_f64(92.5).unwrap(),
            ppqn: 4,
            clients: 3,
            count: 41,
            transport: "playing",
            transport_count: 16,
            uptime_s: 5.2504,
            dropped_ticks: 2,
            skipped_ticks: 1,
            silent_for: None,
            cluster,
            stats: st,
            shards: &[],
        }
    }

    fn report(name: &str, clients: usize) -> RoomReport {
        RoomReport {
            name: RoomName::parse(name).unwrap(),
            bpm: Bpm::whole(100),
            clients,
            count: 7,
            transport: TransportState::Stopped,
            transport_count: 32,
            lead_ns: 152_500_000,
            tempo_changes: 1,
            transport_changes: 2,
        }
    }

    /// Everything `stats_json` and `metrics_text` say today, the table says too: every
    /// `/stats` field with the same value, every `/metrics` sample line unchanged.
    #[test]
    fn the_table_keeps_every_name_and_value_of_both_documents() {
        let st = stats();
        let clusters = [
            None,
            Some(ClusterStatus {
                connected: false,
                fault: Some(ClusterFault::OutOfMemory),
                peers: 2,
                version: 9,
                last_lead_ms: Some(240.5),
                timelines_refused: 3,
            }),
        ];
        for cluster in clusters {
            let s = snapshot(&st, cluster);
            let t = table(&s, &[report("main", 3)], 100);
            let old: Value = serde_json::from_str(&stats::stats_json(&s)).unwrap();
            let new: Value = serde_json::from_str(&render_json(&t)).unwrap();
            let Value::Object(old) = old else { panic!() };
            for (key, value) in &old {
                assert_eq!(&new[key], value, "/stats field {key}");
            }
            let text = render_prometheus(&t);
            // Samples and types; help texts may say more now (which room).
            for line in stats::metrics_text(&s)
                .lines()
                .filter(|l| !l.starts_with("# HELP"))
            {
                assert!(
                    text.lines().any(|l| l == line),
                    "/metrics line {line:?} missing from\n{text}"
                );
            }
        }
    }

    #[test]
    fn both_documents_carry_the_same_figures() {
        let st = stats();
        let s = snapshot(&st, None);
        let t = table(&s, &[report("main", 3), report("band", 9)], 100);
        let v: Value = serde_json::from_str(&render_json(&t)).unwrap();
        let text = render_prometheus(&t);
        // What drifted before: handoff is in both now, and HTTP statuses are in /stats.
        assert!(v["handoff_us"]["p50"].is_number());
        assert!(text.contains("conductor_handoff_latency_seconds{quantile=\"0.5\"}"));
        assert_eq!(v["http_responses"]["404"], 2);
        assert_eq!(v["room_count"], 2);
        assert!(text.contains("conductor_rooms 2\n"));
        assert_eq!(v["rooms"]["band"]["clients"], 9);
        assert_eq!(v["rooms"]["band"]["bpm"], 100);
        assert_eq!(v["rooms"]["band"]["transport"]["state"], "stopped");
        assert_eq!(v["rooms"]["band"]["lead_ms"], 152.5);
        assert!(text.contains("conductor_room_clients{room=\"band\"} 9\n"));
        assert!(text.contains("conductor_room_playing{room=\"band\"} 0\n"));
        assert!(text.contains("conductor_room_change_lead_seconds{room=\"band\"} 0.1525\n"));
        assert!(text.contains("conductor_room_transport_count{room=\"main\"} 32\n"));
        // Every row is in both documents but for the few that say why not.
        for m in &t {
            if m.json.is_none() || m.prom.is_none() {
                assert!(
                    m.help.contains("In /") || m.help.contains("text") || m.help.contains("null"),
                    "{m:?}"
                );
            }
        }
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("conductor_"), "{line}");
            assert!(
                line.rsplit(' ').next().unwrap().parse::<f64>().is_ok(),
                "{line}"
            );
        }
    }

    #[test]
    fn metrics_label_the_busiest_rooms_and_stats_lists_them_all() {
        let st = stats();
        let s = snapshot(&st, None);
        let rooms = [
            report("main", 1),
            report("a", 5),
            report("b", 9),
            report("c", 5),
        ];
        let t = table(&s, &rooms, 2);
        let text = render_prometheus(&t);
        let labelled: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("conductor_room_clients{"))
            .collect();
        assert_eq!(
            labelled,
            [
                "conductor_room_clients{room=\"b\"} 9",
                "conductor_room_clients{room=\"a\"} 5"
            ]
        );
        let v: Value = serde_json::from_str(&render_json(&t)).unwrap();
        assert_eq!(v["rooms"].as_object().unwrap().len(), 4);
        // Totals stay unlabelled.
        assert!(text.contains("conductor_clients 3\n"));
    }
}
