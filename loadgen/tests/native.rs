//! The loadgen binary against a real in-process livelock server (native
//! protocol), and its command-line checks.

mod common;
use common::*;

#[test]
fn lock_cycles() {
    let server = TestServer::start();
    let json = loadgen_json(&[&server.url(), "--duration", "1", "-c", "8"]);
    assert_healthy(&json);
    assert_eq!(num(&json, "connections"), 8.0);
    assert_eq!(num(&json, "pipeline"), 1.0);
    assert!(num(&json, "acquire\":{\"count") > 0.0, "{json}");
    assert!(num(&json, "release\":{\"count") > 0.0, "{json}");
    assert!((0.9..1.5).contains(&num(&json, "duration_secs")), "{json}");
}

#[test]
fn pipeline_16() {
    let server = TestServer::start();
    let json = loadgen_json(&[
        &server.url(),
        "--duration",
        "1",
        "-c",
        "4",
        "--pipeline",
        "16",
        "--keys",
        "1000",
    ]);
    assert_healthy(&json);
    assert_eq!(num(&json, "pipeline"), 16.0);
}

#[test]
fn ping_round_trips() {
    let server = TestServer::start();
    let json = loadgen_json(&[&server.url(), "--duration", "1", "-c", "4", "--op", "ping"]);
    assert_healthy(&json);
    let pings = num(&json, "ping\":{\"count");
    assert!(pings > 0.0, "{json}");
    assert_eq!(pings, num(&json, "cycles"), "{json}");
    assert!(!json.contains("\"acquire\""), "{json}");
}

/// Heavy contention on a few keys, waiting acquires, readers and writers
/// mixed, locks held a little: the server must never grant an exclusive
/// lock that another of our connections still holds.
#[test]
fn contended_waits_have_no_violations() {
    let server = TestServer::start();
    let json = loadgen_json(&[
        &server.url(),
        "--duration",
        "1",
        "-c",
        "16",
        "--pipeline",
        "2",
        "--keys",
        "4",
        "--mode",
        "wait",
        "--shared-ratio",
        "0.3",
        "--hold-us",
        "50",
    ]);
    assert_healthy(&json);
    assert_eq!(num(&json, "busy"), 0.0, "waits are never busy: {json}");
}

#[test]
fn contended_tries_are_busy_and_zipf_works() {
    let server = TestServer::start();
    let json = loadgen_json(&[
        &server.url(),
        "--duration",
        "1",
        "-c",
        "8",
        "--keys",
        "50",
        "--distribution",
        "zipf",
        "--zipf-s",
        "1.2",
        "--hold-us",
        "200",
    ]);
    assert_healthy(&json);
    assert!(
        num(&json, "busy") > 0.0,
        "hot keys held 200 us must be busy sometimes: {json}"
    );
}

#[test]
fn cycles_limit_ends_the_run_early() {
    let server = TestServer::start();
    let json = loadgen_json(&[
        &server.url(),
        "--duration",
        "30",
        "--cycles",
        "2000",
        "-c",
        "4",
    ]);
    assert_healthy(&json);
    let cycles = num(&json, "cycles");
    assert!((2000.0..2100.0).contains(&cycles), "{json}");
    assert!(num(&json, "duration_secs") < 20.0, "{json}");
}

#[test]
fn open_loop_rate_is_followed() {
    let server = TestServer::start();
    let json = loadgen_json(&[
        &server.url(),
        "--duration",
        "1",
        "-c",
        "10",
        "--rate",
        "2000",
        "--warmup",
        "0.2",
    ]);
    assert_healthy(&json);
    let cycles = num(&json, "cycles");
    assert!(
        (1000.0..=2300.0).contains(&cycles),
        "about 2000 cycles: {json}"
    );
    assert_eq!(num(&json, "rate"), 2000.0, "{json}");
}

