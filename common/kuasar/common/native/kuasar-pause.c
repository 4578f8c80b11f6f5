/*
 * kuasar-pause: what a pod process becomes once it sits in the pod's namespaces.
 *
 * The pod process is forked from the Python task server to set up namespaces, then execs this so a
 * pod costs a few pages instead of a copy-on-write Python heap (measured 3.6-5 MB per pod before).
 * As PID 1 of a pod-wide PID namespace it reaps the orphans that re-parent to it.
 *
 * Usage: kuasar-pause [NAME]   (NAME, at most 15 bytes, becomes the process's comm)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv) {
    sigset_t wanted;
    int sig;

    if (argc > 1)
        prctl(PR_SET_NAME, argv[1], 0, 0, 0);
    sigemptyset(&wanted);
    sigaddset(&wanted, SIGCHLD);
    sigprocmask(SIG_BLOCK, &wanted, NULL);
    if (getpid() != 1) {
        /* Not an init: nothing to reap; default dispositions (SIGTERM/SIGKILL) end us. */
        for (;;)
            pause();
    }
    /* PID 1 ignores signals without handlers; the pod is stopped with SIGKILL from outside. */
    for (;;) {
        if (sigwait(&wanted, &sig) != 0)
            continue;
        while (waitpid(-1, NULL, WNOHANG) > 0)
            ;
    }
    return 0;
}
