"""Offline tools: drafter training, choosing speculation defaults. No service imports this package."""
