"""HTTP ingest: the lean HTTP/1.1 listener, routes, enrichment."""
