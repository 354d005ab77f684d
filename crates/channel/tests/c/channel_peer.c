/*
 * A second implementation of the channel region layout, version 1, in C11, written from
 * docs/channel-spec.md alone (no Rust code read): it checks that the document is enough to
 * implement from, and the test `tests/c_peer.rs` runs it against the Rust library.
 *
 * It is a peer of a local bus (memfd + one eventfd per peer and vector), as the Rust
 * `LocalBus::pass_to` hands one to a child process in the IVSHM_LOCAL_BUS environment variable:
 * `v1:<id>:<peers>:<vectors>:<memfd>:<eventfd>,<eventfd>,...` (eventfds in peer-major order).
 * Ringing peer P's vector V writes 1 to eventfd P * vectors + V; waiting on our vector reads ours.
 *
 * Usage: channel_peer format CHANNELS RING_SIZE
 *   formats the blank region (prints `formatted channels=<N> ring_size=<R> layout_size=<L>`).
 *        channel_peer echo NAME COUNT
 *   opens channel NAME (joins it, or creates it), then COUNT times receives a message and sends
 *   it back; then closes its side. Waiting is "block at once" (spin budget 0): every wait arms
 *   the ring's event word and sleeps on the doorbell. Prints `side=a|b` once the channel is
 *   open and `echoed <COUNT> slept=<waits that slept>` at the end; exits 1 with a message on
 *   any error.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* Constants of the spec ("Constants"). */
#define MAGIC 0x4E484349u
#define MAGIC_FORMATTING 0x46484349u
#define VERSION 1u
#define HEADER_SIZE 128u
#define ENTRY_SIZE 128u
#define RING_CONTROL_SIZE 512u
#define RECORD_ALIGN 64u
#define INLINE_MAX 56u
#define PAYLOAD_INLINE 8u
#define PAYLOAD_ALIGNED 64u
#define NAME_MAX_LEN 31u
#define RING_SIZE_MIN 128u
#define RING_SIZE_MAX 1073741824u
#define CHANNELS_MAX 65536u
#define RINGS_ALIGN 4096u
#define LOCK_HELD 0x80000000u
#define EVENT_NONE 0xFFFFFFFFu

/* Field offsets (header, entry, ring control, record). */
#define H_MAGIC 0
#define H_VERSION 4
#define H_LAYOUT_SIZE 8
#define H_HEADER_SIZE 16
#define H_CHANNEL_COUNT 20
#define H_ENTRY_SIZE 24
#define H_RING_SIZE 28
#define H_DIRECTORY_OFFSET 32
#define H_RINGS_OFFSET 40
#define H_RING_CONTROL_SIZE 48
#define H_FLAGS 52
#define H_LOCK 64
#define E_STATE 0
#define E_GENERATION 4
#define E_NAME 8
#define E_SIDE_A 40
#define E_SIDE_B 44
#define E_RING_AB_OFFSET 48
#define E_RING_BA_OFFSET 56
#define E_RING_AB_SIZE 64
#define E_RING_BA_SIZE 68
#define R_TAIL 0
#define R_DATA_EVENT 128
#define R_SPACE_EVENT 256
#define REC_LEN 0
#define REC_SEQ 4

enum { EMPTY = 0, ATTACHED = 1, CLOSED = 2, GONE = 3 };

static uint8_t *base;
static uint64_t region_size;
static uint32_t channel_count, ring_size;
static uint64_t rings_offset;
static unsigned own_id, peers, vectors;
static unsigned long sleeps; /* waits that slept on the doorbell */
static int *eventfds;
static const int WAIT_MS = 20000;

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "channel_peer: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

/* --- Shared memory: 32-bit little-endian atomics on aligned words, bounds-checked. --- */

