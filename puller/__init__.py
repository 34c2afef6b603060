"""The Dockyard client, in rooms that import only downwards:

    cli        the `dockyard` dispatcher and the client's subcommands; shared plumbing in cli.common
    runtime    unpack, confinement, snapshots, bundle, run (pulls what is missing)
    transfer   pull, push, copy (and their sources, docker-save archives, progress)
    store      the local OCI layout and its ingest protocol
    client     the registry client library: references, transport, auth, tokens, endpoints, HTTP
    errors     the one error tree (ClientError); oci: the edge over storage.oci

Below all of them, shared with the registry: storage.oci, the OCI vocabulary.
"""
