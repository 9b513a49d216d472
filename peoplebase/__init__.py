"""Peoplebase: a self-hosted, Mixpanel-compatible user-profile store."""

__version__ = "0.1.0"
