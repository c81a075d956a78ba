/*
 * livelock.h — the LiveLock native binary protocol, version 1, for C clients.
 *
 * Mirrors src/protocol.rs (the reference) and docs/PROTOCOL.md (the
 * byte-by-byte description). tests/c_header.rs compiles a program against this
 * header and checks every size, offset and constant below against the Rust
 * definitions, so the two cannot drift apart silently.
 *
 * A frame is a 16-byte livelock_header followed by header.body_len bytes of
 * body. A body is one of the fixed structs below followed by variable bytes (a
 * lock name, a password, ...). Build a frame by filling the structs and
 * memcpy()ing them into a byte buffer; read one by memcpy()ing out of the
 * buffer (the wire offers no alignment guarantee, so do not cast pointers into
 * a receive buffer).
 *
 * Byte order: every multi-byte field is little-endian on the wire. These
 * structs hold fields in host order, so this header targets little-endian
 * hosts only (checked below).
 *
 * Layout: plain C structs with natural alignment and no padding (no packing
 * pragmas). 64-bit values are split into _lo/_hi 32-bit halves so that no
 * struct needs 8-byte alignment; otherwise livelock_resume (28 bytes on the
 * wire) would be padded to 32. value = lo | ((uint64_t)hi << 32).
 * Every size and offset is checked with a static assertion.
 */
#pragma once

#include <stddef.h>
#include <stdint.h>

#if defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__)
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "livelock.h: the structs mirror little-endian wire fields; this host is not little-endian"
#endif
#endif

#ifdef __cplusplus
#define LIVELOCK_STATIC_ASSERT(cond, msg) static_assert(cond, msg)
#else
#define LIVELOCK_STATIC_ASSERT(cond, msg) _Static_assert(cond, msg)
#endif

/* ---- Constants --------------------------------------------------------- */

/* First two bytes of every frame, as a little-endian uint16 (F1 4C on the wire). */
#define LIVELOCK_MAGIC 0x4CF1u
/* First byte of every native connection: the server sniffs it to choose the
 * native protocol over the text (RESP/inline) protocol. */
#define LIVELOCK_MAGIC_BYTE0 0xF1u
#define LIVELOCK_VERSION 1u
#define LIVELOCK_HEADER_LEN 16u
/* wait_ms of an ACQUIRE that waits until granted or cancelled. */
#define LIVELOCK_WAIT_FOREVER 0xFFFFFFFFu
#define LIVELOCK_SECRET_LEN 16u

/* Limits (src/limits.rs). */
#define LIVELOCK_NAME_LEN_MAX 1024u        /* lock names are 1..=1024 bytes */
#define LIVELOCK_FRAME_BODY_MAX 4096u      /* larger body: connection closed */
#define LIVELOCK_REPLY_BODY_MAX 1048576u   /* LIST and INSPECT replies only */
#define LIVELOCK_RESUME_REPLY_BODY_MAX 4132u /* session body + in-flight count + 1024 ids */
#define LIVELOCK_PASSWORD_LEN_MAX 256u
#define LIVELOCK_CLIENT_NAME_LEN_MAX 256u

/* ---- Opcodes (header.opcode) ------------------------------------------- */

enum livelock_opcode {
    /* Requests. */
    LIVELOCK_OP_HELLO = 1,   /* livelock_hello + password + client name */
    LIVELOCK_OP_RESUME = 2,  /* livelock_resume + password */
    LIVELOCK_OP_ACQUIRE = 3, /* livelock_acquire + name */
    LIVELOCK_OP_RELEASE = 4, /* name; with LIVELOCK_FLAG_HOLD_TOKEN: livelock_token + name */
    LIVELOCK_OP_EXTEND = 5,  /* livelock_extend [+ livelock_token, with the flag] + name */
    LIVELOCK_OP_CANCEL = 6,  /* livelock_cancel */
    LIVELOCK_OP_PING = 7,    /* empty */
    LIVELOCK_OP_BYE = 8,     /* empty */
    LIVELOCK_OP_SIGNAL = 9,  /* op u8, 0 u8, name_len u16, name, signal */
    LIVELOCK_OP_INSPECT = 10, /* name */
    LIVELOCK_OP_LIST = 11,   /* limit u32, glob pattern */
    LIVELOCK_OP_STATS = 12,  /* empty */
    LIVELOCK_OP_FORCE_RELEASE = 13, /* operator: name; with LIVELOCK_FLAG_HOLD_TOKEN: livelock_token + name */
    LIVELOCK_OP_KILL_SESSION = 14,  /* operator: session id u64 */
    LIVELOCK_OP_CLUSTER_STATUS = 15, /* empty; reply: see PROTOCOL.md */
    LIVELOCK_OP_CLUSTER_CHANGE = 16, /* operator: members or transfer, see PROTOCOL.md */
    LIVELOCK_OP_ACQUIRE_PERMITS = 17, /* livelock_acquire_permits + name; replies as ACQUIRE */
    LIVELOCK_OP_SET_CAPACITY = 18,    /* capacity u32 (>= 1) + name */
    LIVELOCK_OP_SET_ORDER = 19,       /* the session's lock order, see PROTOCOL.md */
    LIVELOCK_OP_REPORT = 20,          /* top u32; reply: usage rows, see PROTOCOL.md */
    LIVELOCK_OP_ACQUIRE_ALL = 21,     /* livelock_acquire_all + names; reply: a token per name */
    LIVELOCK_OP_ACQUIRE_POOL = 22,    /* livelock_acquire_all (count = requirements) + requirements, see PROTOCOL.md */
    /* Server pushes (never valid from a client). */
    LIVELOCK_OP_LOCK_LOST = 0x40,     /* livelock_token + name */
    LIVELOCK_OP_SHUTDOWN = 0x41,      /* empty */
    LIVELOCK_OP_SESSION_TAKEN = 0x42, /* empty */
    LIVELOCK_OP_SIGNALLED = 0x43,     /* name_len u16, name, signal */
    LIVELOCK_OP_HELD = 0x44,          /* after RESUME: livelock_token, mode u8, name */
    LIVELOCK_OP_HELD_END = 0x45       /* the RESUME's listing of holds is complete */
};

