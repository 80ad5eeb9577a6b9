"""CRDT state: HLC, entity tree with Merkle hashes, collections. Pure and deterministic."""
