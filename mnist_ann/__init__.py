"""mnist-ann: k-nearest-neighbour digit recognition on FAISS indexes."""

__version__ = "0.1.0"
