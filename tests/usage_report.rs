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

/// Per tag: names taken through pools keep their candidates' tags; a
/// report for a tag filter lists the names whose tags match (on any shard)
/// after a total row that adds them up, including what is held and
/// waited for now; a name without the tags is left out. `livelock report
/// --tag` says the same.
#[test]
fn a_tag_report_adds_up_the_names_with_the_tag() {
    use livelock::client::Requirement;
    let server = TestServer::start(3);
    let (a, b) = (server.client(), server.client());
    let devices = [
        ("dev1", "model=T1,site=lab1"),
        ("dev2", "model=T1,site=lab2"),
        ("dev3", "model=T2,site=lab1"),
    ];
    let t1 = || [Requirement::tagged(1, devices).filter("model=T1")];
    // Four T1 grants (dev1, then dev2 while dev1 is held, ...).
    for _ in 0..2 {
        let first = a.acquire_pool(&t1(), None).unwrap().unwrap();
        let second = b.acquire_pool(&t1(), None).unwrap().unwrap();
        assert_ne!(first.names(0), second.names(0));
        first.release().unwrap();
        second.release().unwrap();
    }
    // One T2, and a plain acquire of an untagged name.
    let t2 = [Requirement::tagged(1, devices).filter("model=T2")];
    a.acquire_pool(&t2, None)
        .unwrap()
        .unwrap()
        .release()
        .unwrap();
    a.acquire("plain").unwrap().release().unwrap();
    // Held now: a T1 device.
    let held = a.acquire_pool(&t1(), None).unwrap().unwrap();

    let report = b.report_tagged(10, b"model=T1").unwrap();
    let names: Vec<&[u8]> = report.rows.iter().map(|r| &r.name[..]).collect();
    assert_eq!(names[0], b"model=T1", "the total first");
    let mut rest = names[1..].to_vec();
    rest.sort();
    assert_eq!(rest, [&b"dev1"[..], b"dev2"]);
    let total = &report.rows[0];
    let sum = |f: fn(&livelock::protocol::ReportRow) -> u64| -> u64 {
        report.rows[1..].iter().map(f).sum()
    };
    assert_eq!(total.acquires, sum(|r| r.acquires));
    assert_eq!(total.grants, sum(|r| r.grants));
    // Every grant; the acquires also count the tries that found one taken.
    assert_eq!((total.grants, total.held), (5, 1));
    assert_eq!(total.acquires, total.grants + total.busy);
    // Two filters' pairs must all match.
    let lab1 = b.report_tagged(10, b"site=lab1,model=T2").unwrap();
    assert_eq!(lab1.rows.len(), 2);
    assert_eq!(
        (&lab1.rows[1].name[..], lab1.rows[0].grants),
        (&b"dev3"[..], 1)
    );
    // Nothing has the tag: just an empty total.
    let none = b.report_tagged(10, b"model=T9").unwrap();
    assert_eq!(none.rows.len(), 1);
    assert_eq!(none.rows[0].acquires, 0);
    drop(held);

    let out = livelock_bin()
        .args(["report", "--server"])
        .arg(server.addr.to_string())
        .args(["--tag", "model=T1", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains(r#""total":{"name":"model=T1","#), "{text}");
    assert!(text.contains(r#""grants":5,"#), "{text}");
    let out = livelock_bin()
        .args(["report", "--tag", "novalue"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
