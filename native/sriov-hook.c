/*
 * sriov-hook: the compiled thin client that runtimes start for every container.
 *
 * It does what sriov_hook/client.py does, byte for byte on the wire, without
 * an interpreter: a Python start alone (7-10 ms on a small VM) is a third of
 * what the Go host-device CNI plugin takes for a whole ADD. client.py stays
 * the definition of the wire format and the portable client (bin/sriov-hook).
 *
 *   request  "SRH1 <len> <len> ...\n" + fields: op, config path, argv..., stdin
 *   answer   "SRH1 <kind> <status> <len out> <len err>\n" + out + err
 *
 * Whenever the agent cannot answer (no socket, a refused connection, a refusal,
 * an answer cut off because the agent died) the hook runs in-process exactly as
 * without an agent: this program execs the Python beside it (the venv's
 * bin/python, found through /proc/self/exe) on ``-I -m sriov_hook.inprocess``,
 * with the state it already read put back on stdin through a memfd. Commands
 * other than the three hook stages go straight there.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

/* Keep in step with sriov_hook/client.py (tests/test_client_native.py checks). */
#define MAGIC "SRH1"
#define DEFAULT_CONFIG "/etc/sriov-hook/config.yaml"
#define DEFAULT_SOCKET "/run/sriov-hook/agent.sock"
#define MAX_STATE (1 << 20)          /* one byte more still gets its "larger than" error */
#define MAX_CONFIG_SCAN (1 << 20)
#define MAX_ANSWER (64 << 20)        /* far above any real answer: more is a broken agent */
#define ANSWER_TIMEOUT_MS 120000     /* per read or write, as client.py's socket timeout */
#define ENV_NO_AGENT "SRIOV_HOOK_NO_AGENT"
#define ENV_CONFIG "SRIOV_HOOK_CONFIG"

struct buf {
    char *data;
    size_t len, cap;
};

__attribute__((noreturn)) static void die(const char *what) {
    fprintf(stderr, "sriov-hook: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void put(struct buf *b, const void *data, size_t n) {
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *p = realloc(b->data, cap);
        if (p == NULL)
            die("out of memory");
        b->data = p;
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, n);
    b->len += n;
    b->data[b->len] = '\0';
}

/* Up to ``limit`` bytes from fd; -1 on a read error. */
static int read_upto(int fd, struct buf *b, size_t limit) {
    char chunk[65536];
    while (b->len < limit) {
        size_t want = limit - b->len < sizeof chunk ? limit - b->len : sizeof chunk;
        ssize_t n = read(fd, chunk, want);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        if (n == 0)
            break;
        put(b, chunk, (size_t)n);
    }
    return 0;
}

/* -- routing, as client.scan_argv / resolve_config / socket_path ----------------------- */
static const char *const STAGES[] = {"prestart", "createRuntime", "poststop"};

/* Sets *config to the --config value; returns the command, or NULL (--help, none). */
static const char *scan_argv(int argc, char **argv, const char **config) {
    *config = NULL;
    for (int i = 1; i < argc;) {
        const char *arg = argv[i];
        if (!strcmp(arg, "-c") || !strcmp(arg, "--config")) {
            if (i + 1 >= argc)
                return NULL;
            *config = argv[i + 1];
            i += 2;
            continue;
        }
        if (!strncmp(arg, "--config=", 9))
            *config = arg + 9;
        else if (!strcmp(arg, "-h") || !strcmp(arg, "--help"))
            return NULL;
        else
            return arg;
        i++;
    }
    return NULL;
}

static int is_stage(const char *cmd) {
    for (size_t i = 0; cmd && i < sizeof STAGES / sizeof *STAGES; i++)
        if (!strcmp(cmd, STAGES[i]))
            return 1;
    return 0;
}

/* Absolute, because the agent has another cwd. */
static void resolve_config(const char *cli, struct buf *out) {
    const char *path = cli && *cli ? cli : getenv(ENV_CONFIG);
    if (path == NULL || *path == '\0')
        path = DEFAULT_CONFIG;
    if (path[0] != '/') {
        char cwd[PATH_MAX];
        if (getcwd(cwd, sizeof cwd) == NULL)
            die("cannot read the current directory");
        put(out, cwd, strlen(cwd));
        if (cwd[strlen(cwd) - 1] != '/')
            put(out, "/", 1);
    }
    put(out, path, strlen(path));
}

