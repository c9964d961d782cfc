"""The durable spool: messages kept on stable storage until the upstream takes them.

``interfaces`` is the seam (what a backend stores and hands back); ``files`` keeps the
queue on the local disk (message files and an SQLite index), ``amqp`` in RabbitMQ quorum
queues; ``modes`` puts a spool in front of the relay (``fallback``, ``spool``);
``runner`` delivers what is queued; ``dsn`` writes the bounces (docs/spool.md).
"""
