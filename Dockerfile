# syntax=docker/dockerfile:1
# vublk in a container. Build:  docker build -t vublk .
# Run (docs/operations.md, "Containers"): the socket directory must be shared with QEMU, e.g.
#   docker run -d --name vublk -v /run/vublk:/run/vublk -v /var/lib/vublk:/var/lib/vublk \
#     -v /etc/vublk:/etc/vublk:ro vublk

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
USER vublk
VOLUME ["/run/vublk", "/var/lib/vublk"]

# /healthz of the metrics listener (default 127.0.0.1:9477, inside the container). Slim images have no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:9477/healthz', { signal: AbortSignal.timeout(4000) }).then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]

ENTRYPOINT ["node", "/app/dist/src/cli.js"]
CMD ["serve", "--config", "/etc/vublk/vublk.yaml"]
