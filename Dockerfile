# sandlet: one static binary on an empty base image.
#   docker build -t sandlet .
# The build is static glibc (crt-static, non-PIE; see .cargo/config.toml), so the runtime image
# needs nothing but the binary.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --locked --release \
 && cp target/x86_64-unknown-linux-gnu/release/sandlet /sandlet \
 && if readelf -l /sandlet | grep -q INTERP; then echo "not static" >&2; exit 1; fi

FROM scratch
COPY --from=build /sandlet /sandlet
# The task API (the Go task-executor's port) and the exec API (execd's).
EXPOSE 5758 44772
ENTRYPOINT ["/sandlet"]
CMD ["serve"]
