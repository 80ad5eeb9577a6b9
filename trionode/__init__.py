"""trionode: a peer-to-peer node for local-first applications, on Trio."""

__version__ = "0.1.0"
