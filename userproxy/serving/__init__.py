"""What a running proxy serves over HTTP: health (`/healthz`, `/livez`), Prometheus metrics,
`/status` (read by `userproxy ls`), `/proxyMode` and `/configz`. Everything is read from the
proxy's `ProxyStatus` snapshot and its sync runner, never from a provider's internals."""
