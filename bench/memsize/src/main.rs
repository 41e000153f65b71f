//! conductor-memsize: where a connected client's user-space bytes go in the server.
//!
//! Two measurements, printed as one JSON document for `bench/memory`:
//!
//! * the inline sizes of the per-connection types (`std::mem::size_of`), the slab's slot
//!   included;
//! * the heap one connection holds at each step of its life, counted by a global allocator
//!   that wraps the system one: N real loopback connections are driven through the server's
//!   own [`Connection`] (accept, request head, upgrade, hello and timeline, ticks, a client
//!   ping and its pong, a server ping) and the live heap is read after each step. Requested
//!   bytes, the bytes glibc really reserved (`malloc_usable_size`), and chunks (usable + 8
//!   bytes of header, 32 at least) tell the allocator's share apart.
//!
//! Nothing here is the server's event loop: it uses the same types the loop uses, with the
//! same settings, so it counts what each connection costs, not what the loop shares.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use conductor::connection::{
    Connection, HeadRead, OutQueue, RateLimit, SioLink, StallWatch, State,
};
use conductor::protocol::{SharedFrame, text_frame};
use conductor::session::PollSession;
use mio::{Interest, Poll, Token};
use serde_json::{Value, json};
use slab::Slab;

/// Counts live heap: bytes asked for, bytes reserved, allocations.
struct Counting;

static REQUESTED: AtomicI64 = AtomicI64::new(0);
static USABLE: AtomicI64 = AtomicI64::new(0);
static CHUNKS: AtomicI64 = AtomicI64::new(0);
static LIVE: AtomicI64 = AtomicI64::new(0);
/// Live allocations by requested size, in 8-byte classes up to 4 KiB (the last: larger).
const CLASSES: usize = 513;
static BY_SIZE: [AtomicI64; CLASSES] = [const { AtomicI64::new(0) }; CLASSES];

fn class_of(size: usize) -> usize {
    size.div_ceil(8).min(CLASSES - 1)
}

/// glibc's chunk for a block of `usable` bytes: the usable part plus one 8-byte size field,
/// and never under the 32-byte minimum chunk.
fn chunk_of(usable: usize) -> i64 {
    (usable as i64 + 8).max(32)
}

fn account(ptr: *mut u8, size: usize, sign: i64) {
    if ptr.is_null() {
        return;
    }
    // SAFETY: `ptr` came from the system allocator (malloc family) and is live here.
    let usable = unsafe { libc::malloc_usable_size(ptr.cast()) };
    REQUESTED.fetch_add(sign * size as i64, Ordering::Relaxed);
    USABLE.fetch_add(sign * usable as i64, Ordering::Relaxed);
    CHUNKS.fetch_add(sign * chunk_of(usable), Ordering::Relaxed);
    LIVE.fetch_add(sign, Ordering::Relaxed);
    BY_SIZE[class_of(size)].fetch_add(sign, Ordering::Relaxed);
}

