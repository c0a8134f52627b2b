"""vmbusd: the root-partition (host) side of Hyper-V's VMBus."""

__version__ = "0.1.0"
