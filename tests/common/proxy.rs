//! A TCP proxy the test can cut, to simulate a dependency outage (connections refused, and
//! connections in flight reset) without touching the shared server.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Proxy {
    pub addr: String,
    up: Arc<AtomicBool>,
    lose_responses: Arc<AtomicBool>,
    hold_requests_ms: Arc<AtomicU64>,
    hold_next: HoldNext,
    lose_answers_to: Arc<Mutex<Option<Vec<u8>>>>,
    /// Kafka proxies: an API key (-1: none) whose requests' answers are dropped
    /// ([`Proxy::drop_kafka_answers`]).
    drop_kafka_api: Arc<AtomicI32>,
    live: Arc<Mutex<Vec<TcpStream>>>,
    /// After losing an answer to a `lose_answers_to` request, cut (as [`Proxy::cut`]).
    cut_after_loss: Arc<AtomicBool>,
}

/// The next request whose first bytes contain the pattern is held this long (once); the number
/// of held requests forwarded so far.
type HoldNext = Arc<(Mutex<Option<(Vec<u8>, Duration)>>, AtomicU64)>;

impl Proxy {
    /// Listens on 127.0.0.1:<free port> and forwards to `upstream` (host:port) while up.
    pub fn start(upstream: &str) -> Proxy {
        Proxy::start_with(upstream, false)
    }

    /// Like [`Proxy::start`], for Kafka clients and a Kafka broker: it reads their requests and
    /// responses as Kafka frames, so that [`Proxy::drop_kafka_answers`] can drop the answers to
    /// one API's requests and forward all others.
    pub fn start_kafka(upstream: &str) -> Proxy {
        Proxy::start_with(upstream, true)
    }

