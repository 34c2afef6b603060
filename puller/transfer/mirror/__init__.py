"""Mirroring into an air-gapped network: bundles, deltas, verified import.

    images_file   what to mirror: references, per-repository tag regexes and semver ranges (semver)
    walk          an image's whole tree in a registry: platforms, blobs, referrers
    bundle        the bundle: an OCI layout in a tar, its signed manifest; writer and reader
    signing       ECDSA / Ed25519 signatures over the bundle manifest
    export        registries -> bundle (a delta with an inventory or a previous bundle)
    imports       bundle -> registry: verify, check prerequisites, push children first, tags last
    inventory     what a registry holds (HAVE.json), and the Have a delta is computed from
    target        REGISTRY[/PREFIX]
    listing       tags and catalog lists, manifest HEAD
    errors        the mirror's branch of the client's error tree

It stands on the transfers beside it (pull's BlobFetcher, push_image,
copy's referrers tag) and the registry client library; the CLI is
puller.cli.mirror.
"""
