"""The config error every module may raise: a leaf module, so that modules
``vipa_d2.config`` imports (the backbones, the text encoder) can raise it too."""


class ConfigError(ValueError):
    """A config file or override that does not merge, said in one line naming the file or
    the key (the entry points print it without a traceback)."""
