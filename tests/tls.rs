//! TLS on the client port: a connection that opens with a TLS record gets
//! TLS, others stay plaintext on the same port (unless TLS is required); the
//! server's certificate is checked against the client's CA, a server that
//! asks for client certificates refuses a client without one, and SIGHUP
//! reloads the files (new connections get the new certificate). Certificates
//! are made by rcgen in each test.

mod common;

use std::path::Path;

use common::certs::Ca;
use common::*;
use livelock::client::{Client, ClientOptions, TlsClient};
use livelock::tls::TlsFiles;

fn tls_options(ca: &Path, client_cert: Option<(&Path, &Path)>) -> ClientOptions {
    ClientOptions {
        tls: Some(TlsClient::new(ca, "127.0.0.1", client_cert).expect("TLS client setup")),
        ..ClientOptions::default()
    }
}

fn files(cert: &Path, key: &Path, client_ca: Option<&Path>, required: bool) -> TlsFiles {
    TlsFiles {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        client_ca: client_ca.map(Path::to_path_buf),
        required,
    }
}

#[test]
fn tls_and_plaintext_share_the_port() {
    let dir = ScratchDir::new("tls-shared");
    let ca = Ca::new(&dir, "server");
    let (cert, key) = ca.issue(&dir, "server", &["127.0.0.1", "localhost"]);
    let server = TestServer::start_with(2, |config| {
        config.tls = Some(files(&cert, &key, None, false));
    });
    let secure = Client::connect(server.addr, &tls_options(&ca.path, None)).expect("over TLS");
    let guard = secure.acquire("over-tls").unwrap();
    let plain = server.client();
    assert!(
        plain.try_acquire("over-tls").unwrap().is_none(),
        "one lock, both ways"
    );
    let token = guard.token();
    guard.release().unwrap();
    let again = plain.acquire("over-tls").unwrap();
    assert!(again.token() > token);
    // A large reply (LIST of long names) crosses many TLS records.
    let names: Vec<String> = (0..200)
        .map(|i| format!("{i:04}-{}", "x".repeat(900)))
        .collect();
    for name in &names {
        secure.acquire(name).unwrap().forget();
    }
    let listing = secure.list("0*", 1000).unwrap();
    assert_eq!(listing.records.len(), names.len());
    secure.bye().unwrap();

    // Another CA's client does not trust this server.
    let other = Ca::new(&dir, "other");
    assert!(Client::connect(server.addr, &tls_options(&other.path, None)).is_err());
}

#[test]
fn required_tls_refuses_plaintext_and_client_certificates_are_checked() {
    let dir = ScratchDir::new("tls-required");
    let ca = Ca::new(&dir, "server");
    let (cert, key) = ca.issue(&dir, "server", &["127.0.0.1"]);
    let clients = Ca::new(&dir, "clients");
    let server = TestServer::start_with(1, |config| {
        config.tls = Some(files(&cert, &key, Some(&clients.path), true));
    });
    assert!(
        Client::connect(server.addr, &ClientOptions::default()).is_err(),
        "plaintext refused"
    );
    assert!(
        Client::connect(server.addr, &tls_options(&ca.path, None)).is_err(),
        "no client certificate"
    );
    let stranger = Ca::new(&dir, "stranger");
    let (bad_cert, bad_key) = stranger.issue(&dir, "stranger-client", &["someone"]);
    assert!(
        Client::connect(
            server.addr,
            &tls_options(&ca.path, Some((&bad_cert, &bad_key)))
        )
        .is_err(),
        "a client certificate of another CA"
    );
    let (client_cert, client_key) = clients.issue(&dir, "client", &["worker-1"]);
    let client = Client::connect(
        server.addr,
        &tls_options(&ca.path, Some((&client_cert, &client_key))),
    )
    .expect("a known client certificate");
    client.acquire("mutual").unwrap().release().unwrap();
}