static _Atomic uint32_t *word(uint64_t off) {
    if (off % 4 != 0 || off > region_size - 4)
        die("access outside the region at %llu", (unsigned long long)off);
    return (_Atomic uint32_t *)(base + off);
}
static uint32_t load(uint64_t off, memory_order o) {
    return le32toh(atomic_load_explicit(word(off), o));
}
static void store(uint64_t off, uint32_t v, memory_order o) {
    atomic_store_explicit(word(off), htole32(v), o);
}
static int cas(uint64_t off, uint32_t expected, uint32_t desired) {
    uint32_t e = htole32(expected);
    return atomic_compare_exchange_strong_explicit(word(off), &e, htole32(desired),
                                                   memory_order_acq_rel, memory_order_acquire);
}
static uint64_t load64(uint64_t off) {
    return (uint64_t)load(off, memory_order_relaxed) |
           (uint64_t)load(off + 4, memory_order_relaxed) << 32;
}
static void store64(uint64_t off, uint64_t v) {
    store(off, (uint32_t)v, memory_order_relaxed);
    store(off + 4, (uint32_t)(v >> 32), memory_order_relaxed);
}
static void copy_out(uint64_t off, void *dst, uint32_t len) {
    if (off > region_size || len > region_size - off) die("copy outside the region");
    memcpy(dst, base + off, len);
}
static void copy_in(uint64_t off, const void *src, uint32_t len) {
    if (off > region_size || len > region_size - off) die("copy outside the region");
    memcpy(base + off, src, len);
}
static void fence(void) { atomic_thread_fence(memory_order_seq_cst); }

/* --- Doorbells. --- */

static void ring(unsigned peer, unsigned vector) {
    if (peer >= peers || vector >= vectors) die("cannot ring peer %u vector %u", peer, vector);
    uint64_t one = 1;
    if (write(eventfds[peer * vectors + vector], &one, 8) != 8) die("eventfd write: %s", strerror(errno));
}
static void sleep_on_doorbell(unsigned vector) {
    struct pollfd p = {.fd = eventfds[own_id * vectors + vector], .events = POLLIN};
    int n;
    do n = poll(&p, 1, WAIT_MS); while (n < 0 && errno == EINTR);
    if (n == 0) die("timed out waiting on the doorbell");
    if (n < 0) die("poll: %s", strerror(errno));
    uint64_t count;
    sleeps++;
    if (read(p.fd, &count, 8) != 8) die("eventfd read: %s", strerror(errno));
}

/* --- Region header ("Region", "Header"). --- */

static uint64_t expected_rings_offset(uint32_t channels) {
    uint64_t dir_end = HEADER_SIZE + (uint64_t)channels * ENTRY_SIZE;
    return (dir_end + RINGS_ALIGN - 1) / RINGS_ALIGN * RINGS_ALIGN;
}

static void expect(const char *field, uint64_t value, uint64_t wanted) {
    if (value != wanted)
        die("header field %s is %llu, expected %llu", field, (unsigned long long)value,
            (unsigned long long)wanted);
}

static void open_region(void) {
    uint32_t magic = load(H_MAGIC, memory_order_acquire);
    for (int i = 0; magic == MAGIC_FORMATTING && i < 2000; i++) {
        usleep(1000);
        magic = load(H_MAGIC, memory_order_acquire);
    }
    if (magic != MAGIC) die("not a formatted channel region (magic %#x)", magic);
    expect("version", load(H_VERSION, memory_order_relaxed), VERSION);
    channel_count = load(H_CHANNEL_COUNT, memory_order_relaxed);
    ring_size = load(H_RING_SIZE, memory_order_relaxed);
    if (channel_count < 1 || channel_count > CHANNELS_MAX) die("bad channel_count %u", channel_count);
    if (ring_size < RING_SIZE_MIN || ring_size > RING_SIZE_MAX || (ring_size & (ring_size - 1)))
        die("bad ring_size %u", ring_size);
    rings_offset = expected_rings_offset(channel_count);
    uint64_t layout = rings_offset + (uint64_t)channel_count * 2 * (RING_CONTROL_SIZE + ring_size);
    expect("header_size", load(H_HEADER_SIZE, memory_order_relaxed), HEADER_SIZE);
    expect("entry_size", load(H_ENTRY_SIZE, memory_order_relaxed), ENTRY_SIZE);
    expect("directory_offset", load64(H_DIRECTORY_OFFSET), HEADER_SIZE);
    expect("rings_offset", load64(H_RINGS_OFFSET), rings_offset);
    expect("ring_control_size", load(H_RING_CONTROL_SIZE, memory_order_relaxed), RING_CONTROL_SIZE);
    expect("flags", load(H_FLAGS, memory_order_relaxed), 0);
    expect("layout_size", load64(H_LAYOUT_SIZE), layout);
    if (layout > region_size) die("layout of %llu bytes does not fit the region", (unsigned long long)layout);
}

