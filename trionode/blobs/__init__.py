"""Blobs: content-addressed chunk store, manifests, and the `/trionode/blob/1` transfer."""
