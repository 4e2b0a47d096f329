# The tower-llm-lb gateway as a container image (podman and docker read this file).
#
#   docker build -t tower-llm-lb .
#   docker run -p 8080:8080 -v $PWD/gateway.json:/etc/tower-llm-lb/config.json:ro tower-llm-lb
#   docker run -p 8080:8080 tower-llm-lb serve --mock      # embedded mock backends
#
# The image listens on 0.0.0.0:8080 (TOWER_LLM_LB_LISTEN) as an unprivileged user. Outside a
# loopback client, the gateway serves only callers with one of `gateway.client_keys`: set some.
# The base images are arguments so that a machine without a registry can build from local ones
# (benches/container.sh does).
ARG BUILDER=rust:1-slim-bookworm
ARG RUNTIME=debian:bookworm-slim

FROM ${BUILDER} AS build
WORKDIR /src
COPY . .
# With OpenTelemetry traces (exported when OTEL_EXPORTER_OTLP_ENDPOINT is set).
RUN cargo build --release --locked -p tower-llm-lb-gateway --features otel --bin tower-llm-lb \
 && cp target/release/tower-llm-lb /tower-llm-lb

FROM ${RUNTIME}
# CA certificates for backends whose certificates chain to the system's roots (the binary also
# carries the webpki roots), and a user without a shell or a home.
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin tower-llm-lb
COPY --from=build /tower-llm-lb /usr/local/bin/tower-llm-lb
USER 10001:10001
ENV TOWER_LLM_LB_LISTEN=0.0.0.0:8080
EXPOSE 8080
# The binary asks its own /health (no curl in the image); 503 while draining after SIGTERM.
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
  CMD ["tower-llm-lb", "health", "--url", "http://127.0.0.1:8080/health"]
# The binary is PID 1 and handles SIGTERM itself: it drains (see DEPLOY.md), then exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tower-llm-lb"]
CMD ["serve", "--config", "/etc/tower-llm-lb/config.json"]
