"""The syncnorm coordinator: per-run global statistics, drift and batch-size
mismatch over gRPC, exported to Prometheus.  ``analysis`` holds its math."""
