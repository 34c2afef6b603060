"""The pull-through cache: repositories under a configured prefix (or
selected by containerd's `?ns=`, or unprefixed with `proxy.default`) are
served from storage, and what storage lacks is fetched from the upstream
registry through the client's registry library (puller.client), streamed to
the client while it is written, verified, then kept.

    settings    the `proxy:` section (ProxySettings), credentials, allow_hosts
    routing     which upstream and upstream name a request's repository is
    upstream    one upstream registry: requests, redirects under allow_hosts, errors
    flights     one upstream fetch per blob or manifest, however many clients wait
    cache       the store wrapping the content store: hits, misses, revalidation
    handlers    the GET/HEAD handlers and the push guard the routes use

Without `proxy.upstreams` the handlers pass every request to the ordinary ones.
"""
