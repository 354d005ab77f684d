/*
 * chat.c: a C program on an ivshm channel, through libivshm (ivshm.h).
 *
 *   chat send SOCKET NAME COUNT   send COUNT checked messages on channel NAME of the region
 *                                 of the ivshm server at SOCKET, then close once the other
 *                                 end has joined
 *   chat recv SOCKET NAME COUNT   receive COUNT messages and verify each one
 *   chat guest send|recv [--dev DEV] NAME COUNT
 *                                 the same inside a guest, on its ivshmem device (VFIO with
 *                                 MSI-X interrupts, or sysfs with polling), as `ivshm guest
 *                                 chan` does: DEV is a PCI address (0000:00:03.0 or 00:03.0)
 *                                 or an index from `ivshm guest list`; default: the only one
 *
 * Build:  cc chat.c $(pkg-config --cflags --libs ivshm) -o chat
 * Static (for a guest without the library installed):
 *         cc -static chat.c $(pkg-config --cflags ivshm) \
 *            "$(pkg-config --variable=libdir ivshm)/libivshm.a" -lutil -lrt -lpthread -lm -ldl -o chat
 *
 * Message i (from 0) is one line of text, so that `ivshm chan send` can send it from stdin and
 * `ivshm chan recv` can print it:
 *
 *   "<i> <payload> <checksum>"
 *
 * where <payload> is 1 + (i * 7919) % 3000 letters, letter j being 'a' + (i * 31 + j * 17) % 26,
 * and <checksum> is the 32-bit FNV-1a of everything before the last space, as 8 lowercase hex
 * digits. The receiver checks the checksum, the sequence number and the whole text: a lost,
 * duplicated, reordered or damaged message is reported and the program exits with status 1.
 *
 * The receiver shows the calls a C program uses in its own poll loop: a receive with timeout
 * 0, and on IVSHM_STATUS_WOULD_BLOCK a poll(2) of ivshm_channel_fd(), then
 * ivshm_channel_take_doorbell() and a retry. It starts with a 16-byte buffer and grows it when
 * a message does not fit (IVSHM_STATUS_BUFFER_TOO_SMALL reports the length needed).
 */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <ivshm.h>

/* Every wait is bounded: a peer that never comes is an error, not a hang. */
#define WAIT_MS 60000

static uint32_t fnv1a(const char *bytes, size_t len)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)bytes[i];
        h *= 16777619u;
    }
    return h;
}

/* Writes message `seq` into `out` (at least 3100 bytes); returns its length. */
static size_t make_message(uint64_t seq, char *out)
{
    int n = sprintf(out, "%" PRIu64 " ", seq);
    size_t len = (size_t)n;
    size_t payload = 1 + (size_t)((seq * 7919) % 3000);
    for (size_t j = 0; j < payload; j++)
        out[len++] = (char)('a' + (seq * 31 + j * 17) % 26);
    uint32_t sum = fnv1a(out, len);
    len += (size_t)sprintf(out + len, " %08" PRIx32, sum);
    return len;
}

static int fail(const char *what, ivshm_status st)
{
    fprintf(stderr, "chat: %s: %s (%s)\n", what, ivshm_strerror((int)st), ivshm_last_error());
    return 1;
}

static long long now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static int send_messages(ivshm_channel *ch, uint64_t count)
{
    static char msg[4096];
    for (uint64_t seq = 0; seq < count; seq++) {
        size_t len = make_message(seq, msg);
        ivshm_status st = ivshm_channel_send(ch, msg, len, WAIT_MS);
        if (st != IVSHM_STATUS_OK)
            return fail("send", st);
    }
    /* A channel nobody joined is freed with its messages when its creator closes it. */
    long long deadline = now_ms() + WAIT_MS;
    for (;;) {
        ivshm_peer_state state;
        uint16_t peer;
        ivshm_status st = ivshm_channel_peer(ch, &state, &peer);
        if (st != IVSHM_STATUS_OK)
            return fail("peer", st);
        if (state == IVSHM_PEER_STATE_GONE) {
            fprintf(stderr, "chat: peer %u left before taking the messages\n", peer);
            return 1;
        }
        if (state != IVSHM_PEER_STATE_NOT_JOINED)
            break;
        if (now_ms() > deadline) {
            fprintf(stderr, "chat: nobody opened the channel\n");
            return 1;
        }
        struct timespec pause = {0, 1000000};
        nanosleep(&pause, NULL);
    }
    printf("sent %" PRIu64 " messages\n", count);
    return 0;
}

/* Receives one message into *buf (growing it), with the poll loop; returns a status. */
static ivshm_status receive(ivshm_channel *ch, char **buf, size_t *cap, size_t *len)
{
    long long deadline = now_ms() + WAIT_MS;
    for (;;) {
        ivshm_status st = ivshm_channel_recv(ch, *buf, *cap, len, 0);
        if (st == IVSHM_STATUS_BUFFER_TOO_SMALL) {
            char *bigger = realloc(*buf, *len);
            if (bigger == NULL) {
                fprintf(stderr, "chat: out of memory\n");
                exit(1);
            }
            *buf = bigger;
            *cap = *len;
            continue;
        }
        if (st != IVSHM_STATUS_WOULD_BLOCK)
            return st;
        long long left = deadline - now_ms();
        if (left <= 0)
            return IVSHM_STATUS_TIMEOUT;
        int fd = ivshm_channel_fd(ch);
        if (fd < 0) {
            /* No fd (a guest device without interrupts): let the library wait. */
            st = ivshm_channel_wait(ch, (int32_t)left, NULL);
            if (st != IVSHM_STATUS_OK)
                return st;
            continue;
        }
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, (int)left) < 0 && errno != EINTR) {
            perror("chat: poll");
            exit(1);
        }
        st = ivshm_channel_take_doorbell(ch, NULL);
        if (st != IVSHM_STATUS_OK)
            return st;
    }
}