    fn start_with(upstream: &str, kafka: bool) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let up = Arc::new(AtomicBool::new(true));
        let lose_responses = Arc::new(AtomicBool::new(false));
        let hold_requests_ms = Arc::new(AtomicU64::new(0));
        let live: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (up2, lose2, live2, upstream) = (up.clone(), lose_responses.clone(), live.clone(), upstream.to_string());
        let hold2 = hold_requests_ms.clone();
        let hold_next: HoldNext = Arc::default();
        let next2 = hold_next.clone();
        let lose_answers_to: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
        let answers2 = lose_answers_to.clone();
        let cut_after_loss = Arc::new(AtomicBool::new(false));
        let cut2 = cut_after_loss.clone();
        let drop_kafka_api = Arc::new(AtomicI32::new(-1));
        let api2 = drop_kafka_api.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if !up2.load(Ordering::SeqCst) {
                    drop(client); // refused, as far as the client can tell
                    continue;
                }
                let Ok(server) = TcpStream::connect(&upstream) else { continue };
                {
                    let mut l = live2.lock().unwrap();
                    l.push(client.try_clone().unwrap());
                    l.push(server.try_clone().unwrap());
                }
                if kafka {
                    let dropped: Arc<Mutex<HashSet<i32>>> = Arc::default();
                    let (c2, s2, d2, a2) =
                        (client.try_clone().unwrap(), server.try_clone().unwrap(), dropped.clone(), api2.clone());
                    std::thread::spawn(move || kafka_requests(c2, s2, &a2, &d2));
                    std::thread::spawn(move || kafka_responses(server, client, &dropped));
                    continue;
                }
                // This connection's request matched `lose_answers_to`: lose its answer.
                let lose_this = Arc::new(AtomicBool::new(false));
                let pairs = [
                    (
                        client.try_clone().unwrap(),
                        server.try_clone().unwrap(),
                        None,
                        Some((hold2.clone(), next2.clone(), answers2.clone(), lose_this.clone())),
                    ),
                    (server, client, Some((lose2.clone(), lose_this, cut2.clone(), up2.clone(), live2.clone())), None),
                ];
                for (mut from, mut to, lose, hold) in pairs {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 64 * 1024];
                        let mut last = Instant::now() - Duration::from_secs(1);
                        loop {
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    // A request's first bytes (after a quiet moment) are held.
                                    if let Some((h, next, answers, lose_this)) = &hold {
                                        if let Some(pat) = answers.lock().unwrap().as_ref() {
                                            if buf[..n].windows(pat.len()).any(|w| w == &pat[..]) {
                                                lose_this.store(true, Ordering::SeqCst);
                                            }
                                        }
                                        let once = {
                                            let mut g = next.0.lock().unwrap();
                                            let hit = g.as_ref().is_some_and(|(pat, _)| {
                                                buf[..n].windows(pat.len()).any(|w| w == &pat[..])
                                            });
                                            if hit {
                                                g.take().map(|(_, d)| d)
                                            } else {
                                                None
                                            }
                                        };
                                        if let Some(d) = once {
                                            std::thread::sleep(d);
                                            next.1.fetch_add(1, Ordering::SeqCst);
                                        }
                                        let ms = h.load(Ordering::SeqCst);
                                        if ms > 0 && last.elapsed() > Duration::from_millis(50) {
                                            std::thread::sleep(Duration::from_millis(ms));
                                        }
                                        last = Instant::now();
                                    }
                                    // A response to lose: the server did the work, the client
                                    // only sees its connection die.
                                    if lose.as_ref().is_some_and(|(all, this, ..)| {
                                        all.load(Ordering::SeqCst) || this.load(Ordering::SeqCst)
                                    }) {
                                        if let Some((_, this, cut, up, live)) = &lose {
                                            if this.load(Ordering::SeqCst) && cut.load(Ordering::SeqCst) {
                                                up.store(false, Ordering::SeqCst);
                                                for s in live.lock().unwrap().drain(..) {
                                                    let _ = s.shutdown(Shutdown::Both);
                                                }
                                            }
                                        }
                                        let _ = to.shutdown(Shutdown::Both);
                                        let _ = from.shutdown(Shutdown::Both);
                                        break;
                                    }
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = to.shutdown(Shutdown::Write);
                    });
                }
            }
        });
        Proxy {
            addr,
            up,
            lose_responses,
            hold_requests_ms,
            hold_next,
            lose_answers_to,
            drop_kafka_api,
            live,
            cut_after_loss,
        }
    }

    /// A proxy of [`Proxy::start_kafka`]: the answer to every request of API `key` (e.g. 9,
    /// OffsetFetch) sent from now on never arrives (the connection stays up, other answers go
    /// through), until [`Proxy::forward_kafka_answers`].
    pub fn drop_kafka_answers(&self, key: i16) {
        self.drop_kafka_api.store(i32::from(key), Ordering::SeqCst);
    }

    /// Ends [`Proxy::drop_kafka_answers`] for requests sent from now on.
    pub fn forward_kafka_answers(&self) {
        self.drop_kafka_api.store(-1, Ordering::SeqCst);
    }

    /// A proxy in front of the test ClickHouse server (`common::clickhouse_url`).
    pub fn to_clickhouse() -> Proxy {
        Proxy::start(super::clickhouse_url().trim_start_matches("http://").trim_end_matches('/'))
    }

    /// The outage starts: new connections are dropped, open ones are reset.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for s in self.live.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
        self.lose_responses.store(false, Ordering::SeqCst);
        *self.lose_answers_to.lock().unwrap() = None;
        self.hold_requests_ms.store(0, Ordering::SeqCst);
        self.cut_after_loss.store(false, Ordering::SeqCst);
    }

    /// Whether the proxy forwards new connections (false after [`Proxy::cut`]).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    /// Like [`Proxy::lose_answers_to`], and the first such answer lost cuts the proxy: the
    /// client's request took effect, and nothing it sends afterwards reaches the server.
    pub fn lose_answer_then_cut(&self, pattern: &[u8]) {
        self.cut_after_loss.store(true, Ordering::SeqCst);
        self.lose_answers_to(pattern);
    }

    /// The next request whose first bytes contain `pattern` reaches the server `d` late, the
    /// others are not held: as a request parked in a congested link or an L7 proxy that still
    /// forwards it after the client gave up.
    pub fn hold_next_matching(&self, pattern: &[u8], d: Duration) {
        *self.hold_next.0.lock().unwrap() = Some((pattern.to_vec(), d));
    }

    /// How many requests [`Proxy::hold_next_matching`] held and then forwarded.
    pub fn held_and_forwarded(&self) -> u64 {
        self.hold_next.1.load(Ordering::SeqCst)
    }

    /// Every request reaches the server `d` late (its first bytes are held), as on a slow or
    /// congested link: an INSERT lands `d` after the client sent it.
    pub fn hold_requests(&self, d: Duration) {
        self.hold_requests_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// Like [`Proxy::lose_responses`], only for requests whose first bytes contain `pattern`
    /// (the connection is reset when their answer arrives; the server did the work).
    pub fn lose_answers_to(&self, pattern: &[u8]) {
        *self.lose_answers_to.lock().unwrap() = Some(pattern.to_vec());
    }

    /// Requests still reach the server, but every response is lost (the connection is reset as
    /// it arrives): the client cannot know whether its request took effect.
    pub fn lose_responses(&self) {
        self.lose_responses.store(true, Ordering::SeqCst);
    }
}