#[test]
fn sighup_reloads_the_certificate() {
    let dir = ScratchDir::new("tls-reload");
    let first = Ca::new(&dir, "first");
    let (cert, key) = first.issue(&dir, "server", &["127.0.0.1"]);
    let addr = free_addr();
    let mut server = start_server_with(
        "server",
        &dir,
        &data_dir(&dir),
        addr,
        "memory",
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    Client::connect(addr, &tls_options(&first.path, None)).expect("the first certificate");
    // New files in place, then SIGHUP.
    let second = Ca::new(&dir, "second");
    let (new_cert, new_key) = second.issue(&dir, "server-2", &["127.0.0.1"]);
    std::fs::rename(&new_cert, &cert).unwrap();
    std::fs::rename(&new_key, &key).unwrap();
    signal(&server, libc::SIGHUP);
    server.wait_for("the reload", |s| {
        s.stderr()
            .contains("TLS certificate and key reloaded")
            .then_some(())
    });
    Client::connect(addr, &tls_options(&second.path, None)).expect("the new certificate");
    assert!(Client::connect(addr, &tls_options(&first.path, None)).is_err());
    // A broken file keeps the working setup.
    std::fs::write(&cert, b"not a certificate").unwrap();
    signal(&server, libc::SIGHUP);
    server.wait_for("the refused reload", |s| {
        s.stderr().contains("TLS not reloaded").then_some(())
    });
    Client::connect(addr, &tls_options(&second.path, None)).expect("still the second");
    signal(&server, libc::SIGTERM);
    expect_clean_exit(&mut server);
}

/// RESUME over TLS on a server with several loops: the connection moves to
/// the session's home loop with its TLS session (each new connection lands
/// on another loop, so most of these resumes move).
#[test]
fn resume_over_tls_moves_with_its_session() {
    let dir = ScratchDir::new("tls-resume");
    let ca = Ca::new(&dir, "server");
    let (cert, key) = ca.issue(&dir, "server", &["127.0.0.1"]);
    let server = TestServer::start_with(4, |config| {
        config.tls = Some(files(&cert, &key, None, true));
    });
    let options = ClientOptions {
        grace: std::time::Duration::from_secs(30),
        ..tls_options(&ca.path, None)
    };
    let client = Client::connect(server.addr, &options).unwrap();
    let guard = client.acquire("kept").unwrap();
    let token = guard.token();
    guard.forget();
    let (id, secret) = (client.session_id(), client.secret());
    drop(client);
    for round in 0..8 {
        let resumed = Client::resume(server.addr, id, secret, &options)
            .unwrap_or_else(|e| panic!("resume {round} over TLS: {e}"));
        let holds = resumed.resumed().expect("a RESUME").holds;
        assert_eq!(holds.len(), 1, "round {round}");
        assert_eq!(holds[0].token, token);
        resumed.ping().unwrap();
    }
}

/// `--tls-client-ca` alone refuses plaintext: client certificates that a
/// plaintext connection could walk around would guard nothing.
#[test]
fn client_certificates_imply_required_tls() {
    let dir = ScratchDir::new("tls-client-ca");
    let ca = Ca::new(&dir, "server");
    let (cert, key) = ca.issue(&dir, "server", &["127.0.0.1"]);
    let clients = Ca::new(&dir, "clients");
    let addr = free_addr();
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let (cert, key, client_ca) = (path(&cert), path(&key), path(&clients.path));
    let mut server = start_server_with(
        "server",
        &dir,
        &data_dir(&dir),
        addr,
        "memory",
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &client_ca,
        ],
    );
    assert!(Client::connect(addr, &ClientOptions::default()).is_err());
    let (client_cert, client_key) = clients.issue(&dir, "client", &["worker"]);
    Client::connect(
        addr,
        &tls_options(&ca.path, Some((&client_cert, &client_key))),
    )
    .expect("a known client certificate");
    signal(&server, libc::SIGTERM);
    expect_clean_exit(&mut server);
}

/// A one-loop server that requires TLS, and a TCP connection to it with a
/// TLS session the test drives itself (the scratch directory lives as long
/// as the caller keeps it).
fn raw_tls(
    label: &str,
) -> (
    ScratchDir,
    Ca,
    TestServer,
    std::net::TcpStream,
    rustls::ClientConnection,
) {
    let dir = ScratchDir::new(label);
    let ca = Ca::new(&dir, "server");
    let (cert, key) = ca.issue(&dir, "server", &["127.0.0.1"]);
    let server = TestServer::start_with(1, |config| {
        config.tls = Some(files(&cert, &key, None, true));
    });
    let tcp = std::net::TcpStream::connect(server.addr).unwrap();
    tcp.set_read_timeout(Some(WAIT_MAX)).unwrap();
    let tls = TlsClient::new(&ca.path, "127.0.0.1", None)
        .unwrap()
        .session()
        .unwrap();
    (dir, ca, server, tcp, tls)
}