/* ---- Header flags (header.flags; in requests 0, or HOLD_TOKEN) ---------- */

#define LIVELOCK_FLAG_REPLY 0x0001u   /* server -> client frame */
#define LIVELOCK_FLAG_PUSH 0x0002u    /* server-initiated, or deferred completion */
#define LIVELOCK_FLAG_INTERIM 0x0004u /* not the final reply (e.g. QUEUED) */
/* Request flag, RELEASE and EXTEND only: the body carries the fencing token
 * (non-zero) of the hold meant; another hold of the session: WRONG_TOKEN. */
#define LIVELOCK_FLAG_HOLD_TOKEN 0x0008u

/* ---- ACQUIRE ----------------------------------------------------------- */

enum livelock_mode {
    LIVELOCK_MODE_EXCLUSIVE = 0,
    LIVELOCK_MODE_SHARED = 1,
    LIVELOCK_MODE_PERMITS = 2 /* ACQUIRE_PERMITS only; in records: a semaphore */
};

/* livelock_acquire.acq_flags: send an INTERIM QUEUED reply when the acquire waits. */
#define LIVELOCK_ACQ_NOTIFY_QUEUED 0x01u

/* ---- Status codes (header.status; 0 in requests) ----------------------- */

/* Codes below 32 are outcomes; 32 and above are errors. */
#define LIVELOCK_STATUS_IS_ERROR(status) ((status) >= 32)

enum livelock_status {
    LIVELOCK_STATUS_OK = 0,
    LIVELOCK_STATUS_BUSY = 1,
    LIVELOCK_STATUS_TIMED_OUT = 2,
    LIVELOCK_STATUS_CANCELLED = 3,
    LIVELOCK_STATUS_QUEUED = 4,
    LIVELOCK_STATUS_NOT_HELD = 5,
    LIVELOCK_STATUS_ALREADY_HELD = 6,
    LIVELOCK_STATUS_NO_SUCH_REQUEST = 7,
    LIVELOCK_STATUS_WRONG_TOKEN = 8,
    LIVELOCK_STATUS_WRONG_KIND = 9,         /* a lock's name as a semaphore, or the reverse */
    LIVELOCK_STATUS_CAPACITY_CONFLICT = 10, /* not the semaphore's capacity */
    LIVELOCK_STATUS_OVER_CAPACITY = 11,     /* queued; the capacity fell below its weight */
    LIVELOCK_STATUS_ORDER_VIOLATION = 12,   /* out of the order the session declared */
    LIVELOCK_STATUS_DEADLOCK = 13,          /* a queued acquire failed to break a deadlock; body: the cycle */
    LIVELOCK_STATUS_BAD_VERSION = 32,
    LIVELOCK_STATUS_UNKNOWN_OPCODE = 33,
    LIVELOCK_STATUS_BAD_BODY = 34,
    LIVELOCK_STATUS_BAD_NAME = 35,
    LIVELOCK_STATUS_NO_SESSION = 36,
    LIVELOCK_STATUS_AUTH = 37,
    LIVELOCK_STATUS_SESSION_EXISTS = 38,
    LIVELOCK_STATUS_UNKNOWN_SESSION = 39,
    LIVELOCK_STATUS_TOO_MANY_HOLDS = 40,
    LIVELOCK_STATUS_TOO_MANY_WAITERS = 41,
    LIVELOCK_STATUS_TOO_MANY_IN_FLIGHT = 42,
    LIVELOCK_STATUS_DUPLICATE_REQUEST_ID = 43,
    LIVELOCK_STATUS_SHUTTING_DOWN = 44,
    LIVELOCK_STATUS_FRAME_TOO_LARGE = 45,
    LIVELOCK_STATUS_HELLO_TIMEOUT = 46,
    LIVELOCK_STATUS_SERVER_BUSY = 47,
    /* --durability log: the log cannot be written; changes are refused. */
    LIVELOCK_STATUS_STORAGE_FAILED = 48
};