/// Forwards a Kafka client's requests to the broker, noting the correlation ids of those of API
/// `drop_api` (when set) in `dropped`. A request is a 4-byte big-endian size, then a header of a
/// 2-byte API key, a 2-byte version and a 4-byte correlation id (Kafka protocol guide).
fn kafka_requests(mut from: TcpStream, mut to: TcpStream, drop_api: &AtomicI32, dropped: &Mutex<HashSet<i32>>) {
    let mut buf = [0u8; 64 * 1024];
    let (mut remaining, mut header) = (0usize, Vec::with_capacity(12));
    while let Ok(n @ 1..) = from.read(&mut buf) {
        let mut i = 0;
        while i < n {
            if remaining > 0 {
                let take = remaining.min(n - i);
                (remaining, i) = (remaining - take, i + take);
                continue;
            }
            let take = (12 - header.len()).min(n - i);
            header.extend_from_slice(&buf[i..i + take]);
            i += take;
            if header.len() == 12 {
                let size = u32::from_be_bytes(header[..4].try_into().unwrap()) as usize;
                let api = i16::from_be_bytes(header[4..6].try_into().unwrap());
                if i32::from(api) == drop_api.load(Ordering::SeqCst) {
                    dropped.lock().unwrap().insert(i32::from_be_bytes(header[8..12].try_into().unwrap()));
                }
                remaining = (size + 4).saturating_sub(12);
                header.clear();
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Forwards the broker's responses to the client, frame by frame (a 4-byte size, then the
/// correlation id), except those answering a request noted in `dropped`.
fn kafka_responses(mut from: TcpStream, mut to: TcpStream, dropped: &Mutex<HashSet<i32>>) {
    let mut buf = [0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    while let Ok(n @ 1..) = from.read(&mut buf) {
        pending.extend_from_slice(&buf[..n]);
        let mut out: Vec<u8> = Vec::new();
        let mut at = 0;
        while pending.len() - at >= 8 {
            let size = u32::from_be_bytes(pending[at..at + 4].try_into().unwrap()) as usize;
            if pending.len() - at < 4 + size {
                break;
            }
            let corr = i32::from_be_bytes(pending[at + 4..at + 8].try_into().unwrap());
            if !dropped.lock().unwrap().remove(&corr) {
                out.extend_from_slice(&pending[at..at + 4 + size]);
            }
            at += 4 + size;
        }
        pending.drain(..at);
        if to.write_all(&out).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
