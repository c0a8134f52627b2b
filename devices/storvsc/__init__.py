"""storvsc."""
