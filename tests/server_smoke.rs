mod common;
use common::*;
use std::time::Duration;

#[test]
fn acquire_release_and_fencing() {
    let server = TestServer::start(2);
    let a = server.client();
    let b = server.client();
    let g1 = a.acquire("x").unwrap();
    assert!(b.try_acquire("x").unwrap().is_none());
    let t1 = g1.token();
    drop(g1);
    let g2 = b.try_acquire("x").unwrap().expect("free after release");
    assert!(g2.token() > t1);
    a.ping().unwrap();
    let _ = Duration::ZERO;
}
