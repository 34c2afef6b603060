"""The client's runtime room: an image's layers applied, confined, into a
root filesystem, cached as chain snapshots, made into an OCI runtime bundle
and run with runc or crun."""
