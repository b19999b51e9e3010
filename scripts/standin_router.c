/*
 * The stand-in router of scripts/bench_worker.py, in C.
 *
 * It speaks just enough eMQP/1.0 to keep one worker busy: ACK to INFORM,
 * one REQUEST per READY it counts (never more), HEARTBEAT back to each
 * HEARTBEAT, and it waits for every job's REPLY. Written in C so that the
 * load generator costs a few microseconds per job and the figures are the
 * worker's: the same loop in Python cost 55-80 us per job on the reference
 * machine, as much as the worker under test, on a 2-core machine.
 *
 * libzmq is the one bundled with pyzmq; its few declarations are below, so
 * no header is needed. Built and run by bench_worker.py:
 *
 *   standin_router JOBS PAYLOAD_JSON [EDGE]
 *
 * stdout: "endpoint tcp://127.0.0.1:PORT", then "acked" when the worker's
 * INFORM is answered, then one line of JSON with the results. With EDGE
 * (the worker's -J), the steady state is reported as well: the rate between
 * the EDGE-th and the (JOBS - EDGE)-th REPLY, and the latencies of the jobs
 * sent after the first EDGE and before the last EDGE, so the start-up burst
 * (every slot offered at once) and the final drain (slots left idle) are
 * apart from the figures of a worker that is kept busy.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/resource.h>

typedef struct zmq_msg_t { _Alignas(8) unsigned char _[64]; } zmq_msg_t;
typedef struct { void *socket; int fd; short events; short revents; } zmq_pollitem_t;
void *zmq_ctx_new(void);
void *zmq_socket(void *, int);
int zmq_setsockopt(void *, int, const void *, size_t);
int zmq_getsockopt(void *, int, void *, size_t *);
int zmq_bind(void *, const char *);
int zmq_send(void *, const void *, size_t, int);
int zmq_msg_init(zmq_msg_t *);
int zmq_msg_recv(zmq_msg_t *, void *, int);
int zmq_msg_close(zmq_msg_t *);
void *zmq_msg_data(zmq_msg_t *);
size_t zmq_msg_size(const zmq_msg_t *);
int zmq_msg_more(const zmq_msg_t *);
int zmq_poll(zmq_pollitem_t *, int, long);
const char *zmq_strerror(int);
int zmq_errno(void);

enum { ZMQ_ROUTER = 6, ZMQ_DONTWAIT = 1, ZMQ_SNDMORE = 2, ZMQ_LINGER = 17,
       ZMQ_SNDHWM = 23, ZMQ_RCVHWM = 24, ZMQ_LAST_ENDPOINT = 32, ZMQ_POLLIN = 1 };

#define MAX_FRAMES 16
#define FRAME_MAX 4096

typedef struct { int n; size_t len[MAX_FRAMES]; char data[MAX_FRAMES][FRAME_MAX]; } message;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static void die(const char *what) {
    fprintf(stderr, "standin_router: %s: %s\n", what, zmq_strerror(zmq_errno()));
    exit(2);
}

/* Receive one whole message without waiting; 0 when none is there. */
static int recv_message(void *sock, message *m) {
    zmq_msg_t part;
    m->n = 0;
    for (;;) {
        zmq_msg_init(&part);
        if (zmq_msg_recv(&part, sock, m->n ? 0 : ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&part);
            if (m->n == 0) return 0;
            die("recv");
        }
        if (m->n < MAX_FRAMES) {
            size_t len = zmq_msg_size(&part);
            if (len > FRAME_MAX - 1) len = FRAME_MAX - 1;
            memcpy(m->data[m->n], zmq_msg_data(&part), len);
            m->data[m->n][len] = 0;
            m->len[m->n] = len;
            m->n++;
        }
        int more = zmq_msg_more(&part);
        zmq_msg_close(&part);
        if (!more) return 1;
    }
}

static void send_parts(void *sock, const char **parts, const size_t *lens, int n) {
    for (int i = 0; i < n; i++)
        if (zmq_send(sock, parts[i], lens[i], i < n - 1 ? ZMQ_SNDMORE : 0) < 0) die("send");
}

static unsigned long long counter = 0;

static void new_msgid(char *out) {
    snprintf(out, 37, "bbbbbbbb-0000-4000-8000-%012llx", counter++ & 0xffffffffffffULL);
}

