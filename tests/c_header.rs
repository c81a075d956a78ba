//! Checks that `include/livelock.h` says the same thing as `src/wire/protocol.rs`.
//!
//! Writes a small C program that includes the header, compiles it with the
//! system C compiler (`$CC`, default `cc`) as strict C11, runs it, and compares
//! what it prints with the Rust side: every struct size and field offset, every
//! constant, and the exact bytes of frames built from the C structs versus
//! `encode_request`. A missing C compiler fails the test: the header is part of
//! the product and must stay checked.

use std::fmt::Write as _;
use std::mem::{offset_of, size_of};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use livelock::limits;
use livelock::protocol::{
    self, encode_request, flags, opcode, AcquireBody, AllBody, CancelBody, ExtendBody, Header,
    HelloBody, Mode, PermitsBody, Request, ResumeBody, SessionBody, Status,
};

/// Size of a struct field, by a projection closure (`|h: &Header| &h.magic`).
fn field_size<T, F>(_field: fn(&T) -> &F) -> usize {
    size_of::<F>()
}

/// Checks the size of a C struct and the offset and size of each of its fields
/// that has the same name on both sides.
macro_rules! same_layout {
    ($checks:ident, $c_struct:literal, $rust:ty, [$($field:ident),* $(,)?]) => {
        $checks.push((format!("sizeof({})", $c_struct), size_of::<$rust>() as u64));
        $(
            $checks.push((
                format!("offsetof({}, {})", $c_struct, stringify!($field)),
                offset_of!($rust, $field) as u64,
            ));
            $checks.push((
                format!("sizeof((({} *)0)->{})", $c_struct, stringify!($field)),
                field_size(|t: &$rust| &t.$field) as u64,
            ));
        )*
    };
}

/// Checks a C `name_lo`/`name_hi` pair of uint32_t against a Rust u64 field.
macro_rules! split_u64 {
    ($checks:ident, $c_struct:literal, $rust:ty, $field:ident) => {
        assert_eq!(field_size(|t: &$rust| &t.$field), 8);
        for (half, extra) in [("lo", 0), ("hi", 4)] {
            let c_field = format!("{}_{half}", stringify!($field));
            $checks.push((
                format!("offsetof({}, {c_field})", $c_struct),
                (offset_of!($rust, $field) + extra) as u64,
            ));
            $checks.push((format!("sizeof((({} *)0)->{c_field})", $c_struct), 4));
        }
    };
}

/// Struct layouts: sizes, field offsets and field sizes.
#[rustfmt::skip]
fn layout_expectations(checks: &mut Vec<(String, u64)>) {
    same_layout!(checks, "livelock_header", Header,
        [magic, version, opcode, flags, status, request_id, body_len]);
    same_layout!(checks, "livelock_hello", HelloBody, [grace_ms, password_len, client_name_len]);
    same_layout!(checks, "livelock_resume", ResumeBody, [secret, password_len, reserved]);
    split_u64!(checks, "livelock_resume", ResumeBody, session_id);
    same_layout!(checks, "livelock_acquire", AcquireBody,
        [mode, acq_flags, reserved, wait_ms, lease_ms]);
    same_layout!(checks, "livelock_acquire_permits", PermitsBody, [acquire, weight, capacity]);
    same_layout!(checks, "livelock_acquire_all", AllBody, [acq_flags, reserved, count, wait_ms]);
    same_layout!(checks, "livelock_extend", ExtendBody, [lease_ms]);
    same_layout!(checks, "livelock_cancel", CancelBody, [target_request_id]);
    same_layout!(checks, "livelock_session_reply", SessionBody,
        [secret, grace_ms, version, reserved]);
    split_u64!(checks, "livelock_session_reply", SessionBody, session_id);
}

