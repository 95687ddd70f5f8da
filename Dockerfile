# Builds the order-domain worker binaries: email-worker, inventory-worker, analytics-worker,
# order-producer. Used by docker-compose.yml (curl: its healthchecks GET /ready).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# `otlp`: spans are exported when OTEL_EXPORTER_OTLP_ENDPOINT is set.
RUN cargo build --release --locked -p rabbitry-workers --bins --features otlp

FROM debian:bookworm-slim
# tzdata: schedules in named time zones read the system tz database.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl tzdata \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/email-worker \
                  /src/target/release/inventory-worker \
                  /src/target/release/analytics-worker \
                  /src/target/release/order-producer \
                  /usr/local/bin/
ENV RUST_LOG=info
# The workers shut down gracefully on SIGTERM (docker stop).
CMD ["email-worker"]
