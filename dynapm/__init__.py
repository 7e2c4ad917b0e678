"""DynaPM: an on-demand gateway that starts self-hosted services on first request."""

__version__ = "0.1.0"