/* A REQUEST's msgid carries the job's index, so a REPLY finds its send time. */
static void job_msgid(char *out, long i) {
    snprintf(out, 37, "00000000-0000-4000-8000-%012llu",
             (unsigned long long)i % 1000000000000ULL);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc != 3 && argc != 4) {
        fprintf(stderr, "usage: standin_router JOBS PAYLOAD_JSON [EDGE]\n");
        return 2;
    }
    long jobs = atol(argv[1]);
    const char *payload = argv[2];
    long edge = argc == 4 ? atol(argv[3]) : 0;
    if (edge < 0 || 4 * edge > jobs) edge = 0;  /* too few jobs for a steady state */
    double *sent_at = calloc(jobs, sizeof(double));
    double *latency = calloc(jobs, sizeof(double));
    double *by_job = calloc(jobs, sizeof(double));  /* latency by the job's send order */
    double *done_at = calloc(jobs, sizeof(double));  /* time of the k-th REPLY */
    if (!sent_at || !latency || !by_job || !done_at) return 2;

    void *ctx = zmq_ctx_new();
    void *sock = zmq_socket(ctx, ZMQ_ROUTER);
    int zero = 0;
    zmq_setsockopt(sock, ZMQ_SNDHWM, &zero, sizeof zero);
    zmq_setsockopt(sock, ZMQ_RCVHWM, &zero, sizeof zero);
    zmq_setsockopt(sock, ZMQ_LINGER, &zero, sizeof zero);
    if (zmq_bind(sock, "tcp://127.0.0.1:*") < 0) die("bind");
    char endpoint[256];
    size_t size = sizeof endpoint;
    zmq_getsockopt(sock, ZMQ_LAST_ENDPOINT, endpoint, &size);
    printf("endpoint %s\n", endpoint);
    fflush(stdout);

    static message m;
    char identity[256];
    size_t identity_len = 0;
    long credit = 0, next_job = 0, done = 0;
    double started = 0, last_from_worker = 0, longest_silence = 0, cpu_start = 0;
    double deadline = now() + 600;
    zmq_pollitem_t item = {sock, 0, ZMQ_POLLIN, 0};

    while (done < jobs) {
        if (now() > deadline) {
            fprintf(stderr, "standin_router: only %ld of %ld jobs done\n", done, jobs);
            return 1;
        }
        if (zmq_poll(&item, 1, 1000) <= 0) continue;
        while (recv_message(sock, &m)) {
            double t = now();
            if (started && last_from_worker && t - last_from_worker > longest_silence)
                longest_silence = t - last_from_worker;
            last_from_worker = t;
            if (m.n < 5) continue;
            const char *command = m.data[3];
            if (strcmp(command, "READY") == 0) {
                credit++;
            } else if (strcmp(command, "REPLY") == 0 && m.n >= 7) {
                long i = strtol(m.data[6] + 24, NULL, 10);
                if (i >= 0 && i < jobs && sent_at[i] > 0) {
                    by_job[i] = t - sent_at[i];
                    done_at[done] = t;
                    latency[done++] = by_job[i];
                    sent_at[i] = 0;
                }
            } else if (strcmp(command, "INFORM") == 0) {
                identity_len = m.len[0];
                memcpy(identity, m.data[0], identity_len);
                char id[40];
                new_msgid(id);
                const char *parts[] = {identity, "", "eMQP/1.0", "ACK", id, m.data[4]};
                size_t lens[] = {identity_len, 0, 8, 3, 36, m.len[4]};
                send_parts(sock, parts, lens, 6);
                started = now();
                cpu_start = cpu_seconds();
                printf("acked\n");
                fflush(stdout);
            } else if (strcmp(command, "HEARTBEAT") == 0 && identity_len) {
                char id[40], stamp[40];
                new_msgid(id);
                int n = snprintf(stamp, sizeof stamp, "%.6f", (double)time(NULL));
                const char *parts[] = {identity, "", "eMQP/1.0", "HEARTBEAT", id, stamp};
                size_t lens[] = {identity_len, 0, 8, 9, 36, (size_t)n};
                send_parts(sock, parts, lens, 6);
            }
        }
        double t = now();
        while (credit > 0 && next_job < jobs) {
            char id[40];
            job_msgid(id, next_job);
            const char *parts[] = {identity, "", "eMQP/1.0", "REQUEST", id, "default",
                                   "reply-requested", payload};
            size_t lens[] = {identity_len, 0, 8, 7, 36, 7, 15, strlen(payload)};
            sent_at[next_job] = t;
            send_parts(sock, parts, lens, 8);
            credit--;
            next_job++;
        }
    }
    double elapsed = now() - started;
    double cpu = cpu_seconds() - cpu_start;
    qsort(latency, jobs, sizeof(double), cmp_double);
    double sum = 0;
    for (long i = 0; i < jobs; i++) sum += latency[i];
    long p99 = (long)(0.99 * jobs);
    if (p99 >= jobs) p99 = jobs - 1;
    printf("{\"elapsed\": %.6f, \"p50\": %.6f, \"p99\": %.6f, \"mean\": %.6f, "
           "\"longest_silence\": %.6f, \"cpu\": %.6f",
           elapsed, latency[jobs / 2], latency[p99], sum / jobs, longest_silence, cpu);
    if (edge > 0) {
        long n = jobs - 2 * edge;
        double *steady = by_job + edge;  /* jobs edge .. jobs - edge - 1, in send order */
        qsort(steady, n, sizeof(double), cmp_double);
        long q = (long)(0.99 * n);
        if (q >= n) q = n - 1;
        printf(", \"steady_jobs\": %ld, \"steady_elapsed\": %.6f, \"steady_p50\": %.6f, "
               "\"steady_p99\": %.6f", n, done_at[jobs - edge - 1] - done_at[edge - 1],
               steady[n / 2], steady[q]);
    }
    printf("}\n");
    fflush(stdout);
    return 0;
}
