/* The pod sandbox's process (the image sandlet-pause:dev, built by .ci/node-images): holds the
 * pod's namespaces open and, as PID 1 of a pod with shareProcessNamespace, reaps the orphans the
 * other containers leave. Exits 0 on SIGINT or SIGTERM. */
#include <signal.h>
#include <sys/wait.h>

int main(void) {
    sigset_t all;
    int sig;

    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, 0);
    for (;;) {
        if (sigwait(&all, &sig) != 0)
            continue;
        if (sig == SIGINT || sig == SIGTERM)
            return 0;
        if (sig == SIGCHLD)
            while (waitpid(-1, 0, WNOHANG) > 0)
                ;
    }
}
