/*
 * livelock_client.c — a small LiveLock client in C11, using only
 * include/livelock.h and POSIX sockets.
 *
 *     livelock_client HOST PORT NAME [WAIT_MS] [HOLD_MS]
 *
 * Opens a session (HELLO), takes the lock NAME exclusively (ACQUIRE, waiting
 * at most WAIT_MS milliseconds: 0 tries once, "forever" or no argument waits
 * until granted), prints "token <N>" (the fencing token), holds the lock for
 * HOLD_MS milliseconds (default 0), then RELEASEs it and says BYE.
 *
 * Exit status: 0 on success, 75 (EX_TEMPFAIL) when the lock is busy or the
 * wait ran out, 1 on any other error (the status name and code and the
 * server's message are printed on stderr).
 *
 * The password, if the server wants one, is taken from $LIVELOCK_PASSWORD.
 *
 * Build: cc -std=c11 -Wall -Wextra -Werror -I include \
 *            examples/c/livelock_client.c -o livelock_client
 */
#define _POSIX_C_SOURCE 200809L

#include "livelock.h"

#include <errno.h>
#include <limits.h>
#include <netdb.h>
#include <poll.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

enum {
    EXIT_LOCKED_OK = 0,
    EXIT_ERROR = 1,
    EXIT_NOT_LOCKED = 75, /* EX_TEMPFAIL: busy or timed out; try again later */
};

/* ---- Small helpers ------------------------------------------------------ */

static int fail(const char *format, ...) {
    va_list args;
    va_start(args, format);
    fputs("livelock_client: ", stderr);
    vfprintf(stderr, format, args);
    fputc('\n', stderr);
    va_end(args);
    return EXIT_ERROR;
}

/* The status names of docs/PROTOCOL.md section 6; NULL for unassigned codes. */
static const char *status_name(uint16_t status) {
    static const char *const names[] = {
        [LIVELOCK_STATUS_OK] = "Ok",
        [LIVELOCK_STATUS_BUSY] = "Busy",
        [LIVELOCK_STATUS_TIMED_OUT] = "TimedOut",
        [LIVELOCK_STATUS_CANCELLED] = "Cancelled",
        [LIVELOCK_STATUS_QUEUED] = "Queued",
        [LIVELOCK_STATUS_NOT_HELD] = "NotHeld",
        [LIVELOCK_STATUS_ALREADY_HELD] = "AlreadyHeld",
        [LIVELOCK_STATUS_NO_SUCH_REQUEST] = "NoSuchRequest",
        [LIVELOCK_STATUS_WRONG_TOKEN] = "WrongToken",
        [LIVELOCK_STATUS_BAD_VERSION] = "BadVersion",
        [LIVELOCK_STATUS_UNKNOWN_OPCODE] = "UnknownOpcode",
        [LIVELOCK_STATUS_BAD_BODY] = "BadBody",
        [LIVELOCK_STATUS_BAD_NAME] = "BadName",
        [LIVELOCK_STATUS_NO_SESSION] = "NoSession",
        [LIVELOCK_STATUS_AUTH] = "Auth",
        [LIVELOCK_STATUS_SESSION_EXISTS] = "SessionExists",
        [LIVELOCK_STATUS_UNKNOWN_SESSION] = "UnknownSession",
        [LIVELOCK_STATUS_TOO_MANY_HOLDS] = "TooManyHolds",
        [LIVELOCK_STATUS_TOO_MANY_WAITERS] = "TooManyWaiters",
        [LIVELOCK_STATUS_TOO_MANY_IN_FLIGHT] = "TooManyInFlight",
        [LIVELOCK_STATUS_DUPLICATE_REQUEST_ID] = "DuplicateRequestId",
        [LIVELOCK_STATUS_SHUTTING_DOWN] = "ShuttingDown",
        [LIVELOCK_STATUS_FRAME_TOO_LARGE] = "FrameTooLarge",
        [LIVELOCK_STATUS_HELLO_TIMEOUT] = "HelloTimeout",
        [LIVELOCK_STATUS_SERVER_BUSY] = "ServerBusy",
    };
    if (status >= sizeof names / sizeof names[0]) {
        return NULL;
    }
    return names[status];
}

/* Parses a decimal number of milliseconds below LIVELOCK_WAIT_FOREVER. */
static bool parse_ms(const char *text, uint32_t *out) {
    if (text[0] < '0' || text[0] > '9') {
        return false; /* strtoul would accept " 5", "+5" and "-5" */
    }
    errno = 0;
    char *end = NULL;
    unsigned long value = strtoul(text, &end, 10);
    if (errno != 0 || *end != '\0' || value >= LIVELOCK_WAIT_FOREVER) {
        return false;
    }
    *out = (uint32_t)value;
    return true;
}

