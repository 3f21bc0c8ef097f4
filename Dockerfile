# tally image (used by docker-compose.yml): tally-ingest (entrypoint), tally-invoicer, tally-api
# and tally-stripe-emulator.
FROM rust:1.90-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/tally-ingest /src/target/release/tally-invoicer /src/target/release/tally-api \
     /src/target/release/tally-stripe-emulator /usr/local/bin/
COPY config /etc/tally
WORKDIR /etc/tally
ENTRYPOINT ["tally-ingest"]
