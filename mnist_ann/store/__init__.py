"""The store: collection folders of Parquet tables, index files and manifests."""