static uint64_t token_value(const livelock_token *token) {
    return (uint64_t)token->token_lo | ((uint64_t)token->token_hi << 32);
}

/* ---- Socket I/O: whole buffers, whatever the kernel hands back ---------- */

/* Connects to one host at PORT (any address family); -1 on failure, with
 * why in `why`. */
static int connect_one(const char *host, const char *port, char *why, size_t why_len) {
    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    struct addrinfo *addrs = NULL;
    int rc = getaddrinfo(host, port, &hints, &addrs);
    if (rc != 0) {
        snprintf(why, why_len, "cannot resolve %s:%s: %s", host, port, gai_strerror(rc));
        return -1;
    }
    int fd = -1;
    for (struct addrinfo *a = addrs; a != NULL; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype, a->ai_protocol);
        if (fd >= 0 && connect(fd, a->ai_addr, a->ai_addrlen) == 0) {
            break;
        }
        snprintf(why, why_len, "cannot connect to %s:%s: %s", host, port, strerror(errno));
        if (fd >= 0) {
            close(fd);
        }
        fd = -1;
    }
    freeaddrinfo(addrs);
    return fd;
}

/* Connects to the first of HOSTS (comma-separated: the nodes of a cluster,
 * any of which relays to the leader) that accepts a connection at PORT;
 * -1 on failure. */
static int connect_to(const char *hosts, const char *port) {
    char list[1024];
    if (strlen(hosts) >= sizeof list) {
        fail("HOST is longer than %zu bytes", sizeof list - 1);
        return -1;
    }
    strcpy(list, hosts);
    char why[512] = "no host given";
    for (char *host = strtok(list, ","); host != NULL; host = strtok(NULL, ",")) {
        int fd = connect_one(host, port, why, sizeof why);
        if (fd >= 0) {
            return fd;
        }
    }
    /* None answered: the last host's reason. */
    fail("%s", why);
    return -1;
}

/* Writes all of buf: send() may take less than asked. */
static bool write_all(int fd, const void *buf, size_t len) {
    const unsigned char *p = buf;
    while (len > 0) {
        /* MSG_NOSIGNAL: a closed peer is an EPIPE error here, not a SIGPIPE. */
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            fail("write: %s", n < 0 ? strerror(errno) : "wrote nothing");
            return false;
        }
        p += n;
        len -= (size_t)n;
    }
    return true;
}

/* Reads exactly len bytes: recv() may return any part of what was sent. */
static bool read_exact(int fd, void *buf, size_t len) {
    unsigned char *p = buf;
    while (len > 0) {
        ssize_t n = recv(fd, p, len, 0);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n == 0) {
            fail("the server closed the connection");
            return false;
        }
        if (n < 0) {
            fail("read: %s", strerror(errno));
            return false;
        }
        p += n;
        len -= (size_t)n;
    }
    return true;
}

/* ---- Frames ------------------------------------------------------------- */

/* One frame from the server; body is NUL-terminated for printing. */
typedef struct frame {
    livelock_header header;
    unsigned char body[LIVELOCK_FRAME_BODY_MAX + 1];
} frame;

/* Sends one request: the header, then the fixed part, then the bytes after it. */
static bool send_request(int fd, uint8_t opcode, uint16_t flags, uint32_t request_id,
                         const void *fixed, size_t fixed_len,
                         const void *rest, size_t rest_len) {
    unsigned char buf[LIVELOCK_HEADER_LEN + LIVELOCK_FRAME_BODY_MAX];
    if (fixed_len + rest_len > LIVELOCK_FRAME_BODY_MAX) {
        fail("request body too large (%zu bytes)", fixed_len + rest_len);
        return false;
    }
    livelock_header header;
    memset(&header, 0, sizeof header);
    header.magic = LIVELOCK_MAGIC;
    header.version = LIVELOCK_VERSION;
    header.opcode = opcode;
    header.flags = flags;
    header.request_id = request_id;
    header.body_len = (uint32_t)(fixed_len + rest_len);
    /* memcpy, not pointer casts: the wire has no alignment. */
    memcpy(buf, &header, sizeof header);
    if (fixed_len > 0) {
        memcpy(buf + sizeof header, fixed, fixed_len);
    }
    if (rest_len > 0) {
        memcpy(buf + sizeof header + fixed_len, rest, rest_len);
    }
    return write_all(fd, buf, sizeof header + fixed_len + rest_len);
}

