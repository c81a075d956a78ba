//! The real `livelock` binary against an in-process server: `livelock run`
//! (fencing token in LIVELOCK_FENCE, exit statuses, `--wait`, `--shared`,
//! `--kill-after`; `kill -9` of the run and loss of the connection both free
//! the lock and kill the command; every stop ends the command's whole process
//! tree; a partition, through a blackholing proxy, ends the command before
//! the server can free the lock; signals ignored at start stay ignored), the
//! operator commands `list`, `inspect` (with the queue), `signal`, `stats`,
//! `release --force`, `kill-session` (tables and `--json`), `--help`, and the server's refusals
//! at start (0.0.0.0 without a password, a bad boolean variable).

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    bounded, free_addr, graceful, livelock_bin, process_gone, wait_until, ChildGuard, ScratchDir,
    TestServer, WAIT_MAX,
};
use livelock::client::{AcquireOptions, Client, ClientOptions, Event};
use livelock::protocol::Mode;

/// `livelock run --server ADDR OPTIONS... NAME --`; the caller adds the command.
fn run_command(server: &TestServer, options: &[&str], name: &str) -> Command {
    let mut command = livelock_bin();
    command
        .arg("run")
        .arg("--server")
        .arg(server.addr.to_string())
        .args(options)
        .arg(name)
        .arg("--");
    command
}

/// `sh -c SCRIPT sh FILE`: the script sees FILE as "$1" (no quoting games).
fn sh_with_file<'a>(command: &'a mut Command, script: &str, file: &Path) -> &'a mut Command {
    command.args(["sh", "-c", script, "sh"]).arg(file)
}

/// Waits (bounded) until `path` holds a complete line, failing early if the
/// process that should write it exits first; returns the line.
fn wait_for_line(process: &mut ChildGuard, path: &Path) -> String {
    let what = format!("a line in {}", path.display());
    process.wait_for(&what, |_| {
        let text = std::fs::read_to_string(path).ok()?;
        text.strip_suffix('\n').map(str::to_string)
    })
}

/// Runs `command` to completion (bounded); returns (exit code, stdout, stderr).
fn run_to_end(
    what: &str,
    command: &mut Command,
    dir: &ScratchDir,
) -> (Option<i32>, String, String) {
    let mut process = ChildGuard::spawn(what, command, dir);
    let status = process.wait_exit();
    (status.code(), process.stdout(), process.stderr())
}

/// The session of the `livelock run` process `pid` holds `name` (its client
/// name is `host:pid`).
fn held_by_process(client: &Client, name: &str, pid: u32) -> bool {
    client.inspect(name).unwrap().is_some_and(|record| {
        record
            .holders
            .iter()
            .any(|h| h.client_name.ends_with(format!(":{pid}").as_bytes()))
    })
}

// ---- livelock run ---------------------------------------------------------

#[test]
fn run_passes_the_fencing_token_and_the_exit_status() {
    let server = TestServer::start(2);
    let dir = ScratchDir::new("run-fence");
    let client = server.client();
    let before = client.acquire("fence").unwrap().token();

    let fence = dir.join("fence");
    let mut command = run_command(&server, &[], "fence");
    sh_with_file(
        &mut command,
        r#"echo "$LIVELOCK_FENCE" > "$1"; exit 7"#,
        &fence,
    );
    let (code, _, stderr) = run_to_end("run", &mut command, &dir);
    assert_eq!(code, Some(7), "the command's exit status; stderr: {stderr}");

    let token: u64 = std::fs::read_to_string(&fence)
        .unwrap()
        .trim()
        .parse()
        .expect("LIVELOCK_FENCE is a number");
    assert!(token > before, "run's token {token} after {before}");
    // The run released the lock when the command ended: free at once.
    let after = client
        .try_acquire("fence")
        .unwrap()
        .expect("the run released the lock");
    assert!(
        after.token() > token,
        "a later grant's token {} is not above the run's {token}",
        after.token()
    );
}

#[test]
fn run_with_wait_0_exits_75_while_the_lock_is_held() {
    let server = TestServer::start(2);
    let dir = ScratchDir::new("run-busy");
    let holder = server.client();
    let _guard = holder.acquire("busy").unwrap();

    let marker = dir.join("ran");
    let mut command = run_command(&server, &["--wait", "0"], "busy");
    sh_with_file(&mut command, r#"touch "$1""#, &marker);
    let (code, _, stderr) = run_to_end("run", &mut command, &dir);
    assert_eq!(code, Some(75), "stderr: {stderr}");
    assert!(
        stderr.contains("livelock run: busy is held by someone else"),
        "unclear message: {stderr:?}"
    );
    assert!(!marker.exists(), "the command ran without the lock");
}

#[test]
fn run_with_a_wait_times_out_with_75() {
    let server = TestServer::start(2);
    let dir = ScratchDir::new("run-timeout");
    let holder = server.client();
    let _guard = holder.acquire("slow").unwrap();

    let marker = dir.join("ran");
    let mut command = run_command(&server, &["--wait", "200ms"], "slow");
    sh_with_file(&mut command, r#"touch "$1""#, &marker);
    let start = Instant::now();
    let (code, _, stderr) = run_to_end("run", &mut command, &dir);
    let elapsed = start.elapsed();
    assert_eq!(code, Some(75), "stderr: {stderr}");
    // The server's clock counts whole milliseconds: allow it a little.
    assert!(
        elapsed >= Duration::from_millis(190),
        "gave up after {elapsed:?}"
    );
    assert!(
        stderr.contains("slow still held after waiting"),
        "unclear message: {stderr:?}"
    );
    assert!(!marker.exists(), "the command ran without the lock");
}

#[test]
fn kill_9_of_run_frees_the_lock_and_kills_the_command() {
    let server = TestServer::start(2);
    let dir = ScratchDir::new("run-kill9");
    let pid_file = dir.join("pid");
    let mut command = run_command(&server, &[], "doomed");
    sh_with_file(&mut command, r#"echo $$ > "$1"; exec sleep 60"#, &pid_file);
    let mut run = ChildGuard::spawn("run", &mut command, &dir);
    let pid: u32 = wait_for_line(&mut run, &pid_file).parse().unwrap();

    // A Rust client queues behind the run's hold.
    let waiter = server.client();
    assert!(held_by_process(&waiter, "doomed", run.id()));
    let mut pending = waiter
        .start_acquire("doomed", AcquireOptions::default(), true)
        .unwrap();
    assert!(pending.wait_queued(WAIT_MAX).unwrap(), "no QUEUED reply");
    assert!(
        held_by_process(&waiter, "doomed", run.id()),
        "granted before the kill"
    );

    run.kill();
    let token = bounded("the grant after kill -9", move || {
        pending.wait().map(|guard| guard.token())
    })
    .expect("the waiter gets the lock");
    assert!(token > 0);
    // PR_SET_PDEATHSIG: the command died with its parent.
    wait_until("the command to die with `livelock run`", || {
        process_gone(pid)
    });
}

/// Shuts the in-process server down (bounded) while clients are connected.
fn shut_down(server: &mut TestServer) {
    let server = server.server.take().expect("running");
    bounded("server shutdown", move || {
        server.shutdown();
        server.join()
    })
    .expect("server shut down cleanly");
}

#[test]
fn losing_the_connection_stops_the_command() {
    let mut server = TestServer::start(2);
    let dir = ScratchDir::new("run-conn-lost");
    let pid_file = dir.join("pid");
    let mut command = run_command(&server, &[], "fragile");
    sh_with_file(&mut command, r#"echo $$ > "$1"; exec sleep 60"#, &pid_file);
    let mut run = ChildGuard::spawn("run", &mut command, &dir);
    let pid: u32 = wait_for_line(&mut run, &pid_file).parse().unwrap();
    assert!(held_by_process(&server.client(), "fragile", run.id()));

    shut_down(&mut server);
    let status = run.wait_exit();
    let stderr = run.stderr();
    // The lock was lost while the command ran: 79, whatever the command's
    // own status (SIGTERM ended `sleep`).
    assert_eq!(status.code(), Some(79), "stderr: {stderr}");
    assert!(
        stderr.contains("lock fragile lost") && stderr.contains("stopping the command"),
        "unclear message: {stderr:?}"
    );
    wait_until("the command to be gone", || process_gone(pid));
}

#[test]
fn a_command_that_ignores_sigterm_is_killed_after_kill_after() {
    let mut server = TestServer::start(2);
    let dir = ScratchDir::new("run-kill-after");
    let pid_file = dir.join("pid");
    let mut command = run_command(&server, &["--kill-after", "300ms"], "stubborn");
    // `exec` keeps the ignored SIGTERM: only SIGKILL ends this sleep.
    sh_with_file(
        &mut command,
        r#"trap "" TERM; echo $$ > "$1"; exec sleep 60"#,
        &pid_file,
    );
    let mut run = ChildGuard::spawn("run", &mut command, &dir);
    let pid: u32 = wait_for_line(&mut run, &pid_file).parse().unwrap();
    assert!(held_by_process(&server.client(), "stubborn", run.id()));

    let start = Instant::now();
    shut_down(&mut server);
    let status = run.wait_exit();
    let elapsed = start.elapsed();
    // Lost while it ran (79); the SIGKILL came after --kill-after.
    assert_eq!(status.code(), Some(79), "stderr: {}", run.stderr());
    assert!(
        elapsed >= Duration::from_millis(290),
        "SIGKILL after {elapsed:?}"
    );
    wait_until("the command to be gone", || process_gone(pid));
}

#[test]
fn shared_runs_hold_at_once() {
    let server = TestServer::start(2);
    let dir = ScratchDir::new("run-shared");
    // Each command writes its token, then runs until its stdin closes.
    let mut runs = Vec::new();
    let mut tokens = Vec::new();
    for i in 0..2 {
        let fence = dir.join(&format!("fence{i}"));
        // The second must get in at once: the first still holds.
        let options: &[&str] = if i == 0 {
            &["--shared"]
        } else {
            &["--shared", "--wait", "0"]
        };
        let mut command = run_command(&server, options, "readers");
        sh_with_file(
            &mut command,
            r#"echo "$LIVELOCK_FENCE" > "$1"; exec cat > /dev/null"#,
            &fence,
        );
        command.stdin(Stdio::piped());
        let mut run = ChildGuard::spawn(&format!("run{i}"), &mut command, &dir);
        tokens.push(wait_for_line(&mut run, &fence).parse::<u64>().unwrap());
        runs.push(run);
    }
    assert!(tokens[1] > tokens[0], "tokens {tokens:?}");

    let client = server.client();
    let record = client.inspect("readers").unwrap().expect("held");
    assert_eq!(record.mode, Mode::Shared);
    let mut held: Vec<u64> = record.holders.iter().map(|h| h.token).collect();
    held.sort_unstable();
    assert_eq!(held, tokens, "both runs hold at once");
    assert!(
        client.try_acquire("readers").unwrap().is_none(),
        "an exclusive hold got in beside two shared ones"
    );

    for run in &mut runs {
        drop(run.child().stdin.take());
        let status = run.wait_exit();
        assert_eq!(status.code(), Some(0), "stderr: {}", run.stderr());
    }
    assert!(client.try_acquire("readers").unwrap().is_some());
}

/// COMMAND for the process-tree tests: a shell with two background sleeps;
/// writes "SHELL BG1 BG2" (pids) to "$1", then waits for them.
const TREE: &str =
    r#"sleep 30 & a=$!; sleep 30 & echo "$$ $a $!" > "$1.tmp"; mv "$1.tmp" "$1"; wait"#;

/// The pids TREE wrote.
fn tree_pids(run: &mut ChildGuard, file: &Path) -> Vec<u32> {
    let line = wait_for_line(run, file);
    let pids: Vec<u32> = line
        .split_whitespace()
        .map(|pid| pid.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 3, "{line:?}");
    pids
}

fn send_signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) on a child of this test, not yet reaped.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, signal) }, 0);
}

