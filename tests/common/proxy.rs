//! A TCP proxy the test can cut, to simulate a dependency outage (connections refused, and
//! connections in flight reset) without touching the shared server.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Proxy {
    pub addr: String,
    up: Arc<AtomicBool>,
    lose_responses: Arc<AtomicBool>,
    hold_requests_ms: Arc<AtomicU64>,
    hold_next: HoldNext,
    lose_answers_to: Arc<Mutex<Option<Vec<u8>>>>,
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
        Proxy { addr, up, lose_responses, hold_requests_ms, hold_next, lose_answers_to, live, cut_after_loss }
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
