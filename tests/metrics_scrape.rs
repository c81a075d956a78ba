//! The Prometheus endpoint of a real server, scraped over HTTP while a
//! client holds a lock: the counters and gauges move with the traffic.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

fn scrape(addr: std::net::SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect to metrics");
    stream.set_read_timeout(Some(WAIT_MAX)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the response");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("text/plain; version=0.0.4"), "{response}");
    response
}

fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in\n{text}"))
}

/// A server of `loops` loops with its metrics endpoint, and that endpoint.
fn metered(loops: usize) -> (TestServer, std::net::SocketAddr) {
    let server = TestServer::start_with(loops, |config| {
        config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    });
    let metrics = server.server.as_ref().unwrap().metrics_addr();
    (server, metrics.expect("metrics on"))
}

#[test]
fn metrics_follow_the_traffic() {
    let (server, metrics) = metered(2);
    let holder = server.client();
    let waiter = server.client();
    let guard = holder.acquire("metered").unwrap();
    assert!(waiter
        .acquire_timeout("metered", Duration::from_millis(50))
        .unwrap()
        .is_none());
    // Gauges are refreshed once per loop turn: wait (bounded) for them.
    let mut text = scrape(metrics);
    wait_until("the held lock shows", || {
        text = scrape(metrics);
        sample(&text, "livelock_locks_held") == 1.0
    });
    assert!(sample(&text, "livelock_grants_total") >= 1.0);
    assert!(sample(&text, "livelock_timeouts_total") >= 1.0);
    assert_eq!(sample(&text, "livelock_busy_total"), 0.0);
    assert!(sample(&text, "livelock_acquisitions_total") >= 2.0);
    // The busiest names, with their usage (published once a second).
    wait_until("the hot lock shows", || {
        text = scrape(metrics);
        text.contains("livelock_lock_held{lock=\"metered\"} 1")
    });
    assert!(
        text.contains("livelock_lock_timeouts{lock=\"metered\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("livelock_lock_acquires{lock=\"metered\"} 2"),
        "{text}"
    );
    assert!(sample(&text, "livelock_connections_accepted_total") >= 2.0);
    // The holder's acquire was served; the waiter's waited (and timed out).
    assert!(sample(&text, "livelock_op_duration_seconds_count{op=\"acquire\"}") >= 1.0);
    assert!(sample(&text, "livelock_acquire_wait_seconds_count") >= 1.0);
    assert_eq!(sample(&text, "livelock_sessions{state=\"attached\"}"), 2.0);
    assert_eq!(sample(&text, "livelock_up"), 1.0);
    // A waiter that is cancelled changes what the busiest names show
    // without any usage record: the gauges follow all the same.
    let pending = waiter
        .start_acquire("metered", livelock::client::AcquireOptions::default(), true)
        .unwrap();
    wait_until("the waiter shows", || {
        scrape(metrics).contains("livelock_lock_waiting{lock=\"metered\"} 1")
    });
    pending.cancel().unwrap();
    drop(pending);
    wait_until("the cancelled waiter is gone", || {
        scrape(metrics).contains("livelock_lock_waiting{lock=\"metered\"} 0")
    });
    guard.release().unwrap();
    wait_until("the release shows", || {
        let text = scrape(metrics);
        sample(&text, "livelock_locks_held") == 0.0
            && sample(&text, "livelock_releases_total") >= 1.0
    });
}

/// Every operation is counted under its own label, the ones answered at
/// once (HELLO, PING, BYE) and the gathered queries (INSPECT, LIST, STATS)
/// included; an acquire that would not wait and found the lock held counts
/// as busy (issue 11, item 9, in part).
#[test]
fn every_operation_is_counted() {
    let (server, metrics) = metered(2);
    let client = server.client();
    let other = server.client();
    let guard = client.acquire("counted").unwrap();
    assert!(other.try_acquire("counted").unwrap().is_none());
    client.ping().unwrap();
    client.inspect("counted").unwrap();
    client.list("*", 10).unwrap();
    client.stats().unwrap();
    drop(guard);
    let victim = server.client();
    victim.acquire("broken").unwrap().forget();
    client.force_release("broken", 0).unwrap();
    client.kill_session(victim.session_id()).unwrap();
    other.bye().unwrap();
    let count = |text: &str, op: &str| {
        sample(
            text,
            &format!("livelock_op_duration_seconds_count{{op=\"{op}\"}}"),
        )
    };
    let mut text = scrape(metrics);
    wait_until("the BYE is counted", || {
        text = scrape(metrics);
        count(&text, "bye") >= 1.0
    });
    for op in [
        "hello",
        "acquire",
        "release",
        "ping",
        "inspect",
        "list",
        "stats",
        "force_release",
        "kill_session",
    ] {
        assert!(count(&text, op) >= 1.0, "op={op} not counted:\n{text}");
    }
    assert!(count(&text, "hello") >= 2.0);
    assert_eq!(sample(&text, "livelock_busy_total"), 1.0);
    // An acquire that waited in the queue counts as waiting, not as service.
    let waits = sample(&text, "livelock_acquire_wait_seconds_count");
    let acquires = count(&text, "acquire");
    let waiter = server.client();
    let holder = client.acquire("waited-for").unwrap();
    let pending = std::thread::spawn(move || waiter.acquire("waited-for").map(|g| g.token()));
    wait_until("the waiter is queued", || {
        client
            .inspect("waited-for")
            .unwrap()
            .is_some_and(|r| r.waiters == 1)
    });
    drop(holder);
    pending.join().unwrap().unwrap();
    wait_until("the wait is counted", || {
        text = scrape(metrics);
        sample(&text, "livelock_acquire_wait_seconds_count") == waits + 1.0
    });
    assert_eq!(
        count(&text, "acquire"),
        acquires + 1.0,
        "only the holder's acquire is service"
    );
    // The build and the process.
    let version = format!(
        "livelock_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(sample(&text, &version), 1.0);
    assert!(sample(&text, "process_resident_memory_bytes") > 1e6);
    assert!(sample(&text, "process_open_fds") >= 3.0);
    assert!(sample(&text, "process_cpu_seconds_total") >= 0.0);
}

/// Usage per tag pair: resources taken through a pool count under each
/// `key=value` of their tags, added up over the shards.
#[test]
fn tag_gauges_add_up_the_names_with_each_tag() {
    use livelock::client::Requirement;
    let (server, metrics) = metered(3);
    let client = server.client();
    let devices = [("gpu1", "model=T1,site=a"), ("gpu2", "model=T1,site=b")];
    let both = [Requirement::tagged(2, devices)];
    for _ in 0..3 {
        client
            .acquire_pool(&both, None)
            .unwrap()
            .unwrap()
            .release()
            .unwrap();
    }
    let held = client.acquire_pool(&both, None).unwrap().unwrap();
    wait_until("the tag gauges show", || {
        let text = scrape(metrics);
        text.contains("livelock_tag_grants{tag=\"model=T1\"} 8")
            && text.contains("livelock_tag_grants{tag=\"site=a\"} 4")
            && text.contains("livelock_tag_held{tag=\"model=T1\"} 2")
    });
    drop(held);
}