static uint64_t entry_offset(uint32_t i) { return HEADER_SIZE + (uint64_t)i * ENTRY_SIZE; }
static uint64_t ring_offset(uint32_t i, int b_to_a) {
    return rings_offset + (2 * (uint64_t)i + (uint64_t)b_to_a) * (RING_CONTROL_SIZE + ring_size);
}

/* --- Side words. --- */

static uint32_t side_word(uint32_t state, unsigned peer, unsigned vector) {
    return state << 24 | (uint32_t)vector << 16 | peer;
}
static uint32_t side_state(uint32_t w) { return w >> 24; /* > 3: corrupt (bits 28..32 set) */ }
static unsigned side_peer(uint32_t w) { return w & 0xffff; }
static unsigned side_vector(uint32_t w) { return w >> 16 & 0xff; }

/* --- The directory lock. --- */

static void lock(void) {
    uint32_t mine = LOCK_HELD | own_id;
    for (int turn = 0; !cas(H_LOCK, 0, mine); turn++) {
        if (turn > 20000) die("directory locked by peer %u", load(H_LOCK, memory_order_relaxed) & 0xffff);
        usleep(50);
    }
}
static void unlock(void) {
    if (!cas(H_LOCK, LOCK_HELD | own_id, 0)) die("directory lock was not ours any more");
}

/* --- A channel endpoint. --- */

struct endpoint {
    uint64_t entry;
    uint64_t own_side, peer_side; /* region offsets of the side words */
    uint32_t own_word;
    unsigned vector;
    uint64_t tx, rx; /* control blocks: the ring we produce into, the ring we consume */
    uint32_t head, cached_tail, pos;
};

static uint64_t data(uint64_t ctl, uint32_t p) { return ctl + RING_CONTROL_SIZE + (p & (ring_size - 1)); }
static uint32_t payload_offset(uint32_t len) { return len <= INLINE_MAX ? PAYLOAD_INLINE : PAYLOAD_ALIGNED; }
static uint32_t record_size(uint32_t len) {
    return (payload_offset(len) + len + RECORD_ALIGN - 1) / RECORD_ALIGN * RECORD_ALIGN;
}
static int need_event(uint32_t e, uint32_t new_pos, uint32_t old) {
    return (uint32_t)(new_pos - e - 1) < (uint32_t)(new_pos - old);
}

static void init_ring(uint64_t ctl) {
    store(ctl + R_TAIL, 0, memory_order_relaxed);
    store(ctl + R_DATA_EVENT, EVENT_NONE, memory_order_relaxed);
    store(ctl + R_SPACE_EVENT, EVENT_NONE, memory_order_relaxed);
    store(data(ctl, 0) + REC_SEQ, 0, memory_order_relaxed);
}

static void check_ring_fields(uint64_t e, uint32_t i) {
    if (load64(e + E_RING_AB_OFFSET) != ring_offset(i, 0) ||
        load64(e + E_RING_BA_OFFSET) != ring_offset(i, 1) ||
        load(e + E_RING_AB_SIZE, memory_order_relaxed) != ring_size ||
        load(e + E_RING_BA_SIZE, memory_order_relaxed) != ring_size)
        die("entry %u: ring fields differ from the layout", i);
}

