"""A small KVM VMM that boots a real Linux guest whose unmodified Hyper-V drivers use vmbusd."""