/* ---- Wire structs ------------------------------------------------------ */

/* Every frame starts with this header. */
typedef struct livelock_header {
    uint16_t magic;      /* LIVELOCK_MAGIC */
    uint8_t version;     /* LIVELOCK_VERSION */
    uint8_t opcode;      /* enum livelock_opcode */
    uint16_t flags;      /* LIVELOCK_FLAG_*; 0 in requests */
    uint16_t status;     /* enum livelock_status; 0 in requests */
    uint32_t request_id; /* chosen by the client; echoed; 0 in pushes */
    uint32_t body_len;   /* bytes after the header, <= LIVELOCK_FRAME_BODY_MAX */
} livelock_header;

LIVELOCK_STATIC_ASSERT(sizeof(livelock_header) == 16, "livelock_header size");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_header, magic) == 0, "livelock_header.magic");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_header, version) == 2, "livelock_header.version");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_header, opcode) == 3, "livelock_header.opcode");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_header, flags) == 4, "livelock_header.flags");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_header, status) == 6, "livelock_header.status");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_header, request_id) == 8, "livelock_header.request_id");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_header, body_len) == 12, "livelock_header.body_len");

/* HELLO: then password_len bytes of password, then client_name_len bytes of
 * client name; body_len == 8 + password_len + client_name_len exactly. */
typedef struct livelock_hello {
    uint32_t grace_ms; /* session outlives its connection this long (0: it does not) */
    uint16_t password_len;    /* <= LIVELOCK_PASSWORD_LEN_MAX */
    uint16_t client_name_len; /* <= LIVELOCK_CLIENT_NAME_LEN_MAX */
} livelock_hello;

LIVELOCK_STATIC_ASSERT(sizeof(livelock_hello) == 8, "livelock_hello size");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_hello, grace_ms) == 0, "livelock_hello.grace_ms");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_hello, password_len) == 4, "livelock_hello.password_len");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_hello, client_name_len) == 6, "livelock_hello.client_name_len");

/* RESUME: then password_len bytes of password; body_len == 28 + password_len. */
typedef struct livelock_resume {
    uint32_t session_id_lo; /* session_id (u64 on the wire), low half */
    uint32_t session_id_hi; /* high half */
    uint8_t secret[LIVELOCK_SECRET_LEN];
    uint16_t password_len; /* <= LIVELOCK_PASSWORD_LEN_MAX */
    uint16_t reserved;     /* 0 */
} livelock_resume;

LIVELOCK_STATIC_ASSERT(sizeof(livelock_resume) == 28, "livelock_resume size");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_resume, session_id_lo) == 0, "livelock_resume.session_id_lo");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_resume, session_id_hi) == 4, "livelock_resume.session_id_hi");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_resume, secret) == 8, "livelock_resume.secret");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_resume, password_len) == 24, "livelock_resume.password_len");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_resume, reserved) == 26, "livelock_resume.reserved");

/* ACQUIRE: then the lock name (1..=LIVELOCK_NAME_LEN_MAX bytes) = rest of the body. */
typedef struct livelock_acquire {
    uint8_t mode;      /* enum livelock_mode */
    uint8_t acq_flags; /* LIVELOCK_ACQ_*; unknown bits are rejected */
    uint16_t reserved; /* 0 */
    uint32_t wait_ms;  /* 0: try once; LIVELOCK_WAIT_FOREVER; else ms */
    uint32_t lease_ms; /* 0: no lease; else ms */
} livelock_acquire;

LIVELOCK_STATIC_ASSERT(sizeof(livelock_acquire) == 12, "livelock_acquire size");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_acquire, mode) == 0, "livelock_acquire.mode");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_acquire, acq_flags) == 1, "livelock_acquire.acq_flags");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_acquire, reserved) == 2, "livelock_acquire.reserved");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_acquire, wait_ms) == 4, "livelock_acquire.wait_ms");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_acquire, lease_ms) == 8, "livelock_acquire.lease_ms");

