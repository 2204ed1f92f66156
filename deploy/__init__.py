"""Scripts for running the app on a real SuperLink with SuperNodes (see deploy/README.md)."""
