"""The HTTP layer: routes, schemas, errors, limits."""
