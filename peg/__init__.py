"""peg: train dense text-retrieval embedding models, locally and on Kubernetes."""

__version__ = "0.1.0"
