/*
 * Guest-side workload for the bounce-buffer e2e test (built static by test/e2e/build-guest.sh):
 *
 *   dio-unaligned DEVICE OFFSET FILE
 *
 * Writes FILE to DEVICE at OFFSET with O_DIRECT through pwritev, every iovec starting 512 bytes past a
 * page boundary or at another sub-page offset (the guest block layer accepts 512-byte alignment; a host
 * that needs 4096 must bounce them), syncs, then reads it back with a different split and different
 * offsets through preadv and compares every byte. Prints one "dio-unaligned: ..." line; exits non-zero on
 * any error or mismatch.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#define PAGE 4096
#define SECTOR 512
#define CHUNK (64 * 1024)
#define PIECES 3

static int fail(const char *what) {
  printf("dio-unaligned: FAIL %s: %s\n", what, strerror(errno));
  return 1;
}

/*
 * Splits one chunk into PIECES iovecs over PIECES separate page-aligned areas; piece p starts `shift[p]`
 * bytes into its area. Lengths and shifts are multiples of SECTOR, none of the shifts a multiple of PAGE.
 */
static void layout(struct iovec *iov, char *const *area, size_t length, const size_t *split, const size_t *shift) {
  size_t at = 0;
  for (int p = 0; p < PIECES; p++) {
    size_t len = p == PIECES - 1 ? length - at : split[p];
    iov[p].iov_base = area[p] + shift[p];
    iov[p].iov_len = len;
    at += len;
  }
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: %s DEVICE OFFSET FILE\n", argv[0]);
    return 2;
  }
  const long long offset = atoll(argv[2]);
  int in = open(argv[3], O_RDONLY);
  if (in < 0) return fail("open FILE");
  struct stat st;
  if (fstat(in, &st) != 0) return fail("stat FILE");
  const size_t total = (size_t)st.st_size;
  if (total == 0 || total % CHUNK != 0 || offset % SECTOR != 0) {
    printf("dio-unaligned: FAIL FILE size %zu must be a multiple of %d, OFFSET of %d\n", total, CHUNK, SECTOR);
    return 1;
  }
  char *want = malloc(total);
  if (want == NULL) return fail("malloc");
  for (size_t got = 0; got < total;) {
    ssize_t n = read(in, want + got, total - got);
    if (n <= 0) return fail("read FILE");
    got += (size_t)n;
  }
  close(in);

  char *area[PIECES];
  for (int p = 0; p < PIECES; p++) {
    if (posix_memalign((void **)&area[p], PAGE, CHUNK + PAGE) != 0) return fail("posix_memalign");
  }
  int dev = open(argv[1], O_RDWR | O_DIRECT);
  if (dev < 0) return fail("open DEVICE O_DIRECT");

  /* Write: 512 / 1536 / 3584 bytes past a page boundary, pieces of 20 KiB + 4.5 KiB + the rest. */
  const size_t wsplit[PIECES] = {20 * 1024, 4608, 0};
  const size_t wshift[PIECES] = {512, 1536, 3584};
  struct iovec iov[PIECES];
  long requests = 0;
  for (size_t at = 0; at < total; at += CHUNK) {
    layout(iov, area, CHUNK, wsplit, wshift);
    for (int p = 0, done = 0; p < PIECES; done += (int)iov[p].iov_len, p++) memcpy(iov[p].iov_base, want + at + done, iov[p].iov_len);
    ssize_t n = pwritev(dev, iov, PIECES, offset + (long long)at);
    if (n != CHUNK) return fail(n < 0 ? "pwritev" : "short pwritev");
    requests++;
  }
  if (fdatasync(dev) != 0) return fail("fdatasync");

  /* Read back with another split and other offsets (2560 / 512 / 1024), into poisoned buffers. */
  const size_t rsplit[PIECES] = {512, 33 * 1024, 0};
  const size_t rshift[PIECES] = {2560, 512, 1024};
  long mismatches = 0;
  long long first = -1;
  for (size_t at = 0; at < total; at += CHUNK) {
    for (int p = 0; p < PIECES; p++) memset(area[p], 0xa5, CHUNK + PAGE);
    layout(iov, area, CHUNK, rsplit, rshift);
    ssize_t n = preadv(dev, iov, PIECES, offset + (long long)at);
    if (n != CHUNK) return fail(n < 0 ? "preadv" : "short preadv");
    requests++;
    size_t done = 0;
    for (int p = 0; p < PIECES; p++) {
      if (memcmp(iov[p].iov_base, want + at + done, iov[p].iov_len) != 0) {
        mismatches++;
        if (first < 0) first = offset + (long long)(at + done);
      }
      done += iov[p].iov_len;
    }
  }
  close(dev);
  if (mismatches > 0) {
    printf("dio-unaligned: FAIL %ld pieces differ, first at disk offset %lld\n", mismatches, first);
    return 1;
  }
  printf("dio-unaligned: ok %ld requests, %zu bytes written and read back\n", requests, total);
  return 0;
}
