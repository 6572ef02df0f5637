"""fededge.secagg."""