/* Python's bytes.strip(): ASCII whitespace. */
static int py_space(char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

/* One "agent_socket:" line's value, as client.socket_path reads it; 0 if not a path. */
static int socket_value(const char *v, size_t n, struct buf *out) {
    while (n && py_space(*v))
        v++, n--;
    while (n && py_space(v[n - 1]))
        n--;
    if (n && (*v == '"' || *v == '\'')) {
        const char *end = memchr(v + 1, *v, n - 1);
        n = end ? (size_t)(end - v - 1) : n - 1;
        v++;
    } else {
        for (size_t i = 0; i + 1 < n; i++)
            if (v[i] == ' ' && v[i + 1] == '#') {
                n = i;
                break;
            }
        while (n && py_space(v[n - 1]))
            n--;
    }
    if (n == 0 || v[0] != '/' || memchr(v, '\0', n))
        return 0;
    put(out, v, n);
    return 1;
}

/* The config's top-level agent_socket, read without a YAML parser. A guess is
 * safe: the agent serves only requests naming its own config. */
static void socket_path(const char *config, struct buf *out) {
    struct buf text = {0};
    int fd = open(config, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        if (read_upto(fd, &text, MAX_CONFIG_SCAN) < 0)
            text.len = 0;
        close(fd);
    }
    static const char key[] = "agent_socket:";
    for (size_t at = 0; at < text.len;) {
        const char *line = text.data + at;
        const char *nl = memchr(line, '\n', text.len - at);
        size_t n = nl ? (size_t)(nl - line) : text.len - at;
        if (n >= sizeof key - 1 && !memcmp(line, key, sizeof key - 1) &&
            socket_value(line + sizeof key - 1, n - (sizeof key - 1), out)) {
            free(text.data);
            return;
        }
        at += n + 1;
    }
    free(text.data);
    put(out, DEFAULT_SOCKET, strlen(DEFAULT_SOCKET));
}

/* -- the wire ---------------------------------------------------------------------------- */
static void encode_request(struct buf *req, const char *config, int argc, char **argv,
                           const struct buf *state) {
    char num[32];
    put(req, MAGIC, 4);
    snprintf(num, sizeof num, " %zu %zu", (size_t)4, strlen(config));
    put(req, num, strlen(num));
    for (int i = 1; i < argc; i++) {
        snprintf(num, sizeof num, " %zu", strlen(argv[i]));
        put(req, num, strlen(num));
    }
    snprintf(num, sizeof num, " %zu\n", state->len);
    put(req, num, strlen(num));
    put(req, "hook", 4);
    put(req, config, strlen(config));
    for (int i = 1; i < argc; i++)
        put(req, argv[i], strlen(argv[i]));
    put(req, state->data ? state->data : "", state->len);
}

enum { ASK_ANSWERED, ASK_NO_AGENT, ASK_TIMEOUT };

/* 0 once ``fd`` is ready; ASK_TIMEOUT, or ASK_NO_AGENT on a poll error. */
static int wait_for(int fd, short events) {
    struct pollfd p = {.fd = fd, .events = events};
    for (;;) {
        int r = poll(&p, 1, ANSWER_TIMEOUT_MS);
        if (r > 0)
            return 0;
        if (r == 0)
            return ASK_TIMEOUT;
        if (errno != EINTR)
            return ASK_NO_AGENT;
    }
}

/* After a send or recv that failed: 0 to try again (interrupted, or ready after
 * a wait), else why ask() stops (a reset means the agent died). */
static int again_or_stop(int fd, short events) {
    if (errno == EINTR)
        return 0;
    if (errno == EAGAIN || errno == EWOULDBLOCK)
        return wait_for(fd, events);
    return ASK_NO_AGENT;
}

/* The agent's raw answer into ``ans``. */
static int ask(const char *path, const struct buf *req, struct buf *ans) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path)
        return ASK_NO_AGENT;
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return ASK_NO_AGENT;
    int rc = ASK_NO_AGENT;
    /* Blocking, as client.py's: a full backlog waits rather than runs in-process. */
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0)
        goto out;   /* absent, refused, not ours to open: run in-process */
    for (size_t sent = 0; sent < req->len;) {
        ssize_t n = send(fd, req->data + sent, req->len - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n >= 0)
            sent += (size_t)n;
        else if ((rc = again_or_stop(fd, POLLOUT)) != 0)
            goto out;
    }
    shutdown(fd, SHUT_WR);
    for (;;) {
        char chunk[65536];
        ssize_t n = recv(fd, chunk, sizeof chunk, MSG_DONTWAIT);
        if (n == 0)
            break;
        if (n > 0 && ans->len + (size_t)n > MAX_ANSWER) {
            rc = ASK_NO_AGENT;   /* no agent says that much: a broken one */
            goto out;
        }
        if (n > 0)
            put(ans, chunk, (size_t)n);
        else if ((rc = again_or_stop(fd, POLLIN)) != 0)
            goto out;
    }
    rc = ASK_ANSWERED;
out:
    close(fd);
    return rc;
}

