"""Operating the registry: what an operator and a cluster see of it.

    health.py      /healthz, /readyz and the start-up storage probe
    metrics.py     Prometheus figures (also across --workers) and /metrics
    requestlog.py  request IDs, access lines, JSON log lines
    middleware.py  the one middleware timing, counting and logging each request
    configcheck.py --check-config and the effective settings, secrets masked
"""
