"""fededge.device."""
