"""The OCI vocabulary both halves of Dockyard speak: names, tags, digests,
references, media types, descriptors, manifests and indexes, and the walk
over a manifest's children.

Pure: no I/O, no HTTP, no aiohttp; the standard library only, so the client
imports it without paying for the server.

Why in `storage/`: the storage room is the ground floor that the registry
already stands on, and the client's local store is content-addressed OCI
storage too (an image layout). What a name, digest or manifest *is* belongs
to the content being stored, not to either protocol side, so both halves
import it from here and neither keeps a copy.

    storage.oci.errors    the OCI error codes, knowing nothing of HTTP
    storage.oci.names     grammar: repository names, tags, digests, references
    storage.oci.digests   computing and checking digests
    storage.oci.media     media types, and what each kind of document is
    storage.oci.content   descriptors, manifests, indexes, configs; the walk
"""