/// `(C expression, value the Rust side says it must have)`.
fn expectations() -> Vec<(String, u64)> {
    let mut checks: Vec<(String, u64)> = Vec::new();

    layout_expectations(&mut checks);
    // The token body has no Rust struct: it is a bare little-endian u64.
    checks.push((
        "sizeof(livelock_token)".to_string(),
        size_of::<u64>() as u64,
    ));
    checks.push(("offsetof(livelock_token, token_lo)".to_string(), 0));
    checks.push(("offsetof(livelock_token, token_hi)".to_string(), 4));

    let mut check = |c_expr: &str, value: usize| checks.push((c_expr.to_string(), value as u64));
    check("LIVELOCK_MAGIC", protocol::MAGIC.into());
    check("LIVELOCK_MAGIC_BYTE0", protocol::MAGIC_BYTE0.into());
    check("LIVELOCK_VERSION", protocol::VERSION.into());
    check("LIVELOCK_HEADER_LEN", protocol::HEADER_LEN);
    check("LIVELOCK_WAIT_FOREVER", protocol::WAIT_FOREVER as usize);
    check("LIVELOCK_SECRET_LEN", protocol::SECRET_LEN);
    check("LIVELOCK_NAME_LEN_MAX", limits::NAME_LEN_MAX);
    check("LIVELOCK_FRAME_BODY_MAX", limits::FRAME_BODY_MAX);
    check("LIVELOCK_REPLY_BODY_MAX", limits::REPLY_BODY_MAX);
    check(
        "LIVELOCK_RESUME_REPLY_BODY_MAX",
        protocol::RESUME_REPLY_BODY_MAX,
    );
    check("LIVELOCK_PASSWORD_LEN_MAX", limits::PASSWORD_LEN_MAX);
    check("LIVELOCK_CLIENT_NAME_LEN_MAX", limits::CLIENT_NAME_LEN_MAX);
    check(
        "LIVELOCK_ACQ_NOTIFY_QUEUED",
        protocol::ACQ_NOTIFY_QUEUED.into(),
    );
    check("LIVELOCK_MODE_EXCLUSIVE", Mode::Exclusive as usize);
    check("LIVELOCK_MODE_SHARED", Mode::Shared as usize);
    check("LIVELOCK_MODE_PERMITS", Mode::Permits as usize);

    check("LIVELOCK_FLAG_REPLY", flags::REPLY.into());
    check("LIVELOCK_FLAG_PUSH", flags::PUSH.into());
    check("LIVELOCK_FLAG_INTERIM", flags::INTERIM.into());
    check("LIVELOCK_FLAG_HOLD_TOKEN", flags::HOLD_TOKEN.into());

    for (name, code) in [
        ("HELLO", opcode::HELLO),
        ("RESUME", opcode::RESUME),
        ("ACQUIRE", opcode::ACQUIRE),
        ("RELEASE", opcode::RELEASE),
        ("EXTEND", opcode::EXTEND),
        ("CANCEL", opcode::CANCEL),
        ("PING", opcode::PING),
        ("BYE", opcode::BYE),
        ("SIGNAL", opcode::SIGNAL),
        ("INSPECT", opcode::INSPECT),
        ("LIST", opcode::LIST),
        ("STATS", opcode::STATS),
        ("FORCE_RELEASE", opcode::FORCE_RELEASE),
        ("KILL_SESSION", opcode::KILL_SESSION),
        ("CLUSTER_STATUS", opcode::CLUSTER_STATUS),
        ("CLUSTER_CHANGE", opcode::CLUSTER_CHANGE),
        ("ACQUIRE_PERMITS", opcode::ACQUIRE_PERMITS),
        ("SET_CAPACITY", opcode::SET_CAPACITY),
        ("SET_ORDER", opcode::SET_ORDER),
        ("REPORT", opcode::REPORT),
        ("ACQUIRE_ALL", opcode::ACQUIRE_ALL),
        ("ACQUIRE_POOL", opcode::ACQUIRE_POOL),
        ("LOCK_LOST", opcode::LOCK_LOST),
        ("SHUTDOWN", opcode::SHUTDOWN),
        ("SESSION_TAKEN", opcode::SESSION_TAKEN),
        ("SIGNALLED", opcode::SIGNALLED),
        ("HELD", opcode::HELD),
        ("HELD_END", opcode::HELD_END),
    ] {
        check(&format!("LIVELOCK_OP_{name}"), code.into());
    }

    for status in Status::ALL {
        check(
            &format!(
                "LIVELOCK_STATUS_{}",
                screaming_snake(&format!("{status:?}"))
            ),
            status.code().into(),
        );
        check(
            &format!(
                "LIVELOCK_STATUS_IS_ERROR(LIVELOCK_STATUS_{})",
                screaming_snake(&format!("{status:?}"))
            ),
            status.is_error().into(),
        );
    }
    checks
}

/// `TooManyInFlight` -> `TOO_MANY_IN_FLIGHT`.
fn screaming_snake(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// The request both sides build: the ACQUIRE example of docs/PROTOCOL.md.
const ACQUIRE: Request<'static> = Request::Acquire {
    name: b"report-42",
    mode: Mode::Exclusive,
    weight: 1,
    capacity: 0,
    wait_ms: 5000,
    lease_ms: 30_000,
    notify_queued: true,
};
const ACQUIRE_REQUEST_ID: u32 = 2;

/// A RESUME, to check the lo/hi split of 64-bit fields.
const RESUME_SESSION_ID: u64 = 0x1122_3344_5566_7788;
const RESUME_REQUEST_ID: u32 = 0xA1B2_C3D4;

fn resume_secret() -> [u8; protocol::SECRET_LEN] {
    core::array::from_fn(|i| 0xE0 + i as u8)
}