// SAFETY: every call is passed to `System` unchanged; the counting only reads the blocks.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.alloc(layout) };
        account(p, layout.size(), 1);
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.alloc_zeroed(layout) };
        account(p, layout.size(), 1);
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        account(ptr, layout.size(), -1);
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        account(ptr, layout.size(), -1);
        // SAFETY: forwarded as is.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if p.is_null() {
            account(ptr, layout.size(), 1);
        } else {
            account(p, new_size, 1);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[derive(Clone, Copy)]
struct Heap {
    requested: i64,
    usable: i64,
    chunks: i64,
    live: i64,
    by_size: [i64; CLASSES],
}

fn heap() -> Heap {
    let mut by_size = [0; CLASSES];
    for (c, v) in by_size.iter_mut().zip(&BY_SIZE) {
        *c = v.load(Ordering::Relaxed);
    }
    Heap {
        requested: REQUESTED.load(Ordering::Relaxed),
        usable: USABLE.load(Ordering::Relaxed),
        chunks: CHUNKS.load(Ordering::Relaxed),
        live: LIVE.load(Ordering::Relaxed),
        by_size,
    }
}

/// The heap held per connection since `base`, with the live allocations by size (those that
/// at least one connection in two holds).
fn per_conn(base: Heap, n: usize) -> Value {
    let h = heap();
    let per = |a: i64, b: i64| (a - b) as f64 / n as f64;
    let mut sizes = serde_json::Map::new();
    for c in 0..CLASSES {
        let each = per(h.by_size[c], base.by_size[c]);
        if each.abs() >= 0.5 {
            let name = if c == CLASSES - 1 {
                "over 4096".to_string()
            } else {
                format!("{}..{}", (c * 8).saturating_sub(7).max(1), c * 8)
            };
            sizes.insert(name, json!((each * 1000.0).round() / 1000.0));
        }
    }
    json!({
        "requested_bytes": per(h.requested, base.requested),
        "usable_bytes": per(h.usable, base.usable),
        "chunk_bytes": per(h.chunks, base.chunks),
        "allocations": per(h.live, base.live),
        "allocations_by_size": sizes,
    })
}

/// The slab's slot: `slab::Entry<T>` is this enum (private in the crate).
#[allow(dead_code)]
enum SlabEntry<T> {
    Vacant(usize),
    Occupied(T),
}

fn sizes() -> Value {
    use std::mem::size_of;
    json!({
        "Connection": size_of::<Connection>(),
        "slab_slot_Connection": size_of::<SlabEntry<Connection>>(),
        "State": size_of::<State>(),
        "OutQueue": size_of::<OutQueue>(),
        "VecDeque_slot_SharedFrame": size_of::<SharedFrame>(),
        "RateLimit": size_of::<RateLimit>(),
        "StallWatch": size_of::<StallWatch>(),
        "Option_SioLink": size_of::<Option<SioLink>>(),
        "SocketAddr": size_of::<SocketAddr>(),
        "Instant": size_of::<Instant>(),
        "Option_Instant": size_of::<Option<Instant>>(),
        "mio_TcpStream": size_of::<mio::net::TcpStream>(),
        "WebSocketContext": size_of::<tungstenite::protocol::WebSocketContext>(),
        "WebSocketConfig": size_of::<tungstenite::protocol::WebSocketConfig>(),
        "tungstenite_Frame": size_of::<tungstenite::protocol::frame::Frame>(),
        "PollSession": size_of::<PollSession>(),
        "slab_slot_PollSession": size_of::<SlabEntry<PollSession>>(),
    })
}

const REQUEST: &[u8] = b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:3000\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Version: 13\r\nUser-Agent: conductor-memsize\r\n\r\n";

/// A masked client frame (opcode, payload) as a browser sends it.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [1u8, 2, 3, 4];
    let mut f = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Reads and drops whatever the server side wrote, so no send buffer fills.
fn drain(clients: &mut [TcpStream]) {
    let mut buf = [0u8; 4096];
    for c in clients.iter_mut() {
        while let Ok(n) = c.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
    }
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let sizes = sizes();

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let addr = listener.local_addr().expect("local address");
    let poll = Poll::new().expect("epoll");
    let mut clients: Vec<TcpStream> = Vec::with_capacity(n);
    let mut keys: Vec<usize> = Vec::with_capacity(n);
    // Shared frames are encoded once per broadcast, not per connection: made before counting.
    let hello: SharedFrame = text_frame(&"h".repeat(230));
    let timeline: SharedFrame = text_frame(&"t".repeat(330));
    let tick: SharedFrame = text_frame(&"k".repeat(98));
    let ping = client_frame(0x9, b"");
    let mut steps = serde_json::Map::new();

    let base = heap();
    let mut conns: Slab<Connection> = Slab::new();
    let now = Instant::now();
    for _ in 0..n {
        let client = TcpStream::connect(addr).expect("connect");
        let (sock, peer) = listener.accept().expect("accept");
        sock.set_nonblocking(true).expect("nonblocking");
        client.set_nonblocking(true).expect("nonblocking");
        let mut sock = mio::net::TcpStream::from_std(sock);
        let key = conns.vacant_key();
        poll.registry()
            .register(
                &mut sock,
                Token(key),
                Interest::READABLE | Interest::WRITABLE,
            )
            .expect("register");
        keys.push(conns.insert(Connection::new(sock, peer, now, RateLimit::new(20))));
        clients.push(client);
    }
    steps.insert(
        "1. accepted (slab slot, Http state)".into(),
        per_conn(base, n),
    );

    for c in clients.iter_mut() {
        c.write_all(REQUEST).expect("send the request");
    }
    std::thread::sleep(Duration::from_millis(50));
    let mut requests = Vec::with_capacity(n);
    for &key in &keys {
        match conns[key].read_head() {
            HeadRead::Request(req) => requests.push(req),
            _ => panic!("the request head did not arrive"),
        }
    }
    steps.insert(
        "2. request head read (+ parsed Request)".into(),
        per_conn(base, n),
    );

    for (&key, req) in keys.iter().zip(&requests) {
        let accept = conductor::http::check_upgrade(req).expect("a valid upgrade");
        let conn = &mut conns[key];
        conn.upgrade(
            conductor::http::switching_protocols(&accept),
            req.head_len,
            64 * 1024,
        );
        conn.send(&hello, 64);
        conn.send(&timeline, 64);
        conn.flush();
    }
    drop(requests);
    drain(&mut clients);
    steps.insert(
        "3. upgraded: 101, hello, timeline written".into(),
        per_conn(base, n),
    );

    for _ in 0..3 {
        for &key in &keys {
            conns[key].send(&tick, 64);
            conns[key].flush();
        }
        drain(&mut clients);
    }
    steps.insert("4. 3 ticks fanned out".into(), per_conn(base, n));

    for c in clients.iter_mut() {
        c.write_all(&ping).expect("send a ping");
    }
    std::thread::sleep(Duration::from_millis(50));
    for &key in &keys {
        let conn = &mut conns[key];
        while let conductor::connection::WsRead::Message(_) = conn.read_ws(Instant::now(), 64) {}
        conn.flush();
    }
    drain(&mut clients);
    steps.insert(
        "5. client ping read, pong written".into(),
        per_conn(base, n),
    );

    let later = Instant::now() + Duration::from_secs(30);
    for &key in &keys {
        let conn = &mut conns[key];
        conn.keep_alive(later, Duration::from_secs(5), Duration::from_secs(60));
        conn.flush();
    }
    drain(&mut clients);
    steps.insert(
        "6. server ping written (steady state)".into(),
        per_conn(base, n),
    );

    // What the read buffer, the largest single allocation, would cost at other sizes: the
    // context alone, as `Connection::upgrade` makes it but for `read_buffer_size`.
    let mut read_buffer = serde_json::Map::new();
    for size in [1024usize, 512, 256, 128, 64, 32] {
        let config = tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(size)
            .write_buffer_size(0);
        let before = heap();
        let contexts: Vec<_> = (0..n)
            .map(|_| {
                Box::new(
                    tungstenite::protocol::WebSocketContext::from_partially_read(
                        Vec::new(),
                        tungstenite::protocol::Role::Server,
                        Some(config),
                    ),
                )
            })
            .collect();
        let mut each = per_conn(before, n);
        // The Vec holding the boxes is this measurement's, not a connection's.
        if let Some(obj) = each.as_object_mut() {
            let own = (n * 8) as f64 / n as f64;
            if let Some(v) = obj.get("requested_bytes").and_then(Value::as_f64) {
                obj.insert("requested_bytes".into(), json!(v - own));
            }
            obj.remove("allocations_by_size");
            obj.remove("allocations");
            obj.remove("usable_bytes");
            obj.remove("chunk_bytes");
        }
        read_buffer.insert(format!("read_buffer_size {size}"), each);
        drop(contexts);
    }

    let open = keys.iter().filter(|&&k| conns[k].is_open()).count();
    let doc = json!({
        "connections": n,
        "open_at_end": open,
        "slab_capacity": conns.capacity(),
        "sizes": sizes,
        "heap_per_connection": steps,
        "boxed_context_by_read_buffer_size": read_buffer,
        "malloc": "glibc (malloc_usable_size; a chunk is usable + 8 bytes, 32 at least)",
    });
    println!("{doc:#}");
    // Exit with every connection still live: under heaptrack, its "leaks" are then exactly
    // the steady-state heap of the connections, by allocation site.
    let _ = std::io::stdout().flush();
    std::process::exit(0);
}
