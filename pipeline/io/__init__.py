"""Where rows come from and go: input discovery (shards), the part writers and the commit by
metadata (sink), the output folder's records and manifest, the lock, the poison-row ledger,
the schemas on disk, and the object store behind retries."""