static void open_channel(struct endpoint *ep, const char *name, unsigned vector) {
    uint8_t field[32] = {0};
    size_t n = strlen(name);
    if (n < 1 || n > NAME_MAX_LEN) die("bad name");
    memcpy(field, name, n);
    uint32_t me = side_word(ATTACHED, own_id, vector);
    lock();
    int64_t free_index = -1;
    for (uint32_t i = 0; i < channel_count; i++) {
        uint64_t e = entry_offset(i);
        uint32_t state = load(e + E_STATE, memory_order_acquire);
        if (state != 1) {
            if (state == 0 && free_index < 0) free_index = i;
            continue;
        }
        uint32_t a = load(e + E_SIDE_A, memory_order_acquire);
        uint32_t b = load(e + E_SIDE_B, memory_order_acquire);
        if (side_state(a) != ATTACHED && side_state(b) != ATTACHED) {
            store(e + E_STATE, 0, memory_order_release);
            if (free_index < 0) free_index = i;
            continue;
        }
        uint8_t stored[32];
        copy_out(e + E_NAME, stored, 32);
        if (memcmp(stored, field, 32) != 0) continue;
        if (side_state(a) == ATTACHED && side_state(b) == EMPTY) {
            check_ring_fields(e, i);
            store(e + E_SIDE_B, me, memory_order_release);
            unlock();
            *ep = (struct endpoint){.entry = e, .own_side = e + E_SIDE_B, .peer_side = e + E_SIDE_A,
                                    .own_word = me, .vector = vector,
                                    .tx = ring_offset(i, 1), .rx = ring_offset(i, 0)};
            printf("side=b\n");
            return;
        }
        if (side_state(a) == ATTACHED && side_state(b) == ATTACHED) die("channel %s is busy", name);
    }
    if (free_index < 0) die("directory full");
    uint32_t i = (uint32_t)free_index;
    uint64_t e = entry_offset(i);
    store(e + E_GENERATION, load(e + E_GENERATION, memory_order_relaxed) + 1, memory_order_relaxed);
    copy_in(e + E_NAME, field, 32);
    store(e + E_SIDE_A, me, memory_order_relaxed);
    store(e + E_SIDE_B, 0, memory_order_relaxed);
    store64(e + E_RING_AB_OFFSET, ring_offset(i, 0));
    store64(e + E_RING_BA_OFFSET, ring_offset(i, 1));
    store(e + E_RING_AB_SIZE, ring_size, memory_order_relaxed);
    store(e + E_RING_BA_SIZE, ring_size, memory_order_relaxed);
    init_ring(ring_offset(i, 0));
    init_ring(ring_offset(i, 1));
    store(e + E_STATE, 1, memory_order_release);
    unlock();
    *ep = (struct endpoint){.entry = e, .own_side = e + E_SIDE_A, .peer_side = e + E_SIDE_B,
                            .own_word = me, .vector = vector,
                            .tx = ring_offset(i, 0), .rx = ring_offset(i, 1)};
    printf("side=a\n");
}

/* The peer's side word: its state (corrupt: exits). */
static uint32_t peer_word(struct endpoint *ep) {
    uint32_t w = load(ep->peer_side, memory_order_acquire);
    if (side_state(w) > GONE) die("corrupt side word %#x", w);
    return w;
}
static void ring_peer(struct endpoint *ep) {
    uint32_t w = peer_word(ep);
    if (side_state(w) == ATTACHED) ring(side_peer(w), side_vector(w));
}
static void fail_if_peer_ended(struct endpoint *ep) {
    uint32_t w = peer_word(ep);
    if (side_state(w) == CLOSED) die("the peer closed the channel");
    if (side_state(w) == GONE) die("peer %u left the region", side_peer(w));
}

/* Send step 1: reload the consumer's tail, validated. */
static void refresh_tail(struct endpoint *ep) {
    uint32_t tail = load(ep->tx + R_TAIL, memory_order_acquire);
    if (tail % RECORD_ALIGN != 0 || tail - ep->cached_tail > ep->head - ep->cached_tail)
        die("corrupt tail %#x (cached %#x, head %#x)", tail, ep->cached_tail, ep->head);
    ep->cached_tail = tail;
}
static int fits(struct endpoint *ep, uint32_t r) { return ep->head - ep->cached_tail + r <= ring_size; }

