"""netvsc."""
