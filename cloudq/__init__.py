"""cloudq: time-shared cloud-streamed interactive sessions over Redis."""

__version__ = "0.1.0"