/* Reads one frame and checks that the stream is sane (docs/PROTOCOL.md §8). */
static bool read_frame(int fd, frame *f) {
    unsigned char raw[LIVELOCK_HEADER_LEN];
    if (!read_exact(fd, raw, sizeof raw)) {
        return false;
    }
    memcpy(&f->header, raw, sizeof raw);
    const livelock_header *h = &f->header;
    if (h->magic != LIVELOCK_MAGIC || h->version != LIVELOCK_VERSION ||
        h->body_len > LIVELOCK_FRAME_BODY_MAX || status_name(h->status) == NULL) {
        fail("broken frame from the server (magic %04x, version %u, status %u, %u body bytes)",
             (unsigned)h->magic, (unsigned)h->version, (unsigned)h->status,
             (unsigned)h->body_len);
        return false;
    }
    if (!read_exact(fd, f->body, h->body_len)) {
        return false;
    }
    f->body[h->body_len] = '\0';
    return true;
}

/* Reports a server push (a frame not answering any request); false when the
 * lock or the session is gone because of it. */
static bool handle_push(const frame *f) {
    switch (f->header.opcode) {
    case LIVELOCK_OP_SIGNALLED:
        fprintf(stderr, "livelock_client: a signal was raised on the lock\n");
        return true;
    case LIVELOCK_OP_LOCK_LOST:
        fail("the lock was lost (its lease ran out)");
        return false;
    case LIVELOCK_OP_SHUTDOWN:
        fail("the server is shutting down");
        return false;
    case LIVELOCK_OP_SESSION_TAKEN:
        fail("another connection took the session");
        return false;
    default:
        fail("unexpected frame (opcode 0x%02x, request %u)",
             (unsigned)f->header.opcode, (unsigned)f->header.request_id);
        return false;
    }
}

/* Reads until the final reply to request_id (skipping an INTERIM reply and
 * handling pushes on the way). */
static bool read_reply(int fd, uint32_t request_id, frame *f) {
    for (;;) {
        if (!read_frame(fd, f)) {
            return false;
        }
        if (f->header.request_id == request_id && f->header.opcode < LIVELOCK_OP_LOCK_LOST) {
            if (f->header.flags & LIVELOCK_FLAG_INTERIM) {
                continue; /* QUEUED; the final reply follows */
            }
            return true;
        }
        if (!handle_push(f)) {
            return false;
        }
    }
}

/* Prints an error reply: status name, code, and the server's message. */
static int fail_status(const char *what, const frame *f) {
    uint16_t status = f->header.status;
    if (f->header.body_len > 0) {
        return fail("%s: %s (status %u): %s", what, status_name(status), (unsigned)status,
                    (const char *)f->body);
    }
    return fail("%s: %s (status %u)", what, status_name(status), (unsigned)status);
}

/* Sends a request and reads its final reply; false (error printed) unless Ok. */
static bool call_ok(int fd, const char *what, uint8_t opcode, uint16_t flags,
                    uint32_t request_id, const void *fixed, size_t fixed_len, const void *rest,
                    size_t rest_len, frame *reply) {
    if (!send_request(fd, opcode, flags, request_id, fixed, fixed_len, rest, rest_len) ||
        !read_reply(fd, request_id, reply)) {
        return false;
    }
    if (reply->header.status != LIVELOCK_STATUS_OK) {
        fail_status(what, reply);
        return false;
    }
    return true;
}

/* Keeps the lock for hold_ms while watching the connection: a push (lease
 * lost, server shutting down) or a closed socket ends the hold early. */
static bool hold(int fd, uint32_t hold_ms) {
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        int64_t elapsed_ms = (int64_t)(now.tv_sec - start.tv_sec) * 1000 +
                             (now.tv_nsec - start.tv_nsec) / 1000000;
        if (elapsed_ms >= (int64_t)hold_ms) {
            return true;
        }
        int64_t left_ms = (int64_t)hold_ms - elapsed_ms;
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        int ready = poll(&pfd, 1, left_ms > INT_MAX ? INT_MAX : (int)left_ms);
        if (ready < 0 && errno != EINTR) {
            fail("poll: %s", strerror(errno));
            return false;
        }
        if (ready > 0) {
            frame f;
            if (!read_frame(fd, &f) || !handle_push(&f)) {
                return false;
            }
        }
    }
}

/* ---- The client --------------------------------------------------------- */

static int usage(void) {
    fputs("usage: livelock_client HOST PORT NAME [WAIT_MS|forever] [HOLD_MS]\n"
          "  exit 0: locked, held and released; 75: busy or timed out; 1: error\n",
          stderr);
    return EXIT_ERROR;
}

