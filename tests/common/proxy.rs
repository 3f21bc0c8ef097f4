//! A TCP proxy the test can cut, to simulate a dependency outage (connections refused, and
//! connections in flight reset) without touching the shared server.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub struct Proxy {
    pub addr: String,
    up: Arc<AtomicBool>,
    lose_responses: Arc<AtomicBool>,
    live: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    /// Listens on 127.0.0.1:<free port> and forwards to `upstream` (host:port) while up.
    pub fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let up = Arc::new(AtomicBool::new(true));
        let lose_responses = Arc::new(AtomicBool::new(false));
        let live: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (up2, lose2, live2, upstream) = (up.clone(), lose_responses.clone(), live.clone(), upstream.to_string());
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
                let pairs = [
                    (client.try_clone().unwrap(), server.try_clone().unwrap(), None),
                    (server, client, Some(lose2.clone())),
                ];
                for (mut from, mut to, lose) in pairs {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 64 * 1024];
                        loop {
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    // A response to lose: the server did the work, the client
                                    // only sees its connection die.
                                    if lose.as_ref().is_some_and(|l| l.load(Ordering::SeqCst)) {
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
        Proxy { addr, up, lose_responses, live }
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
    }

    /// Requests still reach the server, but every response is lost (the connection is reset as
    /// it arrives): the client cannot know whether its request took effect.
    pub fn lose_responses(&self) {
        self.lose_responses.store(true, Ordering::SeqCst);
    }
}
