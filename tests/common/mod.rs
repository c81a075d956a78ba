//! Helpers shared by the integration tests: an in-process server on
//! 127.0.0.1:0 and bounded waits.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use livelock::client::{Client, ClientOptions};
use livelock::config::ServerConfig;
use livelock::server::Server;

/// Every wait in the tests is bounded by this.
pub const WAIT_MAX: Duration = Duration::from_secs(20);

pub struct TestServer {
    pub server: Option<Server>,
    pub addr: SocketAddr,
}

impl TestServer {
    pub fn start(threads: usize) -> TestServer {
        TestServer::start_with(threads, |_| {})
    }

    pub fn start_with(threads: usize, tweak: impl FnOnce(&mut ServerConfig)) -> TestServer {
        let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap());
        config.threads = threads;
        tweak(&mut config);
        let server = Server::start(config).expect("server starts");
        let addr = server.local_addr();
        TestServer {
            server: Some(server),
            addr,
        }
    }

    pub fn client(&self) -> Client {
        Client::connect(self.addr, &ClientOptions::default()).expect("connect")
    }

    pub fn client_with(&self, options: &ClientOptions) -> Client {
        Client::connect(self.addr, options).expect("connect")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown();
            let _ = server.join();
        }
    }
}

/// Polls `condition` until it holds or WAIT_MAX passes (then panics).
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < WAIT_MAX, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}
