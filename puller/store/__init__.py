"""The client's local store: an OCI image layout shared by every image
(puller.store.layout), and the ingest protocol by which bytes become its
blobs (puller.store.ingest). `oci:DIR[:TAG]` names any layout, the store
included (parse_layout_reference).
"""

from puller.errors import StoreError
from puller.store.ingest import STALE_PARTIAL_SECONDS, STALE_TEMP_SECONDS
from puller.store.layout import (DEFAULT_LAYOUT_TAG, REF_NAME, LayoutReference, LocalStore, default_store_root,
                                 parse_layout_reference)

__all__ = ["DEFAULT_LAYOUT_TAG", "REF_NAME", "STALE_PARTIAL_SECONDS", "STALE_TEMP_SECONDS", "LayoutReference",
           "LocalStore", "StoreError", "default_store_root", "parse_layout_reference"]
