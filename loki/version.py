"""loki's version, in a module of its own: the modules that record it (in deltas, attributions and model cards)
import it from here rather than from the package that imports them."""

__version__ = "0.1.0"
