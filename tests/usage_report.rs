//! Usage reports over real sockets: REPORT (the Rust client's `report`)
//! and `livelock report --json` after a scripted history across shards —
//! acquires, grants, busy refusals, timeouts, wait and hold times, and who
//! holds and waits now, busiest first.

mod common;

use std::time::Duration;

use common::{livelock_bin, ScratchDir, TestServer, WAIT_MAX};
use livelock::client::AcquireOptions;

#[test]
fn the_report_tells_the_history() {
    let server = TestServer::start(2);
    let (a, b) = (server.client(), server.client());
    // "hot": three cycles, a busy refusal, a timed-out wait; "warm": one.
    for _ in 0..3 {
        a.acquire("hot").unwrap().release().unwrap();
    }
    let held = a.acquire("hot").unwrap();
    assert!(b.try_acquire("hot").unwrap().is_none());
    assert!(b
        .acquire_timeout("hot", Duration::from_millis(30))
        .unwrap()
        .is_none());
    let _warm = b.acquire("warm").unwrap();
    // One waits for "hot" now.
    let mut pending = b
        .start_acquire("hot", AcquireOptions::default(), true)
        .unwrap();
    assert!(pending.wait_queued(WAIT_MAX).unwrap());

    let report = a.report(10).unwrap();
    let names: Vec<&[u8]> = report.rows.iter().map(|r| &r.name[..]).collect();
    assert_eq!(names, [&b"hot"[..], b"warm"], "busiest first");
    let hot = &report.rows[0];
    // 4 granted, the busy try, the timed-out wait, the one waiting.
    assert_eq!(
        (hot.acquires, hot.grants, hot.busy, hot.timeouts),
        (7, 4, 1, 1)
    );
    assert_eq!((hot.held, hot.waiting), (1, 1));
    // Three holds ended (the released cycles), each well under a second.
    assert!(hot.hold_ms[2] < 1024, "{hot:?}");
    let warm = &report.rows[1];
    assert_eq!((warm.acquires, warm.grants, warm.held), (1, 1, 1));
    assert_eq!(a.report(1).unwrap().rows.len(), 1, "top 1");

    // The waiter is granted once the holder lets go: its wait is timed.
    drop(held);
    let granted = common::bounded("the grant", move || pending.wait()).unwrap();
    let hot = a.report(1).unwrap().rows.remove(0);
    assert_eq!((hot.grants, hot.held, hot.waiting), (5, 1, 0));
    drop(granted);

    // The same through the command line, as JSON.
    let dir = ScratchDir::new("report-cli");
    let out = livelock_bin()
        .args(["report", "--json", "--top", "5", "--server"])
        .arg(server.addr.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let locks = json["locks"].as_array().unwrap();
    assert_eq!(locks[0]["name"], "hot");
    assert_eq!(locks[0]["grants"], 5);
    assert_eq!(locks[0]["busy"], 1);
    assert!(locks[0]["wait_ms"]["max"].as_u64().is_some());
    let table = livelock_bin()
        .args(["report", "--server"])
        .arg(server.addr.to_string())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.starts_with("NAME") && text.contains("hot"), "{text}");
    drop(dir);
}
