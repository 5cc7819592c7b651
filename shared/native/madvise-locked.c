/*
 * libvirtkm-madvise-locked.so: lets a Node process run with all of its memory locked
 * (mlockall), preloaded into virtkm-server and virtkm-agent (shared/src/memory-lock.ts).
 *
 * Why it exists: V8 gives freed heap pages back to the kernel with madvise(MADV_DONTNEED)
 * (and MADV_FREE) and treats a failing madvise as fatal. Linux refuses both on locked pages
 * with EINVAL, so under mlockall() the first garbage collection that frees pages kills the
 * process (docs/threat-model.md, "Locked memory"). Since Linux 5.18, MADV_DONTNEED_LOCKED
 * discards locked pages the same way; with MCL_ONFAULT they are locked again when touched.
 *
 * What it does: it replaces libc's madvise(). The call goes to the kernel unchanged; only
 * when the kernel answers EINVAL to MADV_DONTNEED or MADV_FREE is it retried once as
 * MADV_DONTNEED_LOCKED (a stronger discard: the pages read back as zeros, which both
 * callers accept). Any other advice, result or error is passed through untouched, and the
 * retry's own error is returned as it is (on a kernel without MADV_DONTNEED_LOCKED that is
 * EINVAL again, the same answer as without the shim).
 *
 * It exports one more symbol, virtkm_madvise_locked_retries(), which counts the retries,
 * so the process can tell that the shim is really in its madvise path.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef MADV_DONTNEED_LOCKED
#define MADV_DONTNEED_LOCKED 24
#endif

static unsigned long retries;

unsigned long virtkm_madvise_locked_retries(void) {
  return __atomic_load_n(&retries, __ATOMIC_RELAXED);
}

int madvise(void *addr, size_t length, int advice) {
  long rc = syscall(SYS_madvise, addr, length, advice);
  if (rc == -1 && errno == EINVAL && (advice == MADV_DONTNEED || advice == MADV_FREE)) {
    __atomic_add_fetch(&retries, 1, __ATOMIC_RELAXED);
    rc = syscall(SYS_madvise, addr, length, MADV_DONTNEED_LOCKED);
  }
  return (int)rc;
}
