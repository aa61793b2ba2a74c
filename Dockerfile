# sandlet: one static binary on an empty base image (the default target), and the controller.
# The names and tags deploy/ uses (docs/kubernetes.md says how to load them into a cluster):
#   docker build -t sandlet:dev .
#   docker build --target controller -t sandlet-controller:dev .
#   docker build --target execd -t sandlet:execd .      (the OpenSandbox server's execd_image)
# The build is static glibc (crt-static, non-PIE; see .cargo/config.toml), so the runtime image
# needs nothing but the binary.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --locked --release \
 && cp target/x86_64-unknown-linux-gnu/release/sandlet /sandlet \
 && cp target/x86_64-unknown-linux-gnu/release/sandlet-controller /sandlet-controller \
 && for b in /sandlet /sandlet-controller; do \
      if readelf -l "$b" | grep -q INTERP; then echo "$b is not static" >&2; exit 1; fi; done

# sandlet-controller: talks to the apiserver with the service account's CA (in-cluster config),
# so it needs no CA bundle either.
FROM scratch AS controller
COPY --from=build /sandlet-controller /sandlet-controller
ENTRYPOINT ["/sandlet-controller"]

# The OpenSandbox server's execd_image: its init container runs `/bin/sh -c "cp ./execd ... &&
# cp ./bootstrap.sh ..."` in the image's working directory. sandlet takes the role its file name
# gives it, so the one binary is both; busybox (static) brings sh, cp, chmod and test.
FROM busybox:1.37 AS execd
COPY --from=build /sandlet /execd
COPY --from=build /sandlet /bootstrap.sh
WORKDIR /
EXPOSE 44772
CMD ["/execd"]

FROM scratch
COPY --from=build /sandlet /sandlet
# The task API (the Go task-executor's port) and the exec API (execd's).
EXPOSE 5758 44772
ENTRYPOINT ["/sandlet"]
CMD ["serve"]
