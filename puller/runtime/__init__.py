"""The client's runtime room: an image's layers applied, confined, into a
root filesystem, cached as chain snapshots, made into an OCI runtime bundle
and run with runc or crun.

    image      an image's layers in order (store, pull, or oci:DIR), fed to the cache while they download
    run        runc / crun, the container's rootfs (overlay or copy), run_container
    bundle     DIR/rootfs + DIR/config.json, built beside DIR and renamed (`dockyard unpack`)
    spec       config.json from the untrusted image config: user, working directory, mounts
    snapshots  the cache of unpacked layers by chain ID
    tree       private copies of snapshot trees; ext4 placement hint
    stage      staged apply: a layer written before its parent tree exists
    apply      the layer applier: whiteouts, attributes, hard links, shared inodes
    tar        the streaming tar reader
    streams    a layer blob as its decompressed, hashed, bounded tar stream
    confine    path confinement: openat2(RESOLVE_IN_ROOT), or one walk that does the same
    options    limits and options; errors: the runtime's part of the client's error tree

Each module imports only those below it in this list (image also uses
puller.store and puller.transfer to read or pull an image), and below all
of them storage.oci for media types, digests and manifests.
"""
