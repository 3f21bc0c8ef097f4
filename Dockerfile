# tally-ingest image (used by docker-compose.yml).
FROM rust:1.85-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin tally-ingest

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/tally-ingest /usr/local/bin/tally-ingest
COPY config /etc/tally
WORKDIR /etc/tally
ENTRYPOINT ["tally-ingest"]
