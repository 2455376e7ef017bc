/*
 * Full-handshake load generator for benches/tls/run.sh (the Python version,
 * handshake_load.py, is the fallback when this cannot be compiled).
 *
 *   cc -O2 -o handshake_load handshake_load.c -lssl -lcrypto -lpthread
 *   handshake_load PORT CONNECTIONS SECONDS [SNI] [PATH] [ADDR]
 *
 * Every request opens a new TCP connection, does a full TLS handshake (a new
 * SSL object each time and no session is ever set, so nothing can be
 * resumed), sends one `GET PATH HTTP/1.1` with `Connection: close`, reads the
 * response to EOF and closes. wrk and h2load cannot measure this: both resume
 * TLS sessions when they reconnect (wrk keeps the session in the SSL object
 * it reuses, h2load caches it), so their "new connection" numbers are resumed
 * (PSK) handshakes that skip the certificate and its signature.
 *
 * CONNECTIONS threads, each a closed loop of one blocking connection at a
 * time. Certificates are not verified (like wrk and h2load); the server's
 * CertificateVerify signature is still checked, as TLS 1.3 requires.
 * Requests that complete after SECONDS are not counted (like wrk).
 *
 * Output: `key value` lines, the same as handshake_load.py: requests,
 * errors, reused (must be 0), seconds, rps, p50_ms, p99_ms, mean_ms,
 * protocol, cipher, first_error (only if there was one).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static SSL_CTX *ctx;
static struct sockaddr_in addr;
static const char *sni;
static char request[512];
static size_t request_len;
static double deadline;

struct result {
	double *lat;
	size_t n, cap;
	long errors, reused;
	char protocol[32], cipher[64], first_error[160];
};

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void fail(struct result *r, const char *what)
{
	r->errors++;
	if (!r->first_error[0]) {
		unsigned long e = ERR_peek_last_error();
		if (e)
			snprintf(r->first_error, sizeof r->first_error, "%s: %s", what, ERR_reason_error_string(e));
		else
			snprintf(r->first_error, sizeof r->first_error, "%s: %s", what, errno ? strerror(errno) : "failed");
	}
	ERR_clear_error();
}

static void *loop(void *arg)
{
	struct result *r = arg;
	char buf[16384];
	struct timeval tv = {10, 0};
	int one = 1;

	while (now() < deadline) {
		double t0 = now();
		SSL *ssl = NULL;
		size_t got = 0;
		char head[16];
		int ok = 0, n;
		int fd = socket(AF_INET, SOCK_STREAM, 0);

		errno = 0;
		if (fd < 0) {
			fail(r, "socket");
			continue;
		}
		setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
		setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
		if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
			fail(r, "connect");
			goto done;
		}
		ssl = SSL_new(ctx);
		SSL_set_fd(ssl, fd);
		SSL_set_tlsext_host_name(ssl, sni);
		if (SSL_connect(ssl) != 1) {
			fail(r, "handshake");
			goto done;
		}
		if (SSL_write(ssl, request, (int)request_len) != (int)request_len) {
			fail(r, "write");
			goto done;
		}
		while ((n = SSL_read(ssl, buf, sizeof buf)) > 0) {
			if (got < sizeof head) {
				size_t k = (size_t)n < sizeof head - got ? (size_t)n : sizeof head - got;
				memcpy(head + got, buf, k);
				got += k;
			}
		}
		if (got < 13 || memcmp(head, "HTTP/1.1 200 ", 13) != 0) {
			errno = 0;
			fail(r, got ? "status not 200" : "no response");
			goto done;
		}
		ok = 1;
	done:
		if (ok) {
			double t1 = now();
			if (t1 <= deadline) {
				if (r->n == r->cap) {
					r->cap = r->cap ? r->cap * 2 : 4096;
					r->lat = realloc(r->lat, r->cap * sizeof *r->lat);
					if (!r->lat) {
						perror("realloc");
						exit(1);
					}
				}
				r->lat[r->n++] = t1 - t0;
				if (SSL_session_reused(ssl))
					r->reused++;
				snprintf(r->protocol, sizeof r->protocol, "%s", SSL_get_version(ssl));
				snprintf(r->cipher, sizeof r->cipher, "%s", SSL_get_cipher_name(ssl));
			}
		}
		if (ssl)
			SSL_free(ssl); /* no SSL_shutdown: the server has closed already */
		close(fd);
	}
	return NULL;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