/* A decimal field of the answer's head: digits only, or a minus and digits. */
static int parse_int(const char *s, size_t n, long long *v) {
    size_t i = (n && s[0] == '-') ? 1 : 0;
    if (i == n || n - i > 18)
        return -1;
    long long x = 0;
    for (size_t j = i; j < n; j++) {
        if (s[j] < '0' || s[j] > '9')
            return -1;
        x = x * 10 + (s[j] - '0');
    }
    *v = i ? -x : x;
    return 0;
}

struct answer {
    int done;           /* "done": replay it; else run in-process */
    long long status;
    const char *out, *err;
    size_t out_len, err_len;
};

/* As client.decode_answer: -1 for a missing or cut-off answer. */
static int decode_answer(const struct buf *ans, struct answer *a) {
    const char *nl = ans->len ? memchr(ans->data, '\n', ans->len) : NULL;
    if (nl == NULL)
        return -1;
    const char *words[5];
    size_t lens[5], count = 0;
    for (const char *p = ans->data; p <= nl; count++) {
        const char *sp = memchr(p, ' ', (size_t)(nl - p));
        const char *end = sp ? sp : nl;
        if (count == 5)
            return -1;
        words[count] = p;
        lens[count] = (size_t)(end - p);
        p = end + 1;
    }
    long long n_out, n_err;
    if (count != 5 || lens[0] != 4 || memcmp(words[0], MAGIC, 4) ||
        parse_int(words[2], lens[2], &a->status) || parse_int(words[3], lens[3], &n_out) ||
        parse_int(words[4], lens[4], &n_err) || n_out < 0 || n_err < 0)
        return -1;
    size_t body = ans->len - (size_t)(nl + 1 - ans->data);
    if ((unsigned long long)n_out + (unsigned long long)n_err != body)
        return -1;
    a->done = lens[1] == 4 && !memcmp(words[1], "done", 4);
    a->out = nl + 1;
    a->out_len = (size_t)n_out;
    a->err = a->out + n_out;
    a->err_len = (size_t)n_err;
    return 0;
}

static void write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return;
        p += w;
        n -= (size_t)w;
    }
}

/* -- in-process: the Python beside this program --------------------------------------- */
__attribute__((noreturn)) static void in_process(int argc, char **argv, const struct buf *state) {
    char exe[PATH_MAX], python[PATH_MAX + 16];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n < 0)
        die("cannot find its own path in /proc/self/exe");
    exe[n] = '\0';
    char *slash = strrchr(exe, '/');
    if (slash != NULL)
        *slash = '\0';
    snprintf(python, sizeof python, "%s/python", exe);
    if (state != NULL) {
        /* The state was read already: hand the same bytes on as stdin. */
        int fd = memfd_create("sriov-hook-state", MFD_CLOEXEC);
        if (fd < 0)
            die("memfd_create");
        write_all(fd, state->data ? state->data : "", state->len);
        if (lseek(fd, 0, SEEK_SET) < 0 || dup2(fd, 0) < 0)
            die("cannot put the state back on stdin");
        close(fd);
    }
    /* -I: runtimes run hooks in the bundle directory, and -m alone would put
     * that directory first on sys.path (and let PYTHON* variables steer a hook
     * that runs as root). */
    char **args = calloc((size_t)argc + 5, sizeof *args);
    if (args == NULL)
        die("out of memory");
    args[0] = python;
    args[1] = "-I";
    args[2] = "-m";
    args[3] = "sriov_hook.inprocess";
    for (int i = 1; i < argc; i++)
        args[i + 3] = argv[i];
    execv(python, args);
    fprintf(stderr, "sriov-hook: cannot run %s: %s\n", python, strerror(errno));
    exit(1);
}

int main(int argc, char **argv) {
    const char *config_arg;
    const char *cmd = scan_argv(argc, argv, &config_arg);
    const char *no_agent = getenv(ENV_NO_AGENT);
    if (!is_stage(cmd) || (no_agent && !strcmp(no_agent, "1")))
        in_process(argc, argv, NULL);

    struct buf state = {0}, config = {0}, sock = {0}, req = {0}, ans = {0};
    if (read_upto(0, &state, MAX_STATE + 1) < 0)
        state.len = 0;   /* as if empty: the state parser says what is missing */
    resolve_config(config_arg, &config);
    socket_path(config.data, &sock);
    encode_request(&req, config.data, argc, argv, &state);

    int rc = ask(sock.data, &req, &ans);
    if (rc == ASK_TIMEOUT) {
        fprintf(stderr, "sriov-hook: the agent at %s did not answer within %ds\n", sock.data,
                ANSWER_TIMEOUT_MS / 1000);
        return 1;
    }
    struct answer a;
    if (rc != ASK_ANSWERED || decode_answer(&ans, &a) || !a.done)
        in_process(argc, argv, &state);
    write_all(1, a.out, a.out_len);
    write_all(2, a.err, a.err_len);
    return (int)(a.status & 0xff);
}