static void send_message(struct endpoint *ep, const uint8_t *msg, uint32_t len) {
    if (len < 1 || len > ring_size - 64) die("message of %u bytes does not fit", len);
    uint32_t r = record_size(len);
    while (!fits(ep, r)) {
        refresh_tail(ep);
        if (fits(ep, r)) break;
        fail_if_peer_ended(ep);
        /* Arm the space event, fence, look again; sleep only if it still does not fit. */
        store(ep->tx + R_SPACE_EVENT, ep->head + r - ring_size - 1, memory_order_relaxed);
        fence();
        refresh_tail(ep);
        if (fits(ep, r)) break;
        sleep_on_doorbell(ep->vector);
    }
    uint32_t head = ep->head, next = head + r;
    if (next - ep->cached_tail < ring_size) store(data(ep->tx, next) + REC_SEQ, 0, memory_order_relaxed);
    store(data(ep->tx, head) + REC_LEN, len, memory_order_relaxed);
    uint32_t p = head + payload_offset(len), off = p & (ring_size - 1);
    uint32_t first = len < ring_size - off ? len : ring_size - off;
    copy_in(data(ep->tx, p), msg, first);
    if (first < len) copy_in(data(ep->tx, 0), msg + first, len - first);
    store(data(ep->tx, head) + REC_SEQ, head + 1, memory_order_release);
    ep->head = next;
    fence();
    if (need_event(load(ep->tx + R_DATA_EVENT, memory_order_relaxed), next, head)) ring_peer(ep);
}

/* Receive step 1: the record at pos, if published; its validated length. */
static int peek(struct endpoint *ep, uint32_t *len) {
    if (load(data(ep->rx, ep->pos) + REC_SEQ, memory_order_acquire) != ep->pos + 1) return 0;
    *len = load(data(ep->rx, ep->pos) + REC_LEN, memory_order_relaxed);
    if (*len < 1 || *len > ring_size - 64) die("corrupt record length %u", *len);
    return 1;
}

static uint32_t recv_message(struct endpoint *ep, uint8_t *buf) {
    uint32_t len;
    while (!peek(ep, &len)) {
        uint32_t w = peer_word(ep);
        if (side_state(w) == CLOSED || side_state(w) == GONE) {
            /* It published before it closed: look once more. */
            if (peek(ep, &len)) break;
            fail_if_peer_ended(ep);
        }
        store(ep->rx + R_DATA_EVENT, ep->pos, memory_order_relaxed);
        fence();
        if (peek(ep, &len)) break;
        w = peer_word(ep);
        if (side_state(w) == CLOSED || side_state(w) == GONE) continue;
        sleep_on_doorbell(ep->vector);
    }
    uint32_t p = ep->pos + payload_offset(len), off = p & (ring_size - 1);
    uint32_t first = len < ring_size - off ? len : ring_size - off;
    copy_out(data(ep->rx, p), buf, first);
    if (first < len) copy_out(data(ep->rx, 0), buf + first, len - first);
    uint32_t old = ep->pos;
    ep->pos += record_size(len);
    store(ep->rx + R_TAIL, ep->pos, memory_order_release);
    fence();
    if (need_event(load(ep->rx + R_SPACE_EVENT, memory_order_relaxed), ep->pos, old)) ring_peer(ep);
    return len;
}

static void close_channel(struct endpoint *ep) {
    uint32_t closed = (ep->own_word & 0x00ffffffu) | (uint32_t)CLOSED << 24;
    if (cas(ep->own_side, ep->own_word, closed)) {
        fence();
        ring_peer(ep);
    }
    lock();
    if (side_state(load(ep->entry + E_SIDE_A, memory_order_acquire)) != ATTACHED &&
        side_state(load(ep->entry + E_SIDE_B, memory_order_acquire)) != ATTACHED)
        store(ep->entry + E_STATE, 0, memory_order_release);
    unlock();
}

