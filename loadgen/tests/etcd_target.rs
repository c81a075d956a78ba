//! The `etcd://` target against a real etcd (3.4, from Debian's
//! `etcd-server`; `.ci/run` installs it): lock cycles under a lease through
//! the HTTP gateway, contended ones too (etcd queues them), and pings; and
//! the usage errors of a target without try-locks.

mod common;
use common::*;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct RealEtcd {
    child: Child,
    addr: String,
    _dir: std::path::PathBuf,
}

impl RealEtcd {
    /// None when etcd is not installed.
    fn start() -> Option<RealEtcd> {
        let port = |_: ()| {
            TcpListener::bind("127.0.0.1:0")
                .ok()?
                .local_addr()
                .ok()
                .map(|a| a.port())
        };
        let (client, peer) = (port(())?, port(())?);
        let dir =
            std::env::temp_dir().join(format!("loadgen-etcd-{}-{client}", std::process::id()));
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(&dir)
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
            ])
            .args([
                "--initial-cluster",
                &format!("default=http://127.0.0.1:{peer}"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let etcd = RealEtcd {
            child,
            addr: format!("127.0.0.1:{client}"),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let health = Command::new("curl")
                .args(["-sf", &format!("http://{}/health", etcd.addr)])
                .output();
            if health.is_ok_and(|o| o.status.success()) {
                return Some(etcd);
            }
            assert!(Instant::now() < deadline, "etcd did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RealEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

#[test]
fn etcd_against_a_real_server() {
    let Some(etcd) = RealEtcd::start() else {
        eprintln!("etcd not installed: skipping");
        return;
    };
    let url = format!("etcd://{}", etcd.addr);
    let common = ["--mode", "wait", "--duration", "1"];
    let json = loadgen_json(&[
        &url, common[0], common[1], common[2], common[3], "-c", "4", "-P", "4",
    ]);
    assert_healthy(&json);
    assert!(num(&json, "cycles") > 0.0, "{json}");
    // Four connections on two keys: etcd queues them; no double grant.
    let json = loadgen_json(&[
        &url, common[0], common[1], common[2], common[3], "-c", "4", "--keys", "2",
    ]);
    assert_healthy(&json);
    let json = loadgen_json(&[&url, "--op", "ping", "--duration", "0.5", "-c", "2"]);
    assert_healthy(&json);
}

#[test]
fn etcd_needs_wait_mode() {
    let out = loadgen(&["etcd://127.0.0.1:1", "--duration", "1"]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("no try-lock"), "{}", out.stderr);
}
