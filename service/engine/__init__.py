"""Model adapter, scheduler and device workers. Knows nothing of HTTP."""