/* Everything after connect; the caller closes fd. */
static int session(int fd, const char *name, uint32_t wait_ms, uint32_t hold_ms) {
    frame reply;
    size_t name_len = strlen(name);

    /* HELLO: no grace, so the lock goes when this connection goes. */
    const char *password = getenv("LIVELOCK_PASSWORD");
    size_t password_len = password ? strlen(password) : 0;
    char client_name[64];
    snprintf(client_name, sizeof client_name, "livelock_client.c:%ld", (long)getpid());
    size_t client_name_len = strlen(client_name);
    if (password_len > LIVELOCK_PASSWORD_LEN_MAX) {
        return fail("LIVELOCK_PASSWORD is longer than %u bytes", LIVELOCK_PASSWORD_LEN_MAX);
    }
    unsigned char credentials[LIVELOCK_PASSWORD_LEN_MAX + sizeof client_name];
    if (password_len > 0) {
        memcpy(credentials, password, password_len);
    }
    memcpy(credentials + password_len, client_name, client_name_len);
    livelock_hello hello = {
        .grace_ms = 0,
        .password_len = (uint16_t)password_len,
        .client_name_len = (uint16_t)client_name_len,
    };
    if (!call_ok(fd, "HELLO", LIVELOCK_OP_HELLO, 0, 1, &hello, sizeof hello, credentials,
                 password_len + client_name_len, &reply)) {
        return EXIT_ERROR;
    }
    if (reply.header.body_len != sizeof(livelock_session_reply)) {
        return fail("HELLO: session reply of %u bytes", (unsigned)reply.header.body_len);
    }

    /* ACQUIRE: exclusive, no lease. */
    livelock_acquire acquire = {
        .mode = LIVELOCK_MODE_EXCLUSIVE,
        .acq_flags = 0,
        .reserved = 0,
        .wait_ms = wait_ms,
        .lease_ms = 0,
    };
    if (!send_request(fd, LIVELOCK_OP_ACQUIRE, 0, 2, &acquire, sizeof acquire, name, name_len) ||
        !read_reply(fd, 2, &reply)) {
        return EXIT_ERROR;
    }
    uint16_t status = reply.header.status;
    if (status == LIVELOCK_STATUS_BUSY || status == LIVELOCK_STATUS_TIMED_OUT) {
        /* Not an error: someone else has it. The session ends with the connection. */
        fprintf(stderr, "livelock_client: %s %s: %s (status %u)\n", name,
                status == LIVELOCK_STATUS_BUSY ? "is held by someone else"
                                               : "was still held when the wait ran out",
                status_name(status), (unsigned)status);
        return EXIT_NOT_LOCKED;
    }
    if (status != LIVELOCK_STATUS_OK) {
        return fail_status("ACQUIRE", &reply);
    }
    if (reply.header.body_len != sizeof(livelock_token)) {
        return fail("ACQUIRE: grant of %u bytes", (unsigned)reply.header.body_len);
    }
    livelock_token token;
    memcpy(&token, reply.body, sizeof token);
    printf("token %llu\n", (unsigned long long)token_value(&token));
    fflush(stdout); /* whoever reads our stdout learns of the grant now */

    if (!hold(fd, hold_ms)) {
        return EXIT_ERROR;
    }

    /* By token: only this hold is released, never a later one. */
    if (!call_ok(fd, "RELEASE", LIVELOCK_OP_RELEASE, LIVELOCK_FLAG_HOLD_TOKEN, 3, &token,
                 sizeof token, name, name_len, &reply) ||
        !call_ok(fd, "BYE", LIVELOCK_OP_BYE, 0, 4, NULL, 0, NULL, 0, &reply)) {
        return EXIT_ERROR;
    }
    return EXIT_LOCKED_OK;
}

int main(int argc, char **argv) {
    if (argc < 4 || argc > 6) {
        return usage();
    }
    const char *host = argv[1];
    const char *port = argv[2];
    const char *name = argv[3];
    uint32_t wait_ms = LIVELOCK_WAIT_FOREVER;
    uint32_t hold_ms = 0;
    if (argc > 4 && strcmp(argv[4], "forever") != 0 && !parse_ms(argv[4], &wait_ms)) {
        fail("WAIT_MS must be a number of milliseconds or \"forever\", not \"%s\"", argv[4]);
        return usage();
    }
    if (argc > 5 && !parse_ms(argv[5], &hold_ms)) {
        fail("HOLD_MS must be a number of milliseconds, not \"%s\"", argv[5]);
        return usage();
    }
    size_t name_len = strlen(name);
    if (name_len == 0 || name_len > LIVELOCK_NAME_LEN_MAX) {
        fail("NAME must be 1 to %u bytes", LIVELOCK_NAME_LEN_MAX);
        return usage();
    }

    int fd = connect_to(host, port);
    if (fd < 0) {
        return EXIT_ERROR;
    }
    int code = session(fd, name, wait_ms, hold_ms);
    close(fd);
    return code;
}
