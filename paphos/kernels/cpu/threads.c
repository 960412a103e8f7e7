/* Pinning the OpenMP compute threads (the pool torch's CPU ops share with these kernels) to CPUs,
 * called from Python via ctypes. Invariant: thread t of a team of n runs on cpus[t] only, and
 * tids[t] is its kernel thread id (so its CPU time can be read from /proc).
 */
#define _GNU_SOURCE
#include <omp.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "simd_base.c"

/* Binds thread t of a team of n to cpus[t] (cpus may be NULL: no binding) and stores its thread
 * id in tids[t]; returns how many bindings failed (-1: bad arguments). */
int paphos_bind_threads(const int *cpus, int n, int64_t *tids) {
    if (n < 1 || !tids) return -1;
    int failed = 0;
#pragma omp parallel num_threads(n) reduction(+ : failed)
    {
        int t = omp_get_thread_num();
        tids[t] = (int64_t)syscall(SYS_gettid);
        if (cpus) {
            cpu_set_t set;
            CPU_ZERO(&set);
            CPU_SET(cpus[t], &set);
            if (sched_setaffinity(0, sizeof(set), &set) != 0) failed++;
        }
    }
    return failed;
}

/* Lets every thread of a team of n run on any of cpus[0..count) again (the unbinding). */
int paphos_unbind_threads(const int *cpus, int count, int n) {
    if (n < 1 || count < 1 || !cpus) return -1;
    int failed = 0;
#pragma omp parallel num_threads(n) reduction(+ : failed)
    {
        cpu_set_t set;
        CPU_ZERO(&set);
        for (int k = 0; k < count; k++) CPU_SET(cpus[k], &set);
        if (sched_setaffinity(0, sizeof(set), &set) != 0) failed++;
    }
    return failed;
}
