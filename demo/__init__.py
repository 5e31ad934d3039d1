"""Demo data, training and evaluation, the `make demo` driver and the cloud-process harness (not product code)."""
