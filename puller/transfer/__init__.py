"""Transfers: images moved between registries, the local store and OCI
layouts, every byte verified on the way.

    pull      registry -> local store (puller.transfer.pull)
    push      local store, a layout or a docker-save archive -> registry
    copy      registry or layout -> registry or layout, digests unchanged
    sources   where a push or a copy reads an image from
    archive   `docker save` tarballs as layouts
    progress  what the transfers report to, and its displays

They stand on the registry client library (puller.client) and the local
store (puller.store); the CLI (puller.cli) and the runtime stand on them.
"""
