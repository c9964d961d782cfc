"""N worker processes under one supervisor that holds the listeners and the shared counts
(docs/workers.md)."""