static double pct(const double *v, size_t n, double q)
{
	size_t i = (size_t)(q * n + 0.5);
	if (i > 0)
		i--;
	if (i >= n)
		i = n - 1;
	return v[i];
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: %s PORT CONNECTIONS SECONDS [SNI] [PATH] [ADDR]\n", argv[0]);
		return 2;
	}
	int port = atoi(argv[1]), conns = atoi(argv[2]);
	double seconds = atof(argv[3]);
	sni = argc > 4 ? argv[4] : "localhost";
	const char *path = argc > 5 ? argv[5] : "/";
	const char *ip = argc > 6 ? argv[6] : "127.0.0.1";
	if (port <= 0 || port > 65535 || conns <= 0 || seconds <= 0) {
		fprintf(stderr, "bad arguments\n");
		return 2;
	}
	signal(SIGPIPE, SIG_IGN);
	memset(&addr, 0, sizeof addr);
	addr.sin_family = AF_INET;
	addr.sin_port = htons((unsigned short)port);
	if (inet_pton(AF_INET, ip, &addr.sin_addr) != 1) {
		fprintf(stderr, "bad address %s\n", ip);
		return 2;
	}
	request_len = (size_t)snprintf(request, sizeof request,
				       "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUser-Agent: markco-bench-handshake\r\n"
				       "Connection: close\r\n\r\n",
				       path, sni, port);

	ctx = SSL_CTX_new(TLS_client_method());
	if (!ctx) {
		ERR_print_errors_fp(stderr);
		return 1;
	}
	SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
	SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
	SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
	SSL_CTX_set_mode(ctx, SSL_MODE_AUTO_RETRY);

	struct result *res = calloc((size_t)conns, sizeof *res);
	pthread_t *th = calloc((size_t)conns, sizeof *th);
	if (!res || !th) {
		perror("calloc");
		return 1;
	}
	double start = now();
	deadline = start + seconds;
	for (int i = 0; i < conns; i++) {
		if (pthread_create(&th[i], NULL, loop, &res[i]) != 0) {
			perror("pthread_create");
			return 1;
		}
	}
	size_t total = 0;
	long errors = 0, reused = 0;
	const char *protocol = "NA", *cipher = "NA", *first_error = "";
	for (int i = 0; i < conns; i++) {
		pthread_join(th[i], NULL);
		total += res[i].n;
		errors += res[i].errors;
		reused += res[i].reused;
		if (res[i].protocol[0])
			protocol = res[i].protocol, cipher = res[i].cipher;
		if (!first_error[0] && res[i].first_error[0])
			first_error = res[i].first_error;
	}
	double *all = malloc((total ? total : 1) * sizeof *all), sum = 0;
	size_t k = 0;
	for (int i = 0; i < conns; i++)
		for (size_t j = 0; j < res[i].n; j++)
			sum += all[k++] = res[i].lat[j];
	qsort(all, total, sizeof *all, cmp);
	printf("requests %zu\nerrors %ld\nreused %ld\nseconds %.3f\nrps %.2f\n", total, errors, reused, seconds,
	       total / seconds);
	if (total)
		printf("p50_ms %.3f\np99_ms %.3f\nmean_ms %.3f\n", pct(all, total, 0.50) * 1000,
		       pct(all, total, 0.99) * 1000, sum / total * 1000);
	printf("protocol %s\ncipher %s\n", protocol, cipher);
	if (first_error[0])
		printf("first_error %s\n", first_error);
	return total ? 0 : 1;
}
