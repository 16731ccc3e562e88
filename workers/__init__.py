"""Deployable services built from the fedbus library."""
