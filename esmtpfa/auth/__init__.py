"""Authentication: credentials with connection context, provider selection, the realm."""
