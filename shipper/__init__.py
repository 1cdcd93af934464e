"""shipper: the log and metrics agent baked into immutable server images."""

__version__ = "0.1.0"