/// The C program: prints `expr=value` for every expectation, then the frames
/// as `name=hex`.
fn c_program(checks: &[(String, u64)]) -> String {
    let mut prints = String::new();
    for (expr, _) in checks {
        writeln!(
            prints,
            "    printf(\"%s=%llu\\n\", \"{expr}\", (unsigned long long)({expr}));"
        )
        .unwrap();
    }
    format!(
        r#"#include "livelock.h"
#include "livelock.h" /* twice: the header must be idempotent */

#include <stdio.h>
#include <string.h>

static void print_hex(const char *label, const unsigned char *bytes, size_t len) {{
    printf("%s=", label);
    for (size_t i = 0; i < len; i++) {{
        printf("%02x", bytes[i]);
    }}
    printf("\n");
}}

int main(void) {{
{prints}
    unsigned char frame[256];
    const char *name = "report-42";
    size_t name_len = strlen(name);

    livelock_acquire acquire;
    memset(&acquire, 0, sizeof acquire);
    acquire.mode = LIVELOCK_MODE_EXCLUSIVE;
    acquire.acq_flags = LIVELOCK_ACQ_NOTIFY_QUEUED;
    acquire.wait_ms = 5000;
    acquire.lease_ms = 30000;

    livelock_header header;
    memset(&header, 0, sizeof header);
    header.magic = LIVELOCK_MAGIC;
    header.version = LIVELOCK_VERSION;
    header.opcode = LIVELOCK_OP_ACQUIRE;
    header.request_id = {ACQUIRE_REQUEST_ID}u;
    header.body_len = (uint32_t)(sizeof acquire + name_len);

    memcpy(frame, &header, sizeof header);
    memcpy(frame + sizeof header, &acquire, sizeof acquire);
    memcpy(frame + sizeof header + sizeof acquire, name, name_len);
    print_hex("acquire", frame, sizeof header + sizeof acquire + name_len);

    const uint64_t session_id = {RESUME_SESSION_ID}ull;
    livelock_resume resume;
    memset(&resume, 0, sizeof resume);
    resume.session_id_lo = (uint32_t)session_id;
    resume.session_id_hi = (uint32_t)(session_id >> 32);
    for (unsigned i = 0; i < LIVELOCK_SECRET_LEN; i++) {{
        resume.secret[i] = (uint8_t)(0xE0 + i);
    }}
    resume.password_len = 2;

    memset(&header, 0, sizeof header);
    header.magic = LIVELOCK_MAGIC;
    header.version = LIVELOCK_VERSION;
    header.opcode = LIVELOCK_OP_RESUME;
    header.request_id = {RESUME_REQUEST_ID}u;
    header.body_len = (uint32_t)(sizeof resume + 2);

    memcpy(frame, &header, sizeof header);
    memcpy(frame + sizeof header, &resume, sizeof resume);
    memcpy(frame + sizeof header + sizeof resume, "pw", 2);
    print_hex("resume", frame, sizeof header + sizeof resume + 2);
    return 0;
}}
"#
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh directory for this run (no temp-file crate: pid + clock).
fn scratch_dir() -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir =
        std::env::temp_dir().join(format!("livelock-c-header-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Strict C11; `-Wpadded` proves the structs have no padding.
const C_FLAGS: &[&str] = &[
    "-std=c11",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-pedantic",
    "-Wpadded",
];

fn compile_and_run(dir: &Path, source: &str) -> String {
    let c_file = dir.join("check_header.c");
    let exe = dir.join("check_header");
    std::fs::write(&c_file, source).unwrap();
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("include");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let compiled = Command::new(&cc)
        .args(C_FLAGS)
        .arg("-I")
        .arg(&include)
        .arg(&c_file)
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|err| {
            panic!(
                "cannot run the C compiler `{cc}` ({err}): a C compiler is required to check \
                 include/livelock.h (install one, or point $CC at it)"
            )
        });
    assert!(
        compiled.status.success(),
        "{cc} failed on {}:\n{}",
        c_file.display(),
        String::from_utf8_lossy(&compiled.stderr)
    );
    let run = Command::new(&exe).output().unwrap();
    assert!(
        run.status.success(),
        "{} failed: {:?}",
        exe.display(),
        run.status
    );
    String::from_utf8(run.stdout).unwrap()
}

#[test]
fn c_header_matches_the_rust_protocol() {
    let checks = expectations();
    let dir = scratch_dir();
    let stdout = compile_and_run(&dir, &c_program(&checks));

    let printed: Vec<(&str, &str)> = stdout
        .lines()
        .map(|line| line.split_once('=').expect("C output is key=value"))
        .collect();
    let value = |key: &str| {
        printed
            .iter()
            .find(|(k, _)| *k == key)
            .unwrap_or_else(|| panic!("C printed no {key}"))
            .1
    };

    let mut mismatches = Vec::new();
    for (expr, want) in &checks {
        let got: u64 = value(expr).parse().unwrap();
        if got != *want {
            mismatches.push(format!("{expr}: C says {got}, Rust says {want}"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "livelock.h disagrees with src/wire/protocol.rs:\n{}",
        mismatches.join("\n")
    );

    let mut acquire = Vec::new();
    encode_request(&mut acquire, ACQUIRE_REQUEST_ID, &ACQUIRE);
    assert_eq!(
        value("acquire"),
        hex(&acquire),
        "ACQUIRE frame built from livelock.h"
    );

    let mut resume = Vec::new();
    let req = Request::Resume {
        session_id: RESUME_SESSION_ID,
        secret: resume_secret(),
        password: b"pw",
    };
    encode_request(&mut resume, RESUME_REQUEST_ID, &req);
    assert_eq!(
        value("resume"),
        hex(&resume),
        "RESUME frame built from livelock.h"
    );

    std::fs::remove_dir_all(&dir).unwrap();
}
