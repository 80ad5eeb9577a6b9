"""LMDB datastore, encryption at rest, blob store."""
