"""MNIST itself: sources and canonical arrays, splits, tables, pipelines, query files."""
