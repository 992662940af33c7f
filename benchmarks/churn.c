/* SPDX-License-Identifier: MIT */
/*
 * Loopback connection churn for the tcptrace benchmark: client threads
 * connect() then close(), server threads accept() then close(), as fast as
 * the machine allows (or at a fixed total rate with -r). Prints one line
 * "connections=N seconds=S rate=R" on stdout at the end.
 *
 * Compiled at run time by benchmarks/churn.py:  gcc -O2 -pthread churn.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static atomic_int stop;
static atomic_long done;
static atomic_long failed;
static struct sockaddr_in target;
static int listen_fd;
static double per_thread_interval; /* seconds between connects per client; 0 = flat out */

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void sleep_until(double t)
{
	double left = t - now();
	if (left <= 0)
		return;
	struct timespec ts = {.tv_sec = (time_t)left, .tv_nsec = (long)((left - (time_t)left) * 1e9)};
	nanosleep(&ts, NULL);
}

static void *client(void *arg)
{
	(void)arg;
	double next = now();
	while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
		if (per_thread_interval > 0) {
			next += per_thread_interval;
			sleep_until(next);
		}
		int fd = socket(AF_INET, SOCK_STREAM, 0);
		if (fd < 0) {
			atomic_fetch_add(&failed, 1);
			continue;
		}
		if (connect(fd, (struct sockaddr *)&target, sizeof(target)) == 0)
			atomic_fetch_add_explicit(&done, 1, memory_order_relaxed);
		else
			atomic_fetch_add(&failed, 1);
		close(fd);
	}
	return NULL;
}

static void *server(void *arg)
{
	(void)arg;
	for (;;) {
		int fd = accept(listen_fd, NULL, NULL);
		if (fd < 0) {
			if (atomic_load(&stop))
				break;
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			break;
		}
		close(fd);
	}
	return NULL;
}

static void usage(const char *prog)
{
	fprintf(stderr, "usage: %s -p PORT [-d SECONDS] [-c CLIENTS] [-s SERVERS] [-r CONN_PER_S]\n",
		prog);
	exit(2);
}

int main(int argc, char **argv)
{
	int port = 0, clients = 2, servers = 2, opt;
	double duration = 10, rate = 0;
	while ((opt = getopt(argc, argv, "p:d:c:s:r:")) != -1) {
		switch (opt) {
		case 'p': port = atoi(optarg); break;
		case 'd': duration = atof(optarg); break;
		case 'c': clients = atoi(optarg); break;
		case 's': servers = atoi(optarg); break;
		case 'r': rate = atof(optarg); break;
		default: usage(argv[0]);
		}
	}
	if (port <= 0 || port > 65535 || clients < 1 || servers < 1 || duration <= 0)
		usage(argv[0]);
	if (rate > 0)
		per_thread_interval = clients / rate;

	target.sin_family = AF_INET;
	target.sin_port = htons(port);
	target.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	listen_fd = socket(AF_INET, SOCK_STREAM, 0);
	int one = 1;
	setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(listen_fd, (struct sockaddr *)&target, sizeof(target)) || listen(listen_fd, 4096)) {
		perror("churn: listen");
		return 1;
	}

	pthread_t st[servers], ct[clients];
	for (int i = 0; i < servers; i++)
		pthread_create(&st[i], NULL, server, NULL);
	double start = now();
	for (int i = 0; i < clients; i++)
		pthread_create(&ct[i], NULL, client, NULL);
	sleep_until(start + duration);
	atomic_store(&stop, 1);
	for (int i = 0; i < clients; i++)
		pthread_join(ct[i], NULL);
	double elapsed = now() - start;
	/* wake the servers blocked in accept() */
	shutdown(listen_fd, SHUT_RDWR);
	for (int i = 0; i < servers; i++)
		pthread_join(st[i], NULL);
	close(listen_fd);
	long n = atomic_load(&done);
	printf("connections=%ld failed=%ld seconds=%.3f rate=%.1f\n", n, atomic_load(&failed),
	       elapsed, n / elapsed);
	return 0;
}