#[test]
fn every_stop_signal_ends_the_whole_tree_of_the_command() {
    let server = TestServer::start(2);
    let dir = ScratchDir::new("run-tree");
    let client = server.client();
    for (signal, code) in [
        (libc::SIGTERM, Some(143)),
        (libc::SIGHUP, Some(129)),
        (libc::SIGINT, Some(130)),
        (libc::SIGKILL, None),
    ] {
        let pid_file = dir.join(&format!("pids{signal}"));
        let mut command = run_command(&server, &[], "tree");
        sh_with_file(&mut command, TREE, &pid_file);
        let mut run = ChildGuard::spawn(&format!("run{signal}"), &mut command, &dir);
        let pids = tree_pids(&mut run, &pid_file);
        assert!(held_by_process(&client, "tree", run.id()));

        send_signal(run.id(), signal);
        let status = run.wait_exit();
        assert_eq!(status.code(), code, "signal {signal}: {}", run.stderr());
        // Background jobs of a script ignore SIGINT: they are ended as what
        // the command left running (SIGTERM) after the shell is gone.
        wait_until(
            &format!("every process of the command to end after signal {signal}"),
            || pids.iter().all(|&pid| process_gone(pid)),
        );
        wait_until(
            &format!("the lock to be free after signal {signal}"),
            || {
                client
                    .try_acquire("tree")
                    .unwrap()
                    .map(|guard| guard.release().unwrap())
                    .is_some()
            },
        );
    }
}

