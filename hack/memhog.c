/* memhog: a stand-in for a stateful service with a slow start, for `make bench` and `make demo`.
 *
 * usage: memhog MIB [WARMUP_SECONDS [once]]
 * Fills MIB MiB of memory, half of every page with pseudo-random bytes and half with zeros
 * (so it compresses to about half), taking at least WARMUP_SECONDS as a slow-starting service
 * would, then prints "ready" and, every 200 ms, a counter and a checksum of the whole buffer
 * that only a faithful restore of its memory keeps, and the longest time in ms that the
 * process was stopped since the previous line (a ticker thread sees the gap: that is how the
 * benchmark measures the application's frozen time during a checkpoint). With "once" it exits
 * after filling: the benchmark uses that to have the VM's memory backed before it measures
 * anything.
 * MEMHOG_SEED=N makes the bytes the same in every process given the same N (pods holding the
 * same data); MEMHOG_CHURN=P makes SIGUSR1 rewrite the first P% of the buffer with new bytes
 * (what a service changes between two checkpoints) and print "rewrote M MiB". The ticker
 * prints "resumed after S s" when it was stopped for more than a second: after a restore,
 * that line is the process answering without touching its buffer (a lazy restore's first
 * sign of life, while the checksum rows wait for all of the memory). */
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* The ticker's clock: a restore by CRIU puts the process in a time namespace whose
 * monotonic clock continues from the dump, hiding the time it spent dumped; wall time does not. */
static double wall(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static volatile double max_gap;
static volatile sig_atomic_t churn_asked;

static void on_usr1(int sig) {
    (void)sig;
    churn_asked = 1;
}

/* Half of every page pseudo-random, half zeros, from word `from` to word `to`. */
static uint64_t fill(uint64_t *buf, size_t from, size_t to, uint64_t x) {
    size_t page = 4096 / 8;
    for (size_t i = from; i < to; i++) {
        if (i % page < page / 2) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; buf[i] = x; }
        else buf[i] = 0;
    }
    return x;
}

static void *ticker(void *arg) {
    (void)arg;
    double last = wall();
    for (;;) {
        usleep(1000);
        double t = wall();
        if (t - last > 1.0) {
            printf("resumed after %.2fs\n", t - last);
            fflush(stdout);
        }
        if (t - last > max_gap) max_gap = t - last;
        last = t;
    }
    return NULL;
}

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 64;
    double warmup = argc > 2 ? atof(argv[2]) : 0;
    size_t size = mib << 20;
    uint64_t *buf = malloc(size);
    if (!buf) { perror("malloc"); return 1; }
    double start = now();
    const char *seed = getenv("MEMHOG_SEED");
    uint64_t x = (seed ? strtoull(seed, NULL, 10) : (uint64_t)time(NULL)) * 2654435761u | 1;
    size_t words = size / 8;
    x = fill(buf, 0, words, x);
    if (argc > 3) return 0;
    const char *churn = getenv("MEMHOG_CHURN");
    size_t churn_words = churn ? (size_t)(words * (atof(churn) / 100.0)) / 512 * 512 : 0;
    if (churn_words) signal(SIGUSR1, on_usr1);
    double left = warmup - (now() - start);
    if (left > 0) usleep((useconds_t)(left * 1e6));
    printf("ready after %.2fs\n", now() - start);
    fflush(stdout);
    pthread_t t;
    pthread_create(&t, NULL, ticker, NULL);
    for (uint64_t n = 1;; n++) {
        if (churn_asked) {
            churn_asked = 0;
            x = fill(buf, 0, churn_words, x ^ (uint64_t)(now() * 1e6));
            printf("rewrote %zu MiB\n", churn_words * 8 >> 20);
        }
        uint64_t sum = 0;
        for (size_t i = 0; i < words; i += 64) sum += buf[i];
        double gap = max_gap;
        max_gap = 0;
        printf("%llu %llu %.0f\n", (unsigned long long)n, (unsigned long long)sum, gap * 1000);
        fflush(stdout);
        usleep(200000);
    }
}
