# syntax=docker/dockerfile:1
#
# conductor as an image of one file: a static binary, web page embedded, FROM scratch.
#
#   docker build --build-arg CONDUCTOR_GIT_COMMIT=$(git rev-parse --short HEAD) -t conductor .
#   docker run --rm -p 3000:3000 conductor                 # flags go after the image name
#   docker run -p 3000:3000 -v conductor-state:/var/lib/conductor conductor   # keeps the state
#
# There is no .dockerignore: BuildKit sends the builder only the paths the COPY lines name, so
# target/ and .git stay where they are. tests/deploy.rs builds the binary the way the build
# stage does, runs it alone in an empty root as user 65534, and builds the final stage from it
# with podman, standing a directory that holds the binary in for the build stage:
#
#   podman build --format docker --build-context build=DIR -t conductor DIR
#
# then runs that image, its HEALTHCHECK and its STOPSIGNAL; see docs/deploy.md.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS build
# Set by BuildKit to the platform being built for (amd64 unless --platform says otherwise).
ARG TARGETARCH
RUN case "${TARGETARCH:-amd64}" in \
      amd64) echo x86_64-unknown-linux-musl ;; \
      arm64) echo aarch64-unknown-linux-musl ;; \
      *) echo "unsupported platform ${TARGETARCH}" >&2; exit 1 ;; \
    esac > /rust-target \
 && rustup target add "$(cat /rust-target)"
# musl links statically anyway; the flag makes that explicit and matches tests/deploy.rs.
ENV RUSTFLAGS="-C target-feature=+crt-static"
WORKDIR /src

# Dependencies in a layer of their own, rebuilt only when the manifests or the lock file change:
# the real manifests over empty sources.
# Cargo loads every workspace member's manifest (and finds its targets) before it builds one
# package, so each member's manifest is here and gets empty sources; only the server is built.
# tests/deploy.rs replays these lines on the repository, so a member added to the workspace
# and forgotten here fails a test, not a release.
COPY Cargo.toml Cargo.lock ./
COPY tools/Cargo.toml tools/Cargo.toml
COPY tools/sync/Cargo.toml tools/sync/Cargo.toml
COPY tools/netem/Cargo.toml tools/netem/Cargo.toml
COPY tools/bridge/Cargo.toml tools/bridge/Cargo.toml
COPY bench/floor/Cargo.toml bench/floor/Cargo.toml
COPY src/build.rs src/build.rs
RUN for member in . tools tools/sync tools/netem tools/bridge bench/floor; do \
      mkdir -p "$member/src" \
   && echo 'fn main() {}' > "$member/src/main.rs" \
   && touch "$member/src/lib.rs"; \
    done
RUN cargo build --locked --profile dist --target "$(cat /rust-target)" --bin conductor

# The project itself. COPY keeps the files' own times, which may be older than the stubs', so
# touch them: cargo must see that they changed. The commit for --version comes from the build
# argument, since .git is not sent.
COPY src src
COPY www www
ARG CONDUCTOR_GIT_COMMIT=unknown
RUN touch src/*.rs \
 && CONDUCTOR_GIT_COMMIT="${CONDUCTOR_GIT_COMMIT}" \
    cargo build --locked --profile dist --target "$(cat /rust-target)" --bin conductor \
 && cp "target/$(cat /rust-target)/dist/conductor" /conductor \
 && /conductor --version

FROM scratch
COPY --from=build /conductor /conductor
# Tempo, transport and timeline survive a restart in a state file (--state), on a volume in a
# directory the server's user owns. scratch has no mkdir: the build stage's /srv is an empty
# directory (Debian's), copied with the owner set.
COPY --from=build --chown=65534:65534 /srv /var/lib/conductor
ENV CONDUCTOR_STATE=/var/lib/conductor/state.json
VOLUME ["/var/lib/conductor"]
# nobody: there is no /etc/passwd to name it by.
USER 65534:65534
EXPOSE 3000
# The server closes every WebSocket with 1001 and exits 0 within about a second.
STOPSIGNAL SIGTERM
# No curl in scratch: the binary asks its own /healthz (port from PORT, else 3000).
HEALTHCHECK --interval=15s --timeout=5s --start-period=5s --retries=3 \
    CMD ["/conductor", "healthcheck"]
ENTRYPOINT ["/conductor"]
