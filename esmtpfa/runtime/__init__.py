"""The running relay: command line, service wiring, check-config, signals, workers.

``tap`` is what ``twistd esmtpfa`` loads; ``options`` is its command line, ``service``
builds the relay from it, ``checkconfig`` dials everything once and exits, and
``workers`` runs N worker processes under one supervisor (docs/workers.md).
"""