static void open_bus(void) {
    const char *env = getenv("IVSHM_LOCAL_BUS");
    if (!env) die("IVSHM_LOCAL_BUS is not set");
    int memfd, used;
    if (sscanf(env, "v1:%u:%u:%u:%d:%n", &own_id, &peers, &vectors, &memfd, &used) != 4)
        die("cannot parse IVSHM_LOCAL_BUS=%s", env);
    eventfds = calloc((size_t)peers * vectors, sizeof(int));
    const char *p = env + used;
    for (unsigned i = 0; i < peers * vectors; i++) {
        char *end;
        eventfds[i] = (int)strtol(p, &end, 10);
        if (end == p) die("cannot parse the eventfds in IVSHM_LOCAL_BUS");
        p = *end == ',' ? end + 1 : end;
    }
    struct stat st;
    if (fstat(memfd, &st) != 0) die("fstat: %s", strerror(errno));
    region_size = (uint64_t)st.st_size;
    base = mmap(NULL, region_size, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    if (base == MAP_FAILED) die("mmap: %s", strerror(errno));
}

/* "Formatting": claim the magic word, clear header and directory, write the header, publish. */
static void format_region(uint32_t channels, uint32_t rsize) {
    if (channels < 1 || channels > CHANNELS_MAX) die("bad channel count %u", channels);
    if (rsize < RING_SIZE_MIN || rsize > RING_SIZE_MAX || (rsize & (rsize - 1))) die("bad ring size %u", rsize);
    uint64_t rings = expected_rings_offset(channels);
    uint64_t layout = rings + (uint64_t)channels * 2 * (RING_CONTROL_SIZE + rsize);
    if (layout > region_size) die("the layout needs %llu bytes", (unsigned long long)layout);
    if (!cas(H_MAGIC, 0, MAGIC_FORMATTING)) die("the region is not blank");
    uint64_t dir_end = HEADER_SIZE + (uint64_t)channels * ENTRY_SIZE;
    for (uint64_t off = 4; off < dir_end; off += 4) store(off, 0, memory_order_relaxed);
    store(H_VERSION, VERSION, memory_order_relaxed);
    store64(H_LAYOUT_SIZE, layout);
    store(H_HEADER_SIZE, HEADER_SIZE, memory_order_relaxed);
    store(H_CHANNEL_COUNT, channels, memory_order_relaxed);
    store(H_ENTRY_SIZE, ENTRY_SIZE, memory_order_relaxed);
    store(H_RING_SIZE, rsize, memory_order_relaxed);
    store64(H_DIRECTORY_OFFSET, HEADER_SIZE);
    store64(H_RINGS_OFFSET, rings);
    store(H_RING_CONTROL_SIZE, RING_CONTROL_SIZE, memory_order_relaxed);
    store(H_FLAGS, 0, memory_order_relaxed);
    store(H_MAGIC, MAGIC, memory_order_release);
    printf("formatted channels=%u ring_size=%u layout_size=%llu\n", channels, rsize,
           (unsigned long long)layout);
}

int main(int argc, char **argv) {
    if (argc != 4) die("usage: channel_peer echo NAME COUNT | format CHANNELS RING_SIZE");
    setvbuf(stdout, NULL, _IONBF, 0);
    open_bus();
    if (strcmp(argv[1], "format") == 0) {
        format_region((uint32_t)strtoul(argv[2], NULL, 10), (uint32_t)strtoul(argv[3], NULL, 10));
        return 0;
    }
    if (strcmp(argv[1], "echo") != 0) die("unknown command %s", argv[1]);
    unsigned long count = strtoul(argv[3], NULL, 10);
    open_region();
    struct endpoint ep;
    open_channel(&ep, argv[2], 0);
    uint8_t *buf = malloc(ring_size);
    if (!buf) die("out of memory");
    for (unsigned long i = 0; i < count; i++) {
        uint32_t len = recv_message(&ep, buf);
        send_message(&ep, buf, len);
    }
    close_channel(&ep);
    printf("echoed %lu slept=%lu\n", count, sleeps);
    return 0;
}