static int receive_messages(ivshm_channel *ch, uint64_t count)
{
    size_t cap = 16, len = 0;
    char *buf = malloc(cap);
    static char want[4096];
    uint64_t bytes = 0;
    if (buf == NULL)
        return 1;
    /* The first message: wait for it without taking it, to show ivshm_channel_wait. */
    if (count > 0) {
        size_t first = 0;
        ivshm_status st = ivshm_channel_wait(ch, WAIT_MS, &first);
        if (st != IVSHM_STATUS_OK)
            return fail("wait", st);
        if (first != make_message(0, want)) {
            fprintf(stderr, "chat: the first message has %zu bytes, not %zu\n", first,
                    make_message(0, want));
            return 1;
        }
    }
    for (uint64_t seq = 0; seq < count; seq++) {
        ivshm_status st = receive(ch, &buf, &cap, &len);
        if (st != IVSHM_STATUS_OK) {
            fprintf(stderr, "chat: after %" PRIu64 " messages: ", seq);
            return fail("recv", st);
        }
        /* Checksum first: it names damage; then the sequence number and the whole text. */
        const char *space = NULL;
        for (size_t i = len; i > 0 && space == NULL; i--)
            if (buf[i - 1] == ' ')
                space = buf + i - 1;
        char sum[9] = {0};
        if (space == NULL || (size_t)(buf + len - space) != 9) {
            fprintf(stderr, "chat: message %" PRIu64 " (%zu bytes) has no checksum\n", seq, len);
            return 1;
        }
        memcpy(sum, space + 1, 8);
        if (strtoul(sum, NULL, 16) != fnv1a(buf, (size_t)(space - buf))) {
            fprintf(stderr, "chat: message %" PRIu64 " (%zu bytes) fails its checksum\n", seq,
                    len);
            return 1;
        }
        size_t want_len = make_message(seq, want);
        if (len != want_len || memcmp(buf, want, len) != 0) {
            fprintf(stderr, "chat: message %" PRIu64 " is not the one expected (lost, "
                            "duplicated or reordered): %.*s\n",
                    seq, (int)(len < 40 ? len : 40), buf);
            return 1;
        }
        bytes += len;
    }
    free(buf);
    printf("received %" PRIu64 " messages, %" PRIu64 " bytes, all verified\n", count, bytes);
    return 0;
}

static int usage(void)
{
    fprintf(stderr, "usage: chat send|recv SOCKET NAME COUNT\n"
                    "       chat guest send|recv [--dev DEV] NAME COUNT\n");
    return 2;
}

int main(int argc, char **argv)
{
    /* chat [guest] send|recv (SOCKET | [--dev DEV]) NAME COUNT */
    int arg = 1;
    int guest = arg < argc && strcmp(argv[arg], "guest") == 0;
    if (guest)
        arg++;
    if (arg >= argc || (strcmp(argv[arg], "send") != 0 && strcmp(argv[arg], "recv") != 0))
        return usage();
    const char *mode = argv[arg++];
    const char *server = NULL, *device = NULL;
    if (guest) {
        if (arg + 1 < argc && strcmp(argv[arg], "--dev") == 0) {
            device = argv[arg + 1];
            arg += 2;
        }
    } else if (arg < argc) {
        server = argv[arg++];
    }
    if (argc - arg != 2)
        return usage();
    const char *name = argv[arg];
    const char *count_text = argv[arg + 1];
    char *end = NULL;
    uint64_t count = strtoull(count_text, &end, 10);
    if (*count_text == '\0' || *end != '\0') {
        fprintf(stderr, "chat: COUNT must be a number\n");
        return 2;
    }

    ivshm_region *region = NULL;
    /* A guest's device: NULL picks the only one. */
    ivshm_status st = guest ? ivshm_region_open_guest(device, &region)
                            : ivshm_region_open_host(server, &region);
    if (st != IVSHM_STATUS_OK)
        return fail("open region", st);
    ivshm_region_info info;
    st = ivshm_region_get_info(region, &info);
    if (st != IVSHM_STATUS_OK)
        return fail("region info", st);
    printf("libivshm %s: peer %u, %u vectors, %" PRIu64 " bytes, %u channels of %u-byte rings\n",
           ivshm_version(), info.own_id, info.vectors, info.size, info.channels, info.ring_size);

    ivshm_channel_options options;
    ivshm_channel_options_init(&options);
    ivshm_channel *ch = NULL;
    st = ivshm_channel_open(region, name, &options, &ch);
    /* The channel keeps what it needs of the region. */
    ivshm_region_close(region);
    if (st != IVSHM_STATUS_OK)
        return fail("open channel", st);
    /* An fd to poll: the server's eventfd on the host, the device's MSI-X vector through VFIO in
     * a guest; none on a guest device without interrupts (sysfs), where the library polls. */
    printf("channel %s: %s\n", name,
           ivshm_channel_fd(ch) >= 0 ? "doorbell fd to poll" : "no doorbell fd, the library polls");
    fflush(stdout);

    int rc = strcmp(mode, "send") == 0 ? send_messages(ch, count) : receive_messages(ch, count);
    ivshm_channel_close(ch);
    return rc;
}
