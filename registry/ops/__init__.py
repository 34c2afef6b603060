"""Operating the registry: what an operator and a cluster see of it.

    health.py      /healthz, /readyz and the start-up storage probe
    metrics.py     Prometheus figures and /metrics
    multiproc.py   the figures of --workers N added up (set up before the fork)
    requestlog.py  request IDs, access lines, JSON log lines
    middleware.py  the one middleware timing, counting and logging each request
    configcheck.py --check-config and the effective settings, secrets masked
"""
