# syntax=docker/dockerfile:1
# The livelock server image: built in a Rust image, run in a slim Debian one
# as a non-root user, the data directory a volume, health from the binary.
#   docker build -t livelock .
#   docker run -p 7873:7873 -e LIVELOCK_PASSWORD=secret -v livelock-data:/var/lib/livelock livelock

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p livelock --bin livelock \
 && mkdir -p /out/man /out/completions \
 && target/release/livelock man --dir /out/man \
 && target/release/livelock completions bash > /out/completions/livelock \
 && cp target/release/livelock /out/livelock

FROM debian:bookworm-slim
RUN useradd --system --uid 7873 --home-dir /var/lib/livelock --shell /usr/sbin/nologin livelock \
 && mkdir -p /var/lib/livelock /usr/share/bash-completion/completions /usr/share/man/man1 \
 && chown livelock:livelock /var/lib/livelock
COPY --from=build /out/livelock /usr/local/bin/livelock
COPY --from=build /out/man/ /usr/share/man/man1/
COPY --from=build /out/completions/livelock /usr/share/bash-completion/completions/livelock
USER livelock
# Every change is logged to the volume before it is acknowledged. Listening
# on all interfaces needs a password (LIVELOCK_PASSWORD); the server refuses
# to start without one rather than serve an open lock service.
ENV LIVELOCK_BIND_TO=0.0.0.0 \
    LIVELOCK_PORT=7873 \
    LIVELOCK_DATA_DIR=/var/lib/livelock \
    LIVELOCK_PROMETHEUS_PORT=9100 \
    LIVELOCK_HOST=127.0.0.1
VOLUME ["/var/lib/livelock"]
EXPOSE 7873 9100
# Ready = a session can be opened (with LIVELOCK_PASSWORD). For orchestrators:
# GET :9100/health/live and :9100/health/ready.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["livelock", "stats"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["livelock"]
CMD ["server"]
