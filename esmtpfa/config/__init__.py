"""Reading configuration: documents, the provider file, and reloading it while running.

``documents`` reads a YAML or JSON document within limits; ``providers`` turns the
provider document into configured providers with their policies; ``reload`` swaps them
in on SIGHUP, a file change or a configuration service's answer (docs/config-loading.md).
"""
