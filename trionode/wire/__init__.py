"""Sans-IO protocol state machines and codecs: bytes and `now` in, events and bytes out."""
