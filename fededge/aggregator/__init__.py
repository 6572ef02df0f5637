"""fededge.aggregator."""