/* ACQUIRE_PERMITS: a counting semaphore's permits; then the name = rest of
 * the body. */
typedef struct livelock_acquire_permits {
    livelock_acquire acquire; /* mode = LIVELOCK_MODE_PERMITS */
    uint32_t weight;          /* 1..=capacity */
    uint32_t capacity;        /* >= 1; the semaphore's while it is in use */
} livelock_acquire_permits;

LIVELOCK_STATIC_ASSERT(sizeof(livelock_acquire_permits) == 20, "livelock_acquire_permits size");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_acquire_permits, acquire) == 0, "livelock_acquire_permits.acquire");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_acquire_permits, weight) == 12, "livelock_acquire_permits.weight");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_acquire_permits, capacity) == 16, "livelock_acquire_permits.capacity");

/* ACQUIRE_ALL: several locks at once, all or none; then `count` names, each
 * mode u8 (0 exclusive, 1 shared), 0 u8, name_len u16, the name. Granted:
 * one livelock_token per name, in the request's order. */
typedef struct livelock_acquire_all {
    uint8_t acq_flags;  /* LIVELOCK_ACQ_NOTIFY_QUEUED: one QUEUED, when it first waits */
    uint8_t reserved;   /* 0 */
    uint16_t count;     /* 1..=32 names */
    uint32_t wait_ms;   /* as for ACQUIRE, one wait for all */
} livelock_acquire_all;

LIVELOCK_STATIC_ASSERT(sizeof(livelock_acquire_all) == 8, "livelock_acquire_all size");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_acquire_all, acq_flags) == 0, "livelock_acquire_all.acq_flags");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_acquire_all, reserved) == 1, "livelock_acquire_all.reserved");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_acquire_all, count) == 2, "livelock_acquire_all.count");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_acquire_all, wait_ms) == 4, "livelock_acquire_all.wait_ms");

/* ACQUIRE_POOL: the same fixed part (livelock_acquire_all, `count` = 1..=16
 * requirements), then per requirement: need u16, candidates u16,
 * filter_len u16, the filter, and per candidate name_len u16, tags_len u16,
 * the name, the tags (text "key=value,key=value"). Granted: per requirement
 * permits_token u64, queue_len u16, the queue's name, then K x (index u16,
 * livelock_token). See PROTOCOL.md. */

/* EXTEND: then the lock name = rest of the body. */
typedef struct livelock_extend {
    uint32_t lease_ms; /* > 0 */
} livelock_extend;

LIVELOCK_STATIC_ASSERT(sizeof(livelock_extend) == 4, "livelock_extend size");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_extend, lease_ms) == 0, "livelock_extend.lease_ms");

/* CANCEL: the whole body (exactly 4 bytes). */
typedef struct livelock_cancel {
    uint32_t target_request_id; /* request_id of the pending ACQUIRE */
} livelock_cancel;

LIVELOCK_STATIC_ASSERT(sizeof(livelock_cancel) == 4, "livelock_cancel size");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_cancel, target_request_id) == 0, "livelock_cancel.target_request_id");

/* HELLO / RESUME reply with status OK: the whole body (32 bytes). */
typedef struct livelock_session_reply {
    uint32_t session_id_lo; /* session_id (u64 on the wire), low half */
    uint32_t session_id_hi; /* high half */
    uint8_t secret[LIVELOCK_SECRET_LEN];
    uint32_t grace_ms; /* grace the server granted */
    uint8_t version;   /* the server's protocol version */
    uint8_t reserved[3];
} livelock_session_reply;

LIVELOCK_STATIC_ASSERT(sizeof(livelock_session_reply) == 32, "livelock_session_reply size");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_session_reply, session_id_lo) == 0, "livelock_session_reply.session_id_lo");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_session_reply, session_id_hi) == 4, "livelock_session_reply.session_id_hi");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_session_reply, secret) == 8, "livelock_session_reply.secret");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_session_reply, grace_ms) == 24, "livelock_session_reply.grace_ms");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_session_reply, version) == 28, "livelock_session_reply.version");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_session_reply, reserved) == 29, "livelock_session_reply.reserved");

/* Fencing token: the whole body of an ACQUIRE reply with status OK (8 bytes),
 * and the start of a LOCK_LOST push body (then the lock name). */
typedef struct livelock_token {
    uint32_t token_lo; /* token (u64 on the wire), low half */
    uint32_t token_hi; /* high half */
} livelock_token;

LIVELOCK_STATIC_ASSERT(sizeof(livelock_token) == 8, "livelock_token size");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_token, token_lo) == 0, "livelock_token.token_lo");
LIVELOCK_STATIC_ASSERT(offsetof(livelock_token, token_hi) == 4, "livelock_token.token_hi");
