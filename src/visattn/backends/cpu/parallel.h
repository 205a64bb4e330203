/* Run a kernel's work on several threads: torch's own OpenMP pool when the file is compiled with
 * -fopenmp (build.py links the libgomp torch loaded, whose workers are usually still spinning after
 * the previous torch op: a second pool would share the cores with them), else one pthread per share.
 *
 * Included by the kernels of the package (build.py hashes included headers into the cache key). */
#ifndef VISATTN_PARALLEL_H
#define VISATTN_PARALLEL_H

#ifdef _OPENMP
#include <omp.h>
#endif
#include <pthread.h>

#define PARALLEL_MAX_THREADS 256

/* One thread's share: thread `tid` of `nt`; returns a status (0: fine), OR-ed over the threads. */
typedef int (*parallel_work)(void *ctx, int tid, int nt);

#ifndef _OPENMP
typedef struct {
    parallel_work work;
    void *ctx;
    int tid, nt, status;
} parallel_job;

static void *parallel_thread(void *arg) {
    parallel_job *job = arg;
    job->status = job->work(job->ctx, job->tid, job->nt);
    return NULL;
}
#endif

/* work(ctx, tid, nt) for tid < nt (nt clamped to [1, PARALLEL_MAX_THREADS]); the OR of their statuses. */
static int parallel_run(int nt, parallel_work work, void *ctx) {
    nt = nt < 1 ? 1 : nt > PARALLEL_MAX_THREADS ? PARALLEL_MAX_THREADS : nt;
#ifdef _OPENMP
    int status = 0;
#pragma omp parallel num_threads(nt) reduction(| : status)
    status |= work(ctx, omp_get_thread_num(), omp_get_num_threads());
    return status;
#else
    parallel_job jobs[PARALLEL_MAX_THREADS];
    pthread_t threads[PARALLEL_MAX_THREADS];
    int started[PARALLEL_MAX_THREADS] = {0};
    for (int t = 0; t < nt; t++) jobs[t] = (parallel_job){work, ctx, t, nt, 0};
    for (int t = 1; t < nt; t++) started[t] = pthread_create(&threads[t], NULL, parallel_thread, &jobs[t]) == 0;
    for (int t = 1; t < nt; t++)
        if (!started[t]) parallel_thread(&jobs[t]); /* no thread: do its share here */
    parallel_thread(&jobs[0]);
    int status = jobs[0].status;
    for (int t = 1; t < nt; t++) {
        if (started[t]) pthread_join(threads[t], NULL);
        status |= jobs[t].status;
    }
    return status;
#endif
}

#endif
