"""The error a configuration that must not be loaded raises, whichever layer reads it.

Providers, policies, documents, the relay's upstream file and the command line all refuse
a bad setting the same way: one ``ConfigError`` whose text names the setting, turned
into a one-line startup error (or a refused reload) by whoever loaded it.  It lives in
``common`` because every layer that reads configuration raises it.
"""


class ConfigError(Exception):
    """A configuration that must not be loaded; the text names the setting and the problem."""