#[test]
fn table_output_by_default() {
    let server = TestServer::start();
    let out = loadgen(&[&server.url(), "--duration", "0.5", "-c", "2"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    for word in [
        "cycles/s",
        "ops/s",
        "busy",
        "errors",
        "violations",
        "acquire",
        "release",
        "p99.9",
    ] {
        assert!(out.stdout.contains(word), "{word} missing:\n{}", out.stdout);
    }
    // Not a terminal: progress lines, not carriage returns.
    assert!(!out.stderr.contains('\r'), "{}", out.stderr);
}

#[test]
fn passwords() {
    let server = TestServer::start_with(|config| config.password = Some(b"s3cret".to_vec()));
    for url in [server.url(), format!("livelock-resp://{}", server.addr)] {
        let json = loadgen_json(&[&url, "--duration", "0.5", "-c", "2", "--password", "s3cret"]);
        assert_healthy(&json);
        let out = loadgen(&[&url, "--duration", "0.5", "-c", "2", "--password", "wrong"]);
        assert_eq!(out.code, Some(1), "{url}: {}", out.stderr);
        assert!(out.stderr.contains("password"), "{url}: {}", out.stderr);
    }
}

#[test]
fn unreachable_target_exits_1() {
    // Bind then drop to find a port with (almost certainly) no listener.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = loadgen(&[&format!("livelock://127.0.0.1:{port}"), "--duration", "1"]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("cannot connect"), "{}", out.stderr);
    assert!(out.stdout.is_empty());
}

#[test]
fn non_loopback_is_refused() {
    let out = loadgen(&["livelock://192.0.2.7:7873", "--duration", "1"]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("--allow-remote"), "{}", out.stderr);
}

#[test]
fn bad_arguments_exit_2() {
    for args in [
        &["livelock://127.0.0.1:7873", "--pipeline", "0"][..],
        &["livelock://127.0.0.1:7873", "--duration", "9999"],
        &["livelock://127.0.0.1:7873", "--distribution", "pareto"],
        &["http://127.0.0.1:7873"],
        &["redis://127.0.0.1:6379", "--shared-ratio", "0.5"],
        &["livelock://127.0.0.1:7873", "--hold-us", "5x"],
    ] {
        let out = loadgen(args);
        assert_eq!(out.code, Some(2), "{args:?}: {}", out.stderr);
        assert!(!out.stderr.is_empty(), "{args:?}");
    }
}

/// With no target, the server of LIVELOCK_HOST and LIVELOCK_PORT, read as
/// every livelock command reads them; a bad one is a usage error naming it.
#[test]
fn the_target_defaults_to_the_environment() {
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let run = |env: &[(&str, String)]| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_livelock-loadgen"));
        command
            .args(["--duration", "1", "-q"])
            .envs(env.iter().cloned());
        command.output().expect("run livelock-loadgen")
    };
    let out = run(&[
        ("LIVELOCK_HOST", "127.0.0.1".into()),
        ("LIVELOCK_PORT", free.to_string()),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("127.0.0.1:{free}")), "{stderr}");
    let out = run(&[("LIVELOCK_PORT", "abc".into())]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("LIVELOCK_PORT"), "{stderr}");
}

/// `--tls-ca`: the same lock cycles through TLS, pipelined; a target whose
/// certificate the CA did not sign fails to set up.
#[test]
fn lock_cycles_over_tls() {
    let dir = std::env::temp_dir().join(format!("loadgen-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write_ca = |name: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, cert.pem()).unwrap();
        (cert, key, path)
    };
    let (ca, ca_key, ca_path) = write_ca("ca");
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let (cert_path, key_path) = (dir.join("server.pem"), dir.join("server.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let server = TestServer::start_with(|config| {
        config.tls = Some(livelock::tls::TlsFiles {
            cert: cert_path.clone(),
            key: key_path.clone(),
            client_ca: None,
            required: true,
        });
    });
    let ca_arg = ca_path.to_str().unwrap();
    let json = loadgen_json(&[
        &server.url(),
        "--tls-ca",
        ca_arg,
        "--duration",
        "1",
        "-c",
        "4",
        "--pipeline",
        "16",
    ]);
    assert_healthy(&json);
    assert!(num(&json, "release\":{\"count") > 0.0, "{json}");
    let (_, _, other_path) = write_ca("other");
    let out = loadgen(&[
        &server.url(),
        "--tls-ca",
        other_path.to_str().unwrap(),
        "-d",
        "1",
    ]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("TLS"), "{}", out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
}