/// `sh -c 'trap "" SIGNAL; exec COMMAND...'`: runs `inner` with SIGNAL ignored.
fn ignoring(signal: &str, inner: &Command) -> Command {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(format!(r#"trap "" {signal}; exec "$@""#))
        .arg("sh")
        .arg(inner.get_program())
        .args(inner.get_args());
    for (key, value) in inner.get_envs() {
        match value {
            Some(value) => command.env(key, value),
            None => command.env_remove(key),
        };
    }
    command
}

/// Whether the process `pid` ignores `signal` (SigIgn in /proc).
fn ignores(pid: u32, signal: libc::c_int) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let mask = status
        .lines()
        .find_map(|line| line.strip_prefix("SigIgn:"))
        .map(|hex| u64::from_str_radix(hex.trim(), 16).unwrap())
        .unwrap();
    mask & (1 << (signal - 1)) != 0
}

#[test]
fn a_signal_ignored_at_start_stays_ignored_as_under_nohup() {
    let server = TestServer::start(2);
    let dir = ScratchDir::new("run-nohup");
    let started = dir.join("started");
    let mut inner = run_command(&server, &[], "nohup");
    // The command hangs itself up: it must still ignore SIGHUP.
    sh_with_file(
        &mut inner,
        r#"kill -HUP $$; echo started > "$1"; read line; echo survived"#,
        &started,
    );
    let mut command = ignoring("HUP", &inner);
    command.stdin(Stdio::piped());
    let mut run = ChildGuard::spawn("run", &mut command, &dir);
    wait_for_line(&mut run, &started);
    assert!(
        ignores(run.id(), libc::SIGHUP),
        "livelock run catches the SIGHUP it was started with ignored"
    );
    send_signal(run.id(), libc::SIGHUP);
    drop(run.child().stdin.take());
    let status = run.wait_exit();
    assert_eq!(status.code(), Some(0), "stderr: {}", run.stderr());
    assert_eq!(run.stdout(), "survived\n");
}

/// A TCP proxy on 127.0.0.1 between `livelock run` and the server that can
/// blackhole: stop forwarding in both directions, keeping every socket open.
struct Proxy {
    addr: SocketAddr,
    blackholed: Arc<AtomicBool>,
    /// The proxy's connections to the server.
    upstream: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(server: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let blackholed = Arc::new(AtomicBool::new(false));
        let upstream = Arc::new(Mutex::new(Vec::new()));
        let (holes, ups) = (blackholed.clone(), upstream.clone());
        // Ends with the test process (the listener is never closed).
        std::thread::spawn(move || {
            for down in listener.incoming() {
                let Ok(down) = down else { return };
                let Ok(up) = TcpStream::connect_timeout(&server, WAIT_MAX) else {
                    continue;
                };
                ups.lock().unwrap().push(up.try_clone().unwrap());
                let (down2, up2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
                let (hole, hole2) = (holes.clone(), holes.clone());
                std::thread::spawn(move || pump(down, up, &hole));
                std::thread::spawn(move || pump(up2, down2, &hole2));
            }
        });
        Proxy {
            addr,
            blackholed,
            upstream,
        }
    }

    fn blackhole(&self) {
        self.blackholed.store(true, Ordering::SeqCst);
    }

    /// Closes the connections to the server, as the server itself would on
    /// finding its peer dead.
    fn close_upstream(&self) {
        for stream in self.upstream.lock().unwrap().iter() {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

/// Copies `from` to `to` until either ends; while blackholed, what is read
/// is dropped and an end is not passed on.
fn pump(mut from: TcpStream, mut to: TcpStream, blackholed: &AtomicBool) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                if !blackholed.load(Ordering::SeqCst) {
                    let _ = to.shutdown(Shutdown::Write);
                }
                return;
            }
            Ok(n) => {
                if !blackholed.load(Ordering::SeqCst) && to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// What `livelock run` documents: with no answer from the server, COMMAND's
/// group is SIGKILLed at the latest 4 s (+ grace) after the send of the last
/// answered PING; the server's default dead-peer detection takes 5 s.
const RUN_LOSS_BOUND: Duration = Duration::from_secs(4);
const SERVER_DEAD_PEER_MIN: Duration = Duration::from_secs(5);

#[test]
fn a_partitioned_run_ends_the_command_before_the_server_can_free_the_lock() {
    let server = TestServer::start(2);
    let proxy = Proxy::start(server.addr);
    let dir = ScratchDir::new("run-partition");
    let pid_file = dir.join("pids");
    let mut command = livelock_bin();
    // The whole tree ignores SIGTERM, and --kill-after is 10 s: only the
    // heartbeat's own deadline can end it in time.
    command
        .arg("run")
        .arg("--server")
        .arg(proxy.addr.to_string())
        .arg("partitioned")
        .arg("--");
    sh_with_file(&mut command, &format!(r#"trap "" TERM; {TREE}"#), &pid_file);
    let mut run = ChildGuard::spawn("run", &mut command, &dir);
    let pids = tree_pids(&mut run, &pid_file);

    // A second client queues for the lock and notes when it gets it.
    let waiter = server.client();
    assert!(held_by_process(&waiter, "partitioned", run.id()));
    let mut pending = waiter
        .start_acquire("partitioned", AcquireOptions::default(), true)
        .unwrap();
    assert!(pending.wait_queued(WAIT_MAX).unwrap(), "no QUEUED reply");
    let (granted_tx, granted_rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let granted = pending.wait().map(|guard| (Instant::now(), guard.token()));
        let _ = granted_tx.send(granted);
    });

    let blackholed_at = Instant::now();
    proxy.blackhole();
    // The server cannot find the run dead before SERVER_DEAD_PEER_MIN has
    // passed since it last heard from it: this proxy keeps its sockets open,
    // so the test plays that part, at the earliest moment.
    let server_gives_up_at = blackholed_at + SERVER_DEAD_PEER_MIN;
    let mut gone_at = None;
    let mut closed = false;
    while gone_at.is_none() || !closed {
        let now = Instant::now();
        if gone_at.is_none() && pids.iter().all(|&pid| process_gone(pid)) {
            gone_at = Some(now);
        }
        if !closed && now >= server_gives_up_at {
            proxy.close_upstream();
            closed = true;
        }
        assert!(
            now - blackholed_at < WAIT_MAX,
            "the partitioned command still runs {WAIT_MAX:?} after the partition; stderr: {}",
            run.stderr()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let gone_at = gone_at.unwrap();
    let (granted_at, _) = granted_rx
        .recv_timeout(WAIT_MAX)
        .expect("the waiter is granted the lock")
        .expect("the grant");
    assert!(
        gone_at - blackholed_at <= RUN_LOSS_BOUND,
        "the command ended {:?} after the partition",
        gone_at - blackholed_at
    );
    assert!(
        gone_at < granted_at,
        "the waiter got the lock {:?} before the partitioned command ended",
        gone_at - granted_at
    );
    let status = run.wait_exit();
    let stderr = run.stderr();
    assert_eq!(status.code(), Some(79), "stderr: {stderr}");
    assert!(
        stderr.contains("lock partitioned lost"),
        "unclear message: {stderr:?}"
    );
}

// ---- help -----------------------------------------------------------------

#[test]
fn help_names_the_commands_and_the_run_options() {
    let dir = ScratchDir::new("help");
    let (code, stdout, stderr) = run_to_end("help", livelock_bin().arg("--help"), &dir);
    assert_eq!(code, Some(0), "stderr: {stderr}");
    for command in ["server", "run", "list", "inspect", "signal", "stats"] {
        assert!(
            stdout
                .lines()
                .any(|line| line.trim_start().starts_with(command)),
            "`livelock --help` does not list {command}:\n{stdout}"
        );
    }

    let (code, stdout, stderr) =
        run_to_end("run-help", livelock_bin().args(["run", "--help"]), &dir);
    assert_eq!(code, Some(0), "stderr: {stderr}");
    for option in ["--wait", "--shared", "--grace", "--kill-after", "--server"] {
        assert!(
            stdout.contains(option),
            "`livelock run --help` does not mention {option}:\n{stdout}"
        );
    }
}

// ---- operator commands ----------------------------------------------------

/// Runs `livelock ARGS... --server ADDR` (bounded); returns (code, stdout, stderr).
fn admin(
    server: &TestServer,
    dir: &ScratchDir,
    what: &str,
    args: &[&str],
) -> (Option<i32>, String, String) {
    let mut command = livelock_bin();
    command
        .args(args)
        .arg("--server")
        .arg(server.addr.to_string());
    run_to_end(what, &mut command, dir)
}

/// `admin` that must succeed; returns stdout.
fn admin_ok(server: &TestServer, dir: &ScratchDir, what: &str, args: &[&str]) -> String {
    let (code, stdout, stderr) = admin(server, dir, what, args);
    assert_eq!(code, Some(0), "livelock {args:?} failed: {stderr}");
    stdout
}

#[test]
fn list_inspect_signal_and_stats() {
    let server = TestServer::start(2);
    let dir = ScratchDir::new("admin");
    // A name that JSON must escape.
    let name = r#"job "nightly" \ 1"#;
    let holder = server.client_with(&ClientOptions {
        client_name: "admin-test-holder".into(),
        ..ClientOptions::default()
    });
    let guard = holder.acquire(name).unwrap();
    let reader = holder.acquire_shared("job-reader").unwrap();
    let waiter = server.client();
    let mut pending = waiter
        .start_acquire(name, AcquireOptions::default(), true)
        .unwrap();
    assert!(pending.wait_queued(WAIT_MAX).unwrap());

    // list --json: both locks, sorted by name (' ' < '-').
    let json = Json::parse(&admin_ok(&server, &dir, "list", &["list", "--json"]));
    assert_eq!(json.get("truncated"), &Json::Bool(false));
    let locks = json.get("locks").array();
    assert_eq!(locks.len(), 2, "{json:?}");
    let record = &locks[0];
    assert_eq!(record.get("name").str(), name);
    assert_eq!(record.get("mode").str(), "exclusive");
    assert_eq!(record.get("waiters").u64(), 1);
    let holders = record.get("holders").array();
    assert_eq!(holders.len(), 1);
    assert_eq!(
        holders[0].get("token").str().parse::<u64>().unwrap(),
        guard.token()
    );
    assert_eq!(holders[0].get("client").str(), "admin-test-holder");
    assert_eq!(
        holders[0].get("session").str().parse::<u64>().unwrap(),
        holder.session_id()
    );
    assert!(holders[0].get("since_unix_ms").u64() > 0);
    assert_eq!(locks[1].get("name").str(), "job-reader");
    assert_eq!(locks[1].get("mode").str(), "shared");
    assert_eq!(locks[1].get("waiters").u64(), 0);
    assert_eq!(
        locks[1].get("holders").array()[0]
            .get("token")
            .str()
            .parse::<u64>()
            .unwrap(),
        reader.token()
    );

    // A glob, and a limit that cuts the list.
    let json = Json::parse(&admin_ok(
        &server,
        &dir,
        "list-glob",
        &["list", "--json", "job-*"],
    ));
    let locks = json.get("locks").array();
    assert_eq!(locks.len(), 1);
    assert_eq!(locks[0].get("name").str(), "job-reader");
    let json = Json::parse(&admin_ok(
        &server,
        &dir,
        "list-limit",
        &["list", "--json", "--limit", "1"],
    ));
    assert_eq!(json.get("locks").array().len(), 1);
    assert_eq!(json.get("truncated"), &Json::Bool(true));

    // The table.
    let table = admin_ok(&server, &dir, "list-table", &["list"]);
    for needle in [
        name,
        "exclusive",
        "shared",
        "admin-test-holder",
        &guard.token().to_string(),
    ] {
        assert!(table.contains(needle), "table lacks {needle:?}:\n{table}");
    }

    // inspect.
    let json = Json::parse(&admin_ok(
        &server,
        &dir,
        "inspect",
        &["inspect", "--json", name],
    ));
    assert_eq!(json.get("name").str(), name);
    assert_eq!(json.get("mode").str(), "exclusive");
    assert_eq!(json.get("waiters").u64(), 1);
    assert_eq!(
        json.get("holders").array()[0]
            .get("token")
            .str()
            .parse::<u64>()
            .unwrap(),
        guard.token()
    );
    assert_eq!(json.get("signals").array().len(), 0);
    let free = admin_ok(
        &server,
        &dir,
        "inspect-free",
        &["inspect", "--json", "free"],
    );
    assert_eq!(Json::parse(&free), Json::Null);
    let free = admin_ok(&server, &dir, "inspect-free-table", &["inspect", "free"]);
    assert!(free.contains("free is not held"), "{free:?}");

    // signal: the holder is told.
    let out = admin_ok(
        &server,
        &dir,
        "signal",
        &["signal", "--json", name, "reload"],
    );
    assert_eq!(
        Json::parse(&out),
        Json::Object(vec![("signalled".into(), Json::Bool(true))])
    );
    match holder.events().recv_timeout(WAIT_MAX) {
        Ok(Event::Signal {
            name: signalled,
            signal,
        }) => {
            assert_eq!(signalled, name.as_bytes());
            assert_eq!(signal, b"reload");
        }
        Ok(other) => panic!("unexpected event {other:?}"),
        Err(e) => panic!("no Event::Signal: {e}"),
    }
    let json = Json::parse(&admin_ok(
        &server,
        &dir,
        "inspect-signalled",
        &["inspect", "--json", name],
    ));
    assert_eq!(
        json.get("signals").array(),
        &[Json::String("reload".into())]
    );
    let (code, _, stderr) = admin(&server, &dir, "signal-free", &["signal", "free", "reload"]);
    assert_eq!(code, Some(1), "signalling a free lock");
    assert!(stderr.contains("not held"), "unclear message: {stderr:?}");

    // stats: 2 locks, 1 waiter; holder, waiter and the CLI's own session.
    let json = Json::parse(&admin_ok(&server, &dir, "stats", &["stats", "--json"]));
    assert_eq!(json.get("locks").u64(), 2, "{json:?}");
    assert_eq!(json.get("waiters").u64(), 1);
    assert_eq!(json.get("sessions_attached").u64(), 3);
    assert_eq!(json.get("sessions_detached").u64(), 0);
    assert!(json.get("connections").u64() >= 3);
    let table = admin_ok(&server, &dir, "stats-table", &["stats"]);
    assert!(table.contains("locks held"), "{table}");

    // The waiter is granted when the holder lets go.
    drop(guard);
    let granted = bounded("the waiter's grant", move || {
        pending.wait().map(|guard| guard.token())
    });
    assert!(granted.is_ok());
}

#[test]
fn admin_commands_fail_cleanly_without_a_server() {
    let dir = ScratchDir::new("admin-down");
    // A port nobody listens on: bound, then closed.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut command = livelock_bin();
    command.args(["stats", "--server"]).arg(addr.to_string());
    let (code, _, stderr) = run_to_end("stats", &mut command, &dir);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("cannot open a session"),
        "unclear message: {stderr:?}"
    );

    let mut command = livelock_bin();
    command
        .args(["run", "--server"])
        .arg(addr.to_string())
        .args(["nowhere", "--", "true"]);
    let (code, _, stderr) = run_to_end("run", &mut command, &dir);
    assert_eq!(code, Some(69), "server down is not 'try again': {stderr}");
}

/// Issue 11, item 1: 75 only when the lock was not obtained in time; a
/// distinct status for every other failure, so that a script retrying on
/// 75 never spins on a configuration error.
#[test]
fn run_exit_statuses_tell_the_failures_apart() {
    let server = TestServer::start_with(1, |config| config.password = Some(b"pw".to_vec()));
    let dir = ScratchDir::new("run-exits");
    let run = |options: &[&str], name: &str, command: &[&str]| {
        let mut cmd = livelock_bin();
        cmd.args(["run", "--server"])
            .arg(server.addr.to_string())
            .args(options)
            .arg(name)
            .arg("--")
            .args(command);
        run_to_end("run", &mut cmd, &dir)
    };
    let with_pw = ["--password", "pw"];
    // Usage errors: 2, and a long name is not echoed whole.
    let long = "n".repeat(1100);
    let (code, _, stderr) = run(&with_pw, &long, &["true"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.len() < 300,
        "the name echoed whole: {} bytes",
        stderr.len()
    );
    let (code, _, stderr) = run(&["--password", "pw", "--grace", "2h"], "x", &["true"]);
    assert_eq!(code, Some(2), "{stderr}");
    // Authentication: 77.
    let (code, _, stderr) = run(&["--password", "wrong"], "x", &["true"]);
    assert_eq!(code, Some(77), "{stderr}");
    // COMMAND not found: 127; not executable: 126 (as shells do).
    let (code, _, stderr) = run(&with_pw, "x", &["/nonexistent/command"]);
    assert_eq!(code, Some(127), "{stderr}");
    let (code, _, stderr) = run(&with_pw, "x", &[dir.path().to_str().unwrap()]);
    assert_eq!(code, Some(126), "{stderr}");
    // COMMAND's own status passes through.
    let (code, _, _) = run(&with_pw, "x", &["sh", "-c", "exit 3"]);
    assert_eq!(code, Some(3));
    // Not obtained in time: 75.
    let holder = server.client_with(&ClientOptions {
        password: Some("pw".into()),
        ..ClientOptions::default()
    });
    holder.acquire("x").unwrap().forget();
    let (code, _, stderr) = run(&["--password", "pw", "--wait", "0"], "x", &["true"]);
    assert_eq!(code, Some(75), "{stderr}");
}

// ---- server start-up refusals ---------------------------------------------

#[test]
fn server_refuses_a_public_address_without_a_password() {
    let dir = ScratchDir::new("server-public");
    let mut command = livelock_bin();
    command.args(["server", "--listen", "0.0.0.0:0", "--no-dump"]);
    // Exits at once; a server that started serving fails here (and is killed).
    let (code, _, stderr) = run_to_end("server", &mut command, &dir);
    assert_eq!(code, Some(2), "stderr: {stderr}");
    assert!(stderr.contains("password"), "unclear message: {stderr:?}");
    assert!(!stderr.contains("listening"), "it served: {stderr:?}");
}

#[test]
fn server_names_a_bad_boolean_variable() {
    let dir = ScratchDir::new("server-bad-bool");
    let mut command = livelock_bin();
    command
        .args(["server", "--port", "0", "--no-dump"])
        .env("LIVELOCK_SHUTDOWN_SUPPORT", "maybe");
    let (code, _, stderr) = run_to_end("server", &mut command, &dir);
    assert!(
        code.is_some_and(|code| code != 0),
        "exit {code:?}: {stderr}"
    );
    assert!(
        stderr.contains("LIVELOCK_SHUTDOWN_SUPPORT"),
        "the variable is not named: {stderr:?}"
    );
    assert!(!stderr.contains("listening"), "it served: {stderr:?}");
}

// ---- a small JSON reader, enough to check the CLI's output ----------------

#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    /// Kept as text: tokens and ids are u64, beyond f64's exact range.
    Number(String),
    String(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    /// Parses one complete JSON document (panics on anything else).
    fn parse(text: &str) -> Json {
        let mut parser = JsonParser { text, pos: 0 };
        let value = parser.value();
        parser.skip_space();
        assert_eq!(
            parser.pos,
            text.len(),
            "trailing bytes after JSON: {text:?}"
        );
        value
    }

    fn get(&self, key: &str) -> &Json {
        match self {
            Json::Object(fields) => {
                &fields
                    .iter()
                    .find(|(k, _)| k == key)
                    .unwrap_or_else(|| panic!("no {key:?} in {self:?}"))
                    .1
            }
            _ => panic!("not an object: {self:?}"),
        }
    }

    fn str(&self) -> &str {
        match self {
            Json::String(s) => s,
            _ => panic!("not a string: {self:?}"),
        }
    }

    fn u64(&self) -> u64 {
        match self {
            Json::Number(n) => n.parse().unwrap_or_else(|_| panic!("not a u64: {n}")),
            _ => panic!("not a number: {self:?}"),
        }
    }

    fn array(&self) -> &[Json] {
        match self {
            Json::Array(items) => items,
            _ => panic!("not an array: {self:?}"),
        }
    }
}

struct JsonParser<'a> {
    text: &'a str,
    pos: usize,
}

impl JsonParser<'_> {
    fn fail(&self, what: &str) -> ! {
        panic!("bad JSON at byte {} ({what}): {:?}", self.pos, self.text)
    }

    fn skip_space(&mut self) {
        let rest = &self.text[self.pos..];
        self.pos += rest.len() - rest.trim_start_matches([' ', '\t', '\n', '\r']).len();
    }

    fn peek(&self) -> Option<char> {
        self.text[self.pos..].chars().next()
    }

    fn next(&mut self) -> char {
        let c = self.peek().unwrap_or_else(|| self.fail("unexpected end"));
        self.pos += c.len_utf8();
        c
    }

    fn expect(&mut self, word: &str) {
        if !self.text[self.pos..].starts_with(word) {
            self.fail(&format!("expected {word}"));
        }
        self.pos += word.len();
    }

    fn value(&mut self) -> Json {
        self.skip_space();
        match self.peek() {
            Some('n') => {
                self.expect("null");
                Json::Null
            }
            Some('t') => {
                self.expect("true");
                Json::Bool(true)
            }
            Some('f') => {
                self.expect("false");
                Json::Bool(false)
            }
            Some('"') => Json::String(self.string()),
            Some('[') => {
                self.next();
                let mut items = Vec::new();
                self.skip_space();
                if self.peek() == Some(']') {
                    self.next();
                    return Json::Array(items);
                }
                loop {
                    items.push(self.value());
                    self.skip_space();
                    match self.next() {
                        ',' => {}
                        ']' => return Json::Array(items),
                        _ => self.fail("expected , or ]"),
                    }
                }
            }
            Some('{') => {
                self.next();
                let mut fields = Vec::new();
                self.skip_space();
                if self.peek() == Some('}') {
                    self.next();
                    return Json::Object(fields);
                }
                loop {
                    self.skip_space();
                    let key = self.string();
                    self.skip_space();
                    self.expect(":");
                    fields.push((key, self.value()));
                    self.skip_space();
                    match self.next() {
                        ',' => {}
                        '}' => return Json::Object(fields),
                        _ => self.fail("expected , or }"),
                    }
                }
            }
            Some(c) if c == '-' || c.is_ascii_digit() => {
                let rest = &self.text[self.pos..];
                let len = rest
                    .find(|c: char| !(c.is_ascii_digit() || "+-.eE".contains(c)))
                    .unwrap_or(rest.len());
                self.pos += len;
                Json::Number(rest[..len].to_string())
            }
            _ => self.fail("expected a value"),
        }
    }

    fn string(&mut self) -> String {
        self.expect("\"");
        let mut out = String::new();
        loop {
            match self.next() {
                '"' => return out,
                '\\' => match self.next() {
                    '"' => out.push('"'),
                    '\\' => out.push('\\'),
                    '/' => out.push('/'),
                    'b' => out.push('\u{8}'),
                    'f' => out.push('\u{c}'),
                    'n' => out.push('\n'),
                    'r' => out.push('\r'),
                    't' => out.push('\t'),
                    'u' => {
                        let hex = self.text.get(self.pos..self.pos + 4).unwrap_or("");
                        let code = u32::from_str_radix(hex, 16)
                            .unwrap_or_else(|_| self.fail("bad \\u escape"));
                        self.pos += 4;
                        out.push(char::from_u32(code).unwrap_or_else(|| self.fail("surrogate")));
                    }
                    _ => self.fail("bad escape"),
                },
                c if (c as u32) < 0x20 => self.fail("raw control character in a string"),
                c => out.push(c),
            }
        }
    }
}

#[test]
fn the_json_reader_reads_json() {
    let json =
        Json::parse(r#" {"a": [1, -2.5e3, "x\"\\\u0041\n"], "b": null, "c": {}, "d": [] } "#);
    assert_eq!(json.get("a").array()[0].u64(), 1);
    assert_eq!(json.get("a").array()[1], Json::Number("-2.5e3".into()));
    assert_eq!(json.get("a").array()[2].str(), "x\"\\A\n");
    assert_eq!(json.get("b"), &Json::Null);
    assert_eq!(json.get("c"), &Json::Object(vec![]));
    assert_eq!(json.get("d").array(), &[]);
}

/// Issue 11, item 2: one duration syntax for every flag and variable
/// (`500ms`, `5s`, `1m`, `1h30m`, plain numbers in the flag's unit, and
/// `forever` where the help says so).
#[test]
fn durations_have_one_syntax_everywhere() {
    let dir = ScratchDir::new("durations");
    let mut command = livelock_bin();
    command
        .args(["server", "--port", "0", "--no-dump", "--data-dir"])
        .arg(dir.path())
        .args(["--keepalive-time", "2s", "--keepalive-interval", "500ms"])
        .args(["--user-timeout", "5", "--release-all-timeout", "1m30s"])
        .env("LIVELOCK_TAKEOVER_WAIT", "1s");
    let mut server = ChildGuard::spawn("server", &mut command, &dir);
    server.wait_for("listening", |s| {
        s.stderr().contains("listening on").then_some(())
    });
    drop(server);

    let mut command = livelock_bin();
    command.args([
        "server",
        "--port",
        "0",
        "--no-dump",
        "--keepalive-time",
        "5x",
    ]);
    let (code, _, stderr) = run_to_end("server", &mut command, &dir);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("keepalive-time") && stderr.contains("unit"),
        "{stderr}"
    );

    let server = TestServer::start(1);
    for wait in ["forever", "1h30m", "2.5s", "0"] {
        let mut command = run_command(&server, &["--wait", wait], "durations");
        command.arg("true");
        let (code, _, stderr) = run_to_end("run", &mut command, &dir);
        assert_eq!(code, Some(0), "--wait {wait}: {stderr}");
    }
}

/// Fencing tokens and session ids pass 2^53 (tokens start near 1.2e17 on a
/// server without a durable mark), where jq 1.6 and JavaScript round
/// numbers: `--json` prints them as strings, and a real jq reads them back
/// digit for digit (issue 11, item 7).
#[test]
fn json_tokens_survive_jq() {
    let server = TestServer::start(1);
    let dir = ScratchDir::new("jq");
    let holder = server.client();
    let guard = holder.acquire("jq-lock").unwrap();
    assert!(guard.token() > 1 << 53, "the test needs a token past 2^53");
    let json = admin_ok(&server, &dir, "inspect", &["inspect", "--json", "jq-lock"]);
    let mut jq = std::process::Command::new("jq")
        .args(["-r", ".holders[0].token, .holders[0].session"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("jq is installed (.ci/run installs it)");
    use std::io::Write as _;
    jq.stdin.take().unwrap().write_all(json.as_bytes()).unwrap();
    let out = jq.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [guard.token().to_string(), holder.session_id().to_string()]
    );
}

/// Shell completions and the manual page come from the same clap
/// definitions as `--help` (issue 11, item 12): bash really completes the
/// subcommands and a server flag from the script, and the page lists every
/// subcommand.
#[test]
fn completions_and_the_manual_page_are_generated() {
    let dir = ScratchDir::new("completions");
    let bin = env!("CARGO_BIN_EXE_livelock");
    let complete = |words: &str, cword: usize, cur: &str, prev: &str| {
        let script = format!(
            "source <('{bin}' completions bash); COMP_WORDS=({words}); COMP_CWORD={cword}; \
             _livelock livelock '{cur}' '{prev}'; echo \"${{COMPREPLY[@]}}\""
        );
        let out = std::process::Command::new("bash")
            .args(["-c", &script])
            .current_dir(dir.path())
            .output()
            .expect("bash runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let subcommands = complete("livelock ''", 1, "", "livelock");
    for name in [
        "server",
        "run",
        "list",
        "inspect",
        "signal",
        "stats",
        "completions",
        "man",
    ] {
        assert!(
            subcommands.split_whitespace().any(|w| w == name),
            "{name}: {subcommands}"
        );
    }
    assert_eq!(
        complete("livelock server --dur", 2, "--dur", "server").trim(),
        "--durability"
    );

    let mut command = livelock_bin();
    command.arg("man");
    let (code, page, stderr) = run_to_end("man", &mut command, &dir);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(page.contains(".TH livelock 1"), "{page}");
    for name in ["server", "run", "list", "inspect", "signal", "stats"] {
        assert!(
            page.contains(&format!("livelock\\-{name}(1)")),
            "{name}: {page}"
        );
    }
    // Every page the main one points to is written with --dir.
    let pages = dir.join("man1");
    let mut command = livelock_bin();
    command.arg("man").arg("--dir").arg(&pages);
    std::fs::create_dir_all(&pages).unwrap();
    let (code, _, stderr) = run_to_end("man --dir", &mut command, &dir);
    assert_eq!(code, Some(0), "{stderr}");
    let server_page = std::fs::read_to_string(pages.join("livelock-server.1")).unwrap();
    assert!(server_page.contains("durability"), "{server_page}");
    assert!(pages.join("livelock-run.1").is_file());
}

/// flock(1) habits (issue 11, item 4): `-c 'shell command'`, `-n` (do not
/// wait), `-w DURATION`, `-s` (shared); `-c` and a COMMAND after `--` are
/// one or the other.
#[test]
fn flock_style_short_flags() {
    let server = TestServer::start(1);
    let dir = ScratchDir::new("short-flags");
    let base = |options: &[&str]| {
        let mut command = livelock_bin();
        command
            .arg("run")
            .arg("--server")
            .arg(server.addr.to_string())
            .args(options);
        command
    };
    // -c runs a shell command with the fence in the environment; -s shares.
    let mut command = base(&["-s", "-c", "echo fence=$LIVELOCK_FENCE", "short-flags"]);
    let (code, stdout, stderr) = run_to_end("-c", &mut command, &dir);
    assert_eq!(code, Some(0), "{stderr}");
    let fence: u64 = stdout
        .trim()
        .strip_prefix("fence=")
        .unwrap()
        .parse()
        .unwrap();
    assert!(fence > 0);

    // Held by someone else: -n and -w 0 give up at once with 75.
    let holder = server.client();
    let guard = holder.acquire("short-flags").unwrap();
    for options in [&["-n"][..], &["-w", "0"][..], &["-n", "-s"][..]] {
        let mut command = base(options);
        command.args(["short-flags", "--", "true"]);
        let (code, _, stderr) = run_to_end("-n", &mut command, &dir);
        assert_eq!(code, Some(75), "{options:?}: {stderr}");
    }
    drop(guard);

    // -c and a COMMAND together, or neither: a usage error (2).
    let mut command = base(&["-c", "true", "short-flags", "--", "true"]);
    assert_eq!(run_to_end("both", &mut command, &dir).0, Some(2));
    let mut command = base(&["short-flags"]);
    assert_eq!(run_to_end("neither", &mut command, &dir).0, Some(2));
    let mut command = base(&["-n", "-w", "5s", "short-flags", "--", "true"]);
    assert_eq!(run_to_end("-n and -w", &mut command, &dir).0, Some(2));
    // A command without `--` gets a hint that says what to type.
    let mut command = base(&["short-flags", "echo", "hi"]);
    let (code, _, stderr) = run_to_end("no --", &mut command, &dir);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("hint: put `--`"), "{stderr}");
}

/// A bad value from the environment is reported under the variable's name
/// (it was never typed as a flag); a bad flag still under the flag's
/// (issue 11, item 10).
#[test]
fn errors_name_the_variable_that_was_set() {
    let dir = ScratchDir::new("env-names");
    for (variable, value) in [
        ("LIVELOCK_PORT", "abc"),
        ("LIVELOCK_THREADS", "x"),
        ("LIVELOCK_TCP_KEEPALIVE_TIME", "5x"),
        ("LIVELOCK_DURABILITY", "disk"),
    ] {
        let mut command = livelock_bin();
        command.arg("server").env(variable, value);
        if variable != "LIVELOCK_DURABILITY" {
            // (should the value be taken, nothing is written to disk)
            command.args(["--durability", "memory"]);
        }
        let (code, _, stderr) = run_to_end(variable, &mut command, &dir);
        assert_eq!(code, Some(2), "{variable}: {stderr}");
        assert!(
            stderr.contains(variable) && stderr.contains(value),
            "{variable}: {stderr}"
        );
    }
    let mut command = livelock_bin();
    command.args(["server", "--port", "abc"]);
    let (code, _, stderr) = run_to_end("--port", &mut command, &dir);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("--port") && !stderr.contains("LIVELOCK_PORT"),
        "{stderr}"
    );
    // Out of range after parsing: the message names both.
    let mut command = livelock_bin();
    command
        .args(["server", "--durability", "memory"])
        .env("LIVELOCK_THREADS", "0");
    let (code, _, stderr) = run_to_end("threads 0", &mut command, &dir);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("LIVELOCK_THREADS"), "{stderr}");
}

/// `list` keeps its columns aligned whatever the names' lengths, and says
/// ages as people read them (issue 11, item 6, in part).
#[test]
fn list_columns_stay_aligned() {
    let server = TestServer::start(1);
    let dir = ScratchDir::new("aligned");
    let holder = server.client();
    let long = "a-rather-long-lock-name-for-a-nightly-report-job-number-42";
    let _a = holder.acquire(long).unwrap();
    let _b = holder.acquire("short").unwrap();
    let table = admin_ok(&server, &dir, "list", &["list"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    let column = |line: &str, word: &str| {
        line.find(word)
            .unwrap_or_else(|| panic!("{word} in {line}"))
    };
    let mode = column(lines[0], "MODE");
    assert_eq!(column(lines[1], "exclusive"), mode, "{table}");
    assert_eq!(column(lines[2], "exclusive"), mode, "{table}");
    assert!(lines[1].contains("s  "), "an age in seconds: {table}");
}

/// A signal raised on the lock reaches COMMAND as the Unix signal of that
/// name, and `run` says so; a name that is no Unix signal is only reported
/// (issue 11, item 5).
#[test]
fn signals_raised_on_the_lock_reach_the_command() {
    let server = TestServer::start(2);
    let dir = ScratchDir::new("run-signals");
    let ready = dir.join("ready");
    let mut command = run_command(&server, &[], "signalled");
    let script = r#"trap 'echo usr1 >> "$1.got"' USR1; trap 'echo term >> "$1.got"; exit 0' TERM;
        echo ready > "$1"; while :; do sleep 0.05; done"#;
    sh_with_file(&mut command, script, &ready);
    let mut run = ChildGuard::spawn("run", &mut command, &dir);
    wait_for_line(&mut run, &ready);
    let got = std::path::PathBuf::from(format!("{}.got", ready.display()));
    let admin = server.client();
    admin.signal("signalled", "reload-config").unwrap();
    admin.signal("signalled", "usr1").unwrap();
    wait_for_line(&mut run, &got);
    assert_eq!(std::fs::read_to_string(&got).unwrap(), "usr1\n");
    // Any spelling of the name: SIGTERM, term, TERM.
    admin.signal("signalled", "SIGTERM").unwrap();
    let status = run.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", run.stderr());
    assert_eq!(std::fs::read_to_string(&got).unwrap(), "usr1\nterm\n");
    let stderr = run.stderr();
    assert!(
        stderr.contains("signal usr1 raised on signalled: passed to COMMAND"),
        "{stderr}"
    );
    assert!(
        stderr.contains("reload-config") && stderr.contains("not a Unix signal"),
        "{stderr}"
    );
}

/// `livelock signal` on a lock nobody holds says so in words (issue 11,
/// item 5).
#[test]
fn signal_on_a_free_lock_says_nobody_holds_it() {
    let server = TestServer::start(1);
    let dir = ScratchDir::new("signal-free");
    let (code, _, stderr) = admin(&server, &dir, "signal", &["signal", "nobody-holds", "usr1"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("nobody-holds is not held by anyone"),
        "{stderr}"
    );
}

/// `livelock hold NAME` holds until interrupted and prints the fencing
/// token (like `etcdctl lock NAME`); Ctrl-C releases it and exits 0
/// (issue 11, item 4).
#[test]
fn hold_holds_until_interrupted_and_prints_the_token() {
    let server = TestServer::start(1);
    let dir = ScratchDir::new("hold");
    let mut command = livelock_bin();
    command
        .args(["hold", "--server", &server.addr.to_string(), "held-by-hold"])
        .stdout(Stdio::piped());
    let mut hold = ChildGuard::spawn("hold", &mut command, &dir);
    let token: u64 = hold.wait_for("the token", |h| {
        h.stdout().lines().next()?.trim().parse().ok()
    });
    let observer = server.client();
    let record = observer.inspect("held-by-hold").unwrap().expect("held");
    assert_eq!(
        record.holders[0].token, token,
        "the printed token is the hold's"
    );
    // SAFETY: kill(2) on our own child, not yet reaped.
    assert_eq!(
        unsafe { libc::kill(hold.id() as libc::pid_t, libc::SIGINT) },
        0
    );
    let status = hold.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", hold.stderr());
    wait_until("the lock is free", || {
        observer.inspect("held-by-hold").unwrap().is_none()
    });
}

/// `livelock hold --all a,b` holds both, taken at once, and prints their
/// tokens on one line in that order; Ctrl-C releases both.
#[test]
fn hold_all_prints_every_token_in_order() {
    let server = TestServer::start(2);
    let dir = ScratchDir::new("hold-all");
    let mut command = livelock_bin();
    command
        .args([
            "hold",
            "--server",
            &server.addr.to_string(),
            "--all",
            "hold-z,hold-a",
        ])
        .stdout(Stdio::piped());
    let mut hold = ChildGuard::spawn("hold --all", &mut command, &dir);
    let tokens: Vec<u64> = hold.wait_for("the tokens", |h| {
        let line = h.stdout().lines().next()?.to_string();
        line.split_whitespace().map(|t| t.parse().ok()).collect()
    });
    let observer = server.client();
    let held: Vec<u64> = ["hold-z", "hold-a"]
        .iter()
        .map(|n| observer.inspect(n).unwrap().expect("held").holders[0].token)
        .collect();
    assert_eq!(tokens, held);
    // SAFETY: kill(2) on our own child, not yet reaped.
    assert_eq!(
        unsafe { libc::kill(hold.id() as libc::pid_t, libc::SIGINT) },
        0
    );
    assert_eq!(hold.wait_exit().code(), Some(0), "{}", hold.stderr());
    wait_until("both free", || {
        ["hold-z", "hold-a"]
            .iter()
            .all(|n| observer.inspect(n).unwrap().is_none())
    });
}

/// A glob that is most likely a mistake (a `[` never closed, a reversed
/// range) is an error, not an empty list (issue 11, item 6).
#[test]
fn list_refuses_a_broken_glob() {
    let server = TestServer::start(1);
    let dir = ScratchDir::new("broken-glob");
    for pattern in ["job-[12", "[z-a]*"] {
        let (code, stdout, stderr) = admin(&server, &dir, "list", &["list", pattern]);
        assert_eq!(code, Some(2), "{pattern}: {stdout}");
        assert!(stderr.contains("invalid glob"), "{pattern}: {stderr}");
    }
    admin_ok(&server, &dir, "list", &["list", "[[]x*"]);
}

/// `inspect` lists who waits (session, client, mode, how long, first in
/// line first); `list`/`inspect` ages come from the server's clock, which
/// the JSON carries; `stats` shows version, uptime and totals (issue 11,
/// item 6).
#[test]
fn inspect_lists_the_waiters_and_stats_the_totals() {
    let server = TestServer::start(2);
    let dir = ScratchDir::new("inspect-waiters");
    let holder = server.client();
    let guard = holder.acquire("queue").unwrap();
    let named = |name: &str| {
        server.client_with(&ClientOptions {
            client_name: name.into(),
            ..ClientOptions::default()
        })
    };
    let first = named("first-in-line");
    let second = named("second-in-line");
    let mut first_wait = first
        .start_acquire("queue", AcquireOptions::default(), true)
        .unwrap();
    assert!(first_wait.wait_queued(WAIT_MAX).unwrap());
    let shared = AcquireOptions {
        mode: Mode::Shared,
        ..AcquireOptions::default()
    };
    let mut second_wait = second.start_acquire("queue", shared, true).unwrap();
    assert!(second_wait.wait_queued(WAIT_MAX).unwrap());

    let json = Json::parse(&admin_ok(
        &server,
        &dir,
        "inspect",
        &["inspect", "--json", "queue"],
    ));
    let queue = json.get("queue").array();
    assert_eq!(queue.len(), 2, "{json:?}");
    assert_eq!(queue[0].get("client").str(), "first-in-line");
    assert_eq!(queue[0].get("mode").str(), "exclusive");
    assert_eq!(
        queue[0].get("session").str().parse::<u64>().unwrap(),
        first.session_id()
    );
    assert_eq!(queue[1].get("client").str(), "second-in-line");
    assert_eq!(queue[1].get("mode").str(), "shared");
    let server_now = json.get("server_unix_ms").u64();
    let since = queue[0].get("since_unix_ms").u64();
    assert!(since > 0 && since <= server_now, "{json:?}");
    assert_eq!(json.get("queue_cut"), &Json::Bool(false));

    let table = admin_ok(&server, &dir, "inspect-table", &["inspect", "queue"]);
    let lines: Vec<&str> = table.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.contains("WAITING SESSION"))
        .unwrap_or_else(|| panic!("no waiters table:\n{table}"));
    assert!(lines[at + 1].contains("first-in-line"), "{table}");
    assert!(lines[at + 1].trim_start().starts_with('1'), "{table}");
    assert!(lines[at + 2].contains("second-in-line"), "{table}");

    let listed = Json::parse(&admin_ok(&server, &dir, "list", &["list", "--json"]));
    assert!(listed.get("server_unix_ms").u64() >= server_now);

    let stats = Json::parse(&admin_ok(&server, &dir, "stats", &["stats", "--json"]));
    assert_eq!(stats.get("version").str(), env!("CARGO_PKG_VERSION"));
    assert!(stats.get("uptime_ms").u64() > 0);
    assert!(stats.get("acquires_total").u64() >= 3, "{stats:?}");
    assert!(stats.get("grants_total").u64() >= 1);
    assert!(stats.get("connections_total").u64() >= 4);
    let table = admin_ok(&server, &dir, "stats-table", &["stats"]);
    for needle in [
        "version",
        "uptime",
        "grants total",
        env!("CARGO_PKG_VERSION"),
    ] {
        assert!(table.contains(needle), "{needle} in\n{table}");
    }
    drop(guard);
    let granted = bounded("the first waiter's grant", move || {
        first_wait.wait().map(|guard| guard.token())
    });
    assert!(granted.is_ok(), "first in line, first granted");
}

/// `release --force NAME` breaks a stuck lock: the holder is told
/// LOCK_LOST, the next waiter is granted, the act is logged; without
/// `--force` it is refused, a wrong token releases nothing (issue 11,
/// item 6).
#[test]
fn release_force_breaks_a_stuck_lock() {
    let server = TestServer::start(2);
    let dir = ScratchDir::new("release-force");
    let stuck = server.client();
    let guard = stuck.acquire("stuck").unwrap();
    let token = guard.token();
    guard.forget();
    let waiter = server.client();
    let mut pending = waiter
        .start_acquire("stuck", AcquireOptions::default(), true)
        .unwrap();
    assert!(pending.wait_queued(WAIT_MAX).unwrap());

    let (code, _, stderr) = admin(&server, &dir, "no-force", &["release", "stuck"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--force"), "{stderr}");
    let (code, _, stderr) = admin(
        &server,
        &dir,
        "token-0",
        &["release", "--force", "--token", "0", "stuck"],
    );
    assert_eq!(code, Some(2), "token 0 would mean every hold: {stderr}");
    let wrong = (token + 1).to_string();
    let (code, _, stderr) = admin(
        &server,
        &dir,
        "wrong-token",
        &["release", "--force", "--token", &wrong, "stuck"],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("no hold of stuck has token"), "{stderr}");
    assert!(server.client().inspect("stuck").unwrap().is_some());

    let out = admin_ok(
        &server,
        &dir,
        "force",
        &["release", "--force", "--token", &token.to_string(), "stuck"],
    );
    assert!(out.contains("released stuck"), "{out}");
    match stuck.events().recv_timeout(WAIT_MAX) {
        Ok(Event::LockLost { name, token: lost }) => {
            assert_eq!((name.as_slice(), lost), (&b"stuck"[..], token));
        }
        other => panic!("no LockLost: {other:?}"),
    }
    let granted = bounded("the waiter's grant", move || {
        pending.wait().map(|guard| guard.token())
    });
    assert!(granted.unwrap() > token, "fencing tokens go up");
    let (code, _, stderr) = admin(&server, &dir, "free", &["release", "--force", "free"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("not held by anyone"), "{stderr}");
}

/// `kill-session ID` ends a session: its holds go (the next waiter is
/// granted), its client is told LOCK_LOST and disconnected, and the
/// session cannot be resumed (issue 11, item 6).
#[test]
fn kill_session_ends_a_session_and_frees_its_locks() {
    let server = TestServer::start(2);
    let dir = ScratchDir::new("kill-session");
    let victim = server.client_with(&graceful());
    let guard = victim.acquire("held-by-victim").unwrap();
    let token = guard.token();
    guard.forget();
    let waiter = server.client();
    let mut pending = waiter
        .start_acquire("held-by-victim", AcquireOptions::default(), true)
        .unwrap();
    assert!(pending.wait_queued(WAIT_MAX).unwrap());

    let id = victim.session_id().to_string();
    let out = admin_ok(&server, &dir, "kill", &["kill-session", &id]);
    assert!(out.contains(&format!("ended session {id}")), "{out}");
    let mut events = Vec::new();
    while let Ok(event) = victim.events().recv_timeout(WAIT_MAX) {
        let end = event == Event::Disconnected;
        events.push(event);
        if end {
            break;
        }
    }
    assert_eq!(
        events,
        vec![
            Event::LockLost {
                name: b"held-by-victim".to_vec(),
                token
            },
            Event::Disconnected
        ]
    );
    let granted = bounded("the waiter's grant", move || {
        pending.wait().map(|guard| guard.token())
    });
    assert!(granted.unwrap() > token);
    // The session is gone for good, grace or not.
    assert!(Client::resume(
        server.addr,
        victim.session_id(),
        victim.secret(),
        &graceful()
    )
    .is_err());
    let (code, _, stderr) = admin(&server, &dir, "again", &["kill-session", &id]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains(&format!("no session {id}")), "{stderr}");
}

/// One address syntax everywhere: HOST, HOST:PORT, livelock://HOST:PORT, a
/// list tried in order, LIVELOCK_HOST/LIVELOCK_PORT when no --server is
/// given; a bad one is a usage error naming where it came from (issue 11,
/// item 3).
#[test]
fn addresses_have_one_form_everywhere() {
    let server = TestServer::start(1);
    let dir = ScratchDir::new("addresses");
    let port = server.addr.port().to_string();
    let down = free_addr();
    let forms = [
        format!("127.0.0.1:{port}"),
        format!("livelock://127.0.0.1:{port}"),
        format!("livelock://127.0.0.1:{port}/"),
        format!("{down},livelock://127.0.0.1:{port}"),
    ];
    for form in &forms {
        let mut command = livelock_bin();
        command.args(["stats", "--server", form]);
        let (code, _, stderr) = run_to_end("stats", &mut command, &dir);
        assert_eq!(code, Some(0), "--server {form}: {stderr}");
    }
    // The environment, for admin commands and run alike: HOST, HOST + PORT.
    for (host, port) in [
        (format!("127.0.0.1:{port}"), None),
        ("127.0.0.1".to_string(), Some(port.as_str())),
        ("localhost".to_string(), Some(port.as_str())),
    ] {
        for args in [&["stats"][..], &["run", "env-addressed", "--", "true"]] {
            let mut command = livelock_bin();
            command.args(args).env("LIVELOCK_HOST", &host);
            if let Some(port) = port {
                command.env("LIVELOCK_PORT", port);
            }
            let (code, _, stderr) = run_to_end("env", &mut command, &dir);
            assert_eq!(code, Some(0), "{args:?} LIVELOCK_HOST={host}: {stderr}");
        }
    }
    for (flag, env, named) in [
        (Some("127.0.0.1:http"), None, "--server"),
        (None, Some(("LIVELOCK_PORT", "abc")), "LIVELOCK_PORT"),
        (None, Some(("LIVELOCK_HOST", "redis://x")), "LIVELOCK_HOST"),
    ] {
        for args in [&["stats"][..], &["run", "bad-address", "--", "true"]] {
            let mut command = livelock_bin();
            command.arg(args[0]);
            if let Some(flag) = flag {
                command.args(["--server", flag]);
            }
            command.args(&args[1..]);
            if let Some((key, value)) = env {
                command.env(key, value);
            }
            let (code, _, stderr) = run_to_end("bad", &mut command, &dir);
            assert_eq!(code, Some(2), "{args:?}: {stderr}");
            assert!(stderr.contains(named), "{named} in {stderr}");
        }
    }
}

/// A `livelock run` of a lock that an enclosing `run` of the same process
/// tree holds fails at once instead of waiting forever (issue 11, item 4).
#[test]
fn a_nested_run_of_the_same_lock_fails_fast() {
    let server = TestServer::start(1);
    let dir = ScratchDir::new("nested");
    let inner = format!(
        "{} run --server {} nested -- true",
        env!("CARGO_BIN_EXE_livelock"),
        server.addr
    );
    let mut command = run_command(&server, &[], "nested");
    command.args(["sh", "-c", &inner]);
    let (code, _, stderr) = run_to_end("nested", &mut command, &dir);
    assert_eq!(code, Some(2), "the inner run's status: {stderr}");
    assert!(
        stderr.contains("already held by an enclosing `livelock run`"),
        "{stderr}"
    );
    // Another lock inside is fine; shared inside shared is refused too (an
    // exclusive acquire queued in between would make the inner one wait
    // for the outer forever).
    let other = format!(
        "{} run --server {} other -- true",
        env!("CARGO_BIN_EXE_livelock"),
        server.addr
    );
    let mut command = run_command(&server, &[], "nested");
    command.args(["sh", "-c", &other]);
    let (code, _, stderr) = run_to_end("other", &mut command, &dir);
    assert_eq!(code, Some(0), "{stderr}");
    let shared = format!(
        "{} run --server {} -s nested -- true",
        env!("CARGO_BIN_EXE_livelock"),
        server.addr
    );
    let mut command = run_command(&server, &["-s"], "nested");
    command.args(["sh", "-c", &shared]);
    let (code, _, stderr) = run_to_end("shared", &mut command, &dir);
    assert_eq!(code, Some(2), "{stderr}");
}

/// `--lease` bounds the hold: when it runs out COMMAND is stopped and run
/// exits 79, saying why (issue 11, item 4).
#[test]
fn a_lease_bounds_the_hold() {
    let server = TestServer::start(1);
    let dir = ScratchDir::new("lease");
    let mut command = run_command(&server, &["--lease", "300ms"], "leased");
    command.args(["sleep", "30"]);
    let started = Instant::now();
    let (code, _, stderr) = run_to_end("leased", &mut command, &dir);
    assert_eq!(code, Some(79), "{stderr}");
    assert!(stderr.contains("lease ran out"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(25), "stopped early");
    let mut command = run_command(&server, &["--lease", "0"], "leased");
    command.arg("true");
    let (code, _, stderr) = run_to_end("zero", &mut command, &dir);
    assert_eq!(code, Some(2), "{stderr}");
}

/// `--lease` bounds an `--all` hold too (ACQUIRE_ALL takes no lease: each
/// name is given it right after the grant): COMMAND is stopped, exit 79,
/// and every name is free again.
#[test]
fn a_lease_bounds_a_hold_of_several_names() {
    let server = TestServer::start(2);
    let dir = ScratchDir::new("lease-all");
    let mut command = livelock_bin();
    command
        .args(["run", "--server", &server.addr.to_string()])
        .args([
            "--lease",
            "300ms",
            "--all",
            "leased-1,leased-2",
            "--",
            "sleep",
            "30",
        ]);
    let started = Instant::now();
    let (code, _, stderr) = run_to_end("leased --all", &mut command, &dir);
    assert_eq!(code, Some(79), "{stderr}");
    assert!(stderr.contains("lease ran out"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(25), "stopped early");
    let observer = server.client();
    wait_until("both free", || {
        ["leased-1", "leased-2"]
            .iter()
            .all(|n| observer.inspect(n).unwrap().is_none())
    });
}

/// A lock lost while `run`'s connection was down is not pushed (the
/// session was detached): `run` finds it missing from the RESUME listing,
/// stops COMMAND and exits 79. The connection goes through a relay the
/// test cuts; an operator takes the lock meanwhile; then the relay heals.
#[test]
fn a_lock_lost_while_disconnected_stops_the_command() {
    use common::cluster::Link;
    let server = TestServer::start(2);
    let relay = Link::start(server.addr);
    let dir = ScratchDir::new("lost-while-down");
    let (started, go) = (dir.join("started"), dir.join("go"));
    // The command runs until the test says go (bounded: 20 s).
    let script = format!(
        "touch {}; i=0; while [ ! -e {} ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done",
        started.display(),
        go.display()
    );
    let mut command = livelock_bin();
    command
        .args(["run", "--server", &relay.addr.to_string(), "--grace", "20s"])
        .args(["vanishing", "--", "sh", "-c", &script]);
    let mut run = ChildGuard::spawn("run through a relay", &mut command, &dir);
    wait_until("the command started under the lock", || started.is_file());
    let operator = server.client();
    relay.block();
    // The server sees the connection close: the session is detached.
    wait_until("the session detached", || {
        operator.stats().unwrap().sessions_detached == 1
    });
    operator.force_release("vanishing", 0).unwrap();
    relay.heal();
    let status = run.wait_exit();
    assert_eq!(status.code(), Some(79), "{}", run.stderr());
    assert!(
        run.stderr().contains("lost while the connection was down"),
        "{}",
        run.stderr()
    );
    std::fs::write(&go, b"").unwrap();
}

/// The command line speaks TLS (`--tls-ca`, or LIVELOCK_TLS_CA), to a
/// server that requires it; a CA file that does not load is a usage error.
#[test]
fn commands_reach_a_tls_only_server() {
    let dir = ScratchDir::new("cli-tls");
    let ca = common::certs::Ca::new(&dir, "server");
    let (cert, key) = ca.issue(&dir, "server", &["127.0.0.1"]);
    let server = TestServer::start_with(2, |config| {
        config.tls = Some(livelock::tls::TlsFiles {
            cert,
            key,
            client_ca: None,
            required: true,
        });
    });
    let ca_file = ca.path.to_str().unwrap();
    admin_ok(&server, &dir, "stats-tls", &["stats", "--tls-ca", ca_file]);
    let (code, _, _) = admin(&server, &dir, "stats-plain", &["stats"]);
    assert_eq!(code, Some(1), "plaintext is refused");
    let mut command = run_command(&server, &["--tls-ca", ca_file], "over-tls");
    command.args(["sh", "-c", "test -n \"$LIVELOCK_FENCE\""]);
    let (code, _, stderr) = run_to_end("run-tls", &mut command, &dir);
    assert_eq!(code, Some(0), "{stderr}");
    let mut command = run_command(&server, &[], "over-tls");
    command.env("LIVELOCK_TLS_CA", ca_file).arg("true");
    let (code, _, stderr) = run_to_end("run-tls-env", &mut command, &dir);
    assert_eq!(code, Some(0), "{stderr}");
    let missing = dir.join("missing.pem");
    let (code, _, stderr) = admin(
        &server,
        &dir,
        "bad-ca",
        &["stats", "--tls-ca", missing.to_str().unwrap()],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("missing.pem"), "{stderr}");
}
