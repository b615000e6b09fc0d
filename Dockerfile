# syntax=docker/dockerfile:1
# vublk in a container. Build:  docker build -t vublk .
# Run (docs/operations.md, "Containers"): the socket directory must be shared with QEMU, e.g.
#   docker run -d --name vublk -v /run/vublk:/run/vublk -v /var/lib/vublk:/var/lib/vublk vublk
# serves the default config (docs/examples/vublk.yaml: disk0, 1 GiB, /run/vublk/disk0.sock); add
#   -v /etc/vublk:/etc/vublk:ro   to serve your own /etc/vublk/vublk.yaml instead.

# ---- build: compile the TypeScript (needs the dev dependencies) --------------------------------------------
# Only the daemon: the bench/ workspace (test front-end, load generator) is not in the build context, and
# npm ci skips a workspace whose folder is absent.
FROM node:24-bookworm-slim AS build
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json tsconfig.build.json ./
COPY src ./src
COPY protocol ./protocol
RUN npm run build:daemon

# ---- runtime: production dependencies and the compiled code ------------------------------------------------
FROM node:24-bookworm-slim
ENV NODE_ENV=production
WORKDIR /app
COPY package.json package-lock.json ./
# Not --omit=optional: koffi's native binary (@koromix/koffi-linux-<arch>) is an optional dependency.
RUN npm ci --omit=dev --no-audit --no-fund && npm cache clean --force
COPY --from=build /app/dist ./dist

# A fixed uid/gid, so host directories mounted at /run/vublk and /var/lib/vublk can be given to it
# (chown 10001:10001), and a QEMU on the host running as that uid (or root) can open the sockets.
RUN groupadd --system --gid 10001 vublk \
 && useradd --system --uid 10001 --gid vublk --home-dir /var/lib/vublk --shell /usr/sbin/nologin vublk \
 && mkdir -p /run/vublk /var/lib/vublk /etc/vublk \
 && chown vublk:vublk /run/vublk /var/lib/vublk
# The default config, so a bare `docker run` serves a disk; a mounted /etc/vublk replaces it.
COPY docs/examples/vublk.yaml /etc/vublk/vublk.yaml
USER vublk
VOLUME ["/run/vublk", "/var/lib/vublk"]

# /healthz of the metrics listener, inside the container. VUBLK_HEALTH_URL matches the default config's
# metrics-listen; a config that listens elsewhere sets it too (docker run -e VUBLK_HEALTH_URL=http://HOST:PORT/healthz
# or unix:/run/vublk/metrics.sock), and one with metrics-listen: off runs with --no-healthcheck.
# node:http rather than fetch: it also reaches a Unix socket. Slim images have no curl.
ENV VUBLK_HEALTH_URL=http://127.0.0.1:9477/healthz
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["node", "-e", "const u = process.env.VUBLK_HEALTH_URL ?? ''; const unix = u.startsWith('unix:'); require('node:http').get(unix ? 'http://localhost/healthz' : u, { timeout: 4000, ...(unix ? { socketPath: u.slice(5) } : {}) }, (r) => process.exit(r.statusCode === 200 ? 0 : 1)).on('error', () => process.exit(1)).on('timeout', () => process.exit(1))"]

ENTRYPOINT ["node", "/app/dist/src/cli.js"]
CMD ["serve", "--config", "/etc/vublk/vublk.yaml"]