/// A TLS client that sends its last requests and closes TCP without a TLS
/// close_notify (many stacks do) still has them answered: the server reads
/// what was decrypted before the end, as for a plaintext half-close.
#[test]
fn requests_before_a_bare_close_are_answered() {
    use livelock::protocol::{self, DecodedReply, Mode, Request, Status};
    use std::io::{Read, Write};
    let (_dir, ca, server, mut tcp, mut tls) = raw_tls("tls-bare-close");
    let mut frames = Vec::new();
    let hello = Request::Hello {
        grace_ms: 60_000,
        password: b"",
        client_name: b"bare-close",
    };
    protocol::encode_request(&mut frames, 1, &hello);
    let acquire = Request::Acquire {
        name: b"closing",
        mode: Mode::Exclusive,
        weight: 1,
        capacity: 0,
        wait_ms: 0,
        lease_ms: 0,
        notify_queued: false,
    };
    protocol::encode_request(&mut frames, 2, &acquire);
    protocol::encode_request(
        &mut frames,
        3,
        &Request::Release {
            name: b"closing",
            token: 0,
        },
    );
    protocol::encode_request(&mut frames, 4, &Request::Bye);
    {
        let mut stream = rustls::Stream::new(&mut tls, &mut tcp);
        stream.write_all(&frames).unwrap();
        stream.flush().unwrap();
    }
    // The end of the TCP stream, no close_notify.
    tcp.shutdown(std::net::Shutdown::Write).unwrap();
    let mut plain = Vec::new();
    let mut stream = rustls::Stream::new(&mut tls, &mut tcp);
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => plain.extend_from_slice(&chunk[..n]),
            // The server ends without close_notify too once it closed.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => panic!("reading the replies: {e}"),
        }
    }
    let mut replies = Vec::new();
    let mut at = 0;
    while let Ok(DecodedReply::Frame { consumed, reply }) = protocol::decode_reply(&plain[at..]) {
        replies.push((reply.request_id, reply.status));
        at += consumed;
    }
    assert_eq!(
        replies,
        vec![
            (1, Status::Ok),
            (2, Status::Ok),
            (3, Status::Ok),
            (4, Status::Ok)
        ],
        "every request answered"
    );
    // The session ended with BYE: the lock is free, grace or not.
    let observer = Client::connect(server.addr, &tls_options(&ca.path, None)).unwrap();
    assert!(observer.inspect("closing").unwrap().is_none());
}

/// The resident memory of process `pid`, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// A TLS connection's read buffer stays bounded however its records cut the
/// frames: 40 MB of pipelined PINGs in records that each end mid-frame do
/// not grow the server by anything like 40 MB (the buffer used to grow by
/// every byte received). The server is a process of its own, so nothing
/// else this test binary runs counts against it.
#[test]
fn a_tls_read_buffer_stays_bounded() {
    use livelock::protocol::{self, DecodedReply, Request};
    use std::io::{Read, Write};
    let dir = ScratchDir::new("tls-bounded");
    let ca = Ca::new(&dir, "server");
    let (cert, key) = ca.issue(&dir, "server", &["127.0.0.1"]);
    let addr = free_addr();
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let server = start_server_with(
        "tls-server",
        &dir,
        &data_dir(&dir),
        addr,
        "memory",
        &["--threads", "1", "--tls-cert", cert, "--tls-key", key],
    );
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(WAIT_MAX)).unwrap();
    let mut tls = TlsClient::new(&ca.path, "127.0.0.1", None)
        .unwrap()
        .session()
        .unwrap();
    let mut stream = rustls::Stream::new(&mut tls, &mut tcp);
    let mut pings = Vec::new();
    for id in 1..=1000u32 {
        protocol::encode_request(&mut pings, id, &Request::Ping);
    }
    let (mut sent, mut answered, mut replies) = (0usize, 0usize, Vec::new());
    let before = rss_bytes(server.id());
    let mut carry: &[u8] = &[];
    let mut chunk = [0u8; 64 * 1024];
    while sent < 40 << 20 {
        // 1000 PINGs shifted by 8 bytes: every write ends mid-frame.
        let mut write = carry.to_vec();
        write.extend_from_slice(&pings[..pings.len() - 8]);
        carry = &pings[pings.len() - 8..];
        stream.write_all(&write).unwrap();
        sent += write.len();
        // Read the replies of the whole frames sent so far.
        let expected = sent / 16;
        while answered < expected {
            let n = stream.read(&mut chunk).unwrap();
            assert!(n > 0, "the server closed the connection");
            replies.extend_from_slice(&chunk[..n]);
            let mut at = 0;
            while let Ok(DecodedReply::Frame { consumed, .. }) =
                protocol::decode_reply(&replies[at..])
            {
                at += consumed;
                answered += 1;
            }
            replies.drain(..at);
        }
    }
    let grown = rss_bytes(server.id()).saturating_sub(before);
    assert!(
        grown < 16 << 20,
        "the server grew by {grown} bytes for 40 MB received"
    );
}
